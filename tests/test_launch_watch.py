"""hebtron submit --eval-every without a cluster: the companion watch job's script (values
quoted, the watcher's command line, requeue), the profile's eval backend on the eval and watch
command lines, submit's plumbing with a fake sbatch, and ``hebtron jobs`` showing the watch job
and the best checkpoint. (tests/test_slurm_watch.py runs it on a real local Slurm.)"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import get_args

import pytest
import yaml

from hebtron.cli import main
from hebtron.errors import UserError
from hebtron.eval.runner import BACKENDS
from hebtron.launch.jobs import format_table, list_jobs
from hebtron.launch.profile import PROFILE_DIR, EvalJob, load_profile
from hebtron.launch.submit import prepare, submit
from tests.test_launch import GOLDEN_DIR, HOSTILE, HYPERPOD, UPDATE_GOLDEN, _cluster_recipe, _run_header, _shellcheck


def _scratch_recipe(tmp_path: Path, run_dir: str | None = None) -> Path:
    """A recipe trained from scratch (no model.hf_path, so no default baseline)."""
    recipe = _cluster_recipe(tmp_path / "r.yaml", run_dir=run_dir or str(tmp_path / "runs" / "demo"))
    data = yaml.safe_load(recipe.read_text())
    data["model"] = {"init": {"hidden_size": 32}}
    data["tokenizer"] = {"path": "/fsx/tok"}
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def _profile(tmp_path: Path, base: str = "local", **eval_changes) -> str:
    data = yaml.safe_load((PROFILE_DIR / f"{base}.yaml").read_text())
    data["paths"] = {"jobs": str(tmp_path / "jobs")}
    data["eval"] = data.get("eval", {}) | eval_changes
    path = tmp_path / f"{base}-custom.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _header(script: str, names: list[str], tmp_path: Path) -> dict[str, str]:
    """The watch script's value block run in bash (it stops before the job-id check)."""
    return _run_header(script.split("\nTRAIN_JOBID=")[0], names, tmp_path)


def _watch_line(script: str) -> str:
    start = script.index('hebtron.cli eval watch')
    return script[start:script.index("&\n", start)]


def test_eval_every_renders_a_watch_job_instead_of_the_chained_evaluation(tmp_path):
    prepared = prepare(_scratch_recipe(tmp_path), _profile(tmp_path, poll=2), [], eval_suite="hebrew-mini",
                       eval_every=3, check_paths=False)
    assert prepared.eval_script is None and prepared.watch_script is not None
    script = prepared.watch_script
    assert "#SBATCH --job-name=demo-watch\n" in script
    assert "#SBATCH --requeue\n" in script and "#SBATCH --signal=B:USR1@120\n" in script
    assert "--dependency" not in script and "afterok" not in script
    line = _watch_line(script)
    for part in ('eval watch "$RUN_DIR" --checkpoints "$CKPT_DIR"', '--suite "$SUITE"', '--every "$EVERY"', '--poll "$POLL"',
                 '--backend "$BACKEND"', '--until-job "$TRAIN_JOBID"', '"${select[@]}"', '"${tasks[@]}"'):
        assert part in line, part
    values = _header(script, ["RUN_DIR", "CKPT_DIR", "EVERY", "POLL", "BACKEND", "POLICY", "BASELINE"], tmp_path)
    assert values == {"RUN_DIR": str(tmp_path / "runs" / "demo"),
                      "CKPT_DIR": str(tmp_path / "runs" / "demo" / "checkpoints"), "EVERY": "3", "POLL": "2.0",
                      "BACKEND": "hebtron", "POLICY": str(PROFILE_DIR.parent / "eval" / "suites" / "hebrew-mini.gate.yaml"),
                      "BASELINE": ""}  # trained from scratch: the watcher selects against its own default
    assert prepared.record["watch_job_id"] is None and prepared.record["eval"]["every"] == 3
    path = tmp_path / "watch.sbatch"
    path.write_text(script)
    _shellcheck(path)


def test_watch_script_refuses_a_missing_or_odd_training_job_id(tmp_path):
    prepared = prepare(_scratch_recipe(tmp_path), _profile(tmp_path), [], eval_suite="hebrew-mini", eval_every=1,
                       check_paths=False)
    path = tmp_path / "watch.sbatch"
    path.write_text(prepared.watch_script)
    for args in ([], ["12; touch x"]):
        done = subprocess.run(["bash", str(path), *args], capture_output=True, text=True, cwd=tmp_path,
                              env=dict(os.environ, SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n"))
        assert done.returncode == 2 and "usage: sbatch" in done.stderr and "TRAIN_JOBID" in done.stderr
    assert not (tmp_path / "x").exists()


def test_watch_job_values_stay_inert(tmp_path):
    mark, canary = tmp_path / "pwned", tmp_path / "canary"
    canary.mkdir()
    hostile = HOSTILE.format(mark=mark, canary=canary)
    run_dir = f"{tmp_path}/runs/{hostile}"
    prepared = prepare(_scratch_recipe(tmp_path, run_dir), _profile(tmp_path), [], eval_suite=f"suite {hostile}",
                       eval_policy=f"/p {hostile}", eval_baseline=f"/b {hostile}", eval_tasks_dirs=[f"/t {hostile}"],
                       eval_every=2, check_paths=False)
    values = _header(prepared.watch_script, ["RUN_DIR", "CKPT_DIR", "SUITE", "POLICY", "BASELINE", "TASKS_DIRS"],
                     tmp_path)
    assert values == {"RUN_DIR": run_dir, "CKPT_DIR": f"{run_dir}/checkpoints", "SUITE": f"suite {hostile}", "POLICY": f"/p {hostile}",
                      "BASELINE": f"/b {hostile}", "TASKS_DIRS": f"/t {hostile}"}
    assert "BASELINE_IS_RESULTS=0\n" in prepared.watch_script  # a model directory: evaluated first, in the job
    path = tmp_path / "hostile.watch.sbatch"
    path.write_text(prepared.watch_script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    _shellcheck(path, "warning")
    assert not mark.exists() and canary.is_dir()


@pytest.mark.parametrize("cluster", HYPERPOD)
def test_hyperpod_watch_script_matches_golden(tmp_path, cluster):
    prepared = prepare(_cluster_recipe(tmp_path / "recipe.yaml"), cluster, [], eval_suite="hebrew-mini",
                       eval_policy="/fsx/hebtron/eval/suites/hebrew-mini.gate.yaml",
                       eval_baseline="/fsx/hebtron/eval/baselines/nemotron3-nano.json", eval_every=2, check_paths=False)
    golden = GOLDEN_DIR / f"{cluster}.watch.sbatch"
    if UPDATE_GOLDEN:
        golden.write_text(prepared.watch_script, encoding="utf-8")
    assert golden.is_file(), f"{golden} missing; generate it with HEBTRON_UPDATE_GOLDEN=1 and review it"
    assert prepared.watch_script == golden.read_text(encoding="utf-8"), (
        f"watch script for {cluster} differs from {golden}; regenerate with HEBTRON_UPDATE_GOLDEN=1 and review")
    assert "#SBATCH --gpus-per-task=1\n" in prepared.watch_script
    _shellcheck(golden)


def test_eval_every_needs_a_suite_and_a_positive_count(tmp_path):
    recipe = _scratch_recipe(tmp_path)
    with pytest.raises(UserError, match=r"^--eval-every: only with --eval-suite$"):
        prepare(recipe, "local", [], eval_every=2, check_paths=False)
    with pytest.raises(UserError, match=r"^--eval-every: expected a positive number of checkpoints, got 0$"):
        prepare(recipe, "local", [], eval_suite="hebrew-mini", eval_every=0, check_paths=False)


# ----------------------------------------------------------------------- the eval backend
def test_profile_backends_are_the_runners():
    assert get_args(EvalJob.model_fields["backend"].annotation) == BACKENDS
    assert EvalJob().backend == "hebtron"


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_profile_eval_backend_reaches_eval_and_watch_command_lines(tmp_path, backend):
    profile = _profile(tmp_path, "hyperpod-h200", backend=backend)
    recipe = _cluster_recipe(tmp_path / "r.yaml")
    chained = prepare(recipe, profile, [], eval_suite="hebrew-mini", eval_policy="/p.yaml", eval_baseline="/base",
                      check_paths=False)
    watched = prepare(recipe, profile, [], eval_suite="hebrew-mini", eval_every=1, check_paths=False)
    assert f"BACKEND={backend}\n" in chained.eval_script and f"BACKEND={backend}\n" in watched.watch_script
    # both eval runs of the chained job (baseline model, then the checkpoint) and the watcher
    assert chained.eval_script.count('eval run --suite "$SUITE" "${tasks[@]}" --backend "$BACKEND" --checkpoint') == 2
    assert '--backend "$BACKEND"' in _watch_line(watched.watch_script)
    assert watched.watch_script.count('--backend "$BACKEND"') == 2  # the baseline model's evaluation too
    # and the rendered line parses to --backend <backend> once the header runs
    values = _header(watched.watch_script, ["BACKEND"], tmp_path)
    assert shlex.split(f'--backend {values["BACKEND"]}') == ["--backend", backend]


def test_bad_profile_eval_backend_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("paths: {jobs: /j}\neval: {backend: vlm}\n")
    with pytest.raises(UserError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: eval.backend: ") and "vlm" in message and "vllm" in message
    assert "\n" not in message


# ------------------------------------------------------------------- submit with a fake sbatch
def _fake_sbatch(tmp_path: Path, monkeypatch) -> Path:
    """An ``sbatch`` on PATH that logs its argv and prints job ids 101, 102, ..."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    exe = bin_dir / "sbatch"
    exe.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n"
                   f"echo $((100 + $(wc -l < {shlex.quote(str(log))})))\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_submit_runs_the_watch_job_beside_training_and_records_it(tmp_path, monkeypatch, capsys):
    log = _fake_sbatch(tmp_path, monkeypatch)
    code = main(["submit", str(_scratch_recipe(tmp_path)), "--cluster", _profile(tmp_path), "--no-check-paths",
                 "--eval-suite", "hebrew-mini", "--eval-every", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and out == "101\n"
    assert "watch job 102 evaluates checkpoints beside training job 101" in err
    job_dir = tmp_path / "jobs" / "demo"
    calls = log.read_text().splitlines()
    assert calls == [f"--parsable {job_dir}/train.sbatch", f"--parsable {job_dir}/watch.sbatch 101"]
    record = json.loads((job_dir / "job.json").read_text())
    assert (record["train_job_id"], record["eval_job_id"], record["watch_job_id"]) == ("101", None, "102")
    assert (job_dir / "watch.sbatch").stat().st_mode & stat.S_IXUSR and not (job_dir / "eval.sbatch").exists()


def _fake_squeue(tmp_path: Path, monkeypatch, states: dict[str, str]) -> None:
    exe = tmp_path / "bin" / "squeue"
    exe.write_text("#!/bin/bash\n" + "".join(f"echo '{j}|{s}'\n" for j, s in states.items()))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_jobs_shows_the_watch_job_and_the_best_checkpoint(tmp_path, monkeypatch):
    from hebtron.eval.select import SELECT_DIR

    _fake_sbatch(tmp_path, monkeypatch)
    record = submit(prepare(_scratch_recipe(tmp_path), _profile(tmp_path), [], eval_suite="hebrew-mini",
                            eval_every=1, check_paths=False, create=True))
    _fake_squeue(tmp_path, monkeypatch, {"101": "COMPLETED", "102": "RUNNING"})
    [row] = list_jobs(tmp_path / "jobs")
    assert (row.watch_job_id, row.watch_state, row.best_step) == ("102", "RUNNING", None)
    assert "102 (watch)" in format_table([row])
    select_dir = Path(record["ckpt_dir"]) / SELECT_DIR
    select_dir.mkdir(parents=True)
    chosen = f"{record['ckpt_dir']}/step_00000020"
    (select_dir / "hebrew-mini.json").write_text(json.dumps(
        {"suite": "hebrew-mini", "chosen": {"step": 20, "checkpoint": chosen}, "plateau": {"plateau": False}}))
    [row] = list_jobs(tmp_path / "jobs")
    assert (row.best_step, row.best_checkpoint, row.best_suite) == (20, chosen, "hebrew-mini")
    table = format_table([row])
    assert "BEST" in table.splitlines()[0] and "step 20 (hebrew-mini)" in table
