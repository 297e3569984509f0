"""hebtron submit without a cluster: profiles, rendering, golden HyperPod scripts, shellcheck,
inert hostile values, and the command line's one-line errors. (tests/test_slurm.py submits to
a real local Slurm.)"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hebtron.cli import main
from hebtron.errors import UserError
from hebtron.launch.profile import PROFILE_DIR, load_profile
from hebtron.launch.render import check_sbatch_script
from hebtron.launch.submit import eval_chain, prepare, safe_name
from hebtron.recipe import load_recipe

GOLDEN_DIR = PROFILE_DIR / "golden"
HYPERPOD = ("hyperpod-h200", "hyperpod-b300")
# Regenerate after a reviewed template change: HEBTRON_UPDATE_GOLDEN=1 pytest tests/test_launch.py
UPDATE_GOLDEN = os.environ.get("HEBTRON_UPDATE_GOLDEN") == "1"


def _cluster_recipe(path: Path, run_dir: str = "/fsx/hebtron/runs/nano-cpt-he", **extra) -> Path:
    """A recipe whose inputs live on the cluster's shared filesystem (not here)."""
    recipe = {
        "model": {"hf_path": "/fsx/hebtron/models/nemotron3-nano"},
        "data": {"seq_len": 4096, "sources": [{"name": "he", "path": "/fsx/hebtron/data/he_train", "lang": "he"}]},
        "train": {"global_batch": 256, "micro_batch": 1, "lr": 1e-4, "total_tokens": "10B", "precision": "bf16"},
        "logging": {"run_dir": run_dir},
    } | extra
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _render(tmp_path: Path, cluster: str, **kwargs):
    recipe = kwargs.pop("recipe", None) or _cluster_recipe(tmp_path / "recipe.yaml")
    kwargs.setdefault("eval_suite", "hebrew-mini")
    kwargs.setdefault("eval_policy", "/fsx/hebtron/eval/suites/hebrew-mini.gate.yaml")
    return prepare(recipe, cluster, kwargs.pop("overrides", []), check_paths=False, **kwargs)


# ------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("name", ["hyperpod-h200", "hyperpod-b300", "local"])
def test_shipped_profiles_load(name):
    _, profile = load_profile(name)
    assert profile.paths.jobs
    if name.startswith("hyperpod"):
        assert profile.gpus_per_node == 8 and profile.ranks_per_node == 8
        for key in ("FI_PROVIDER", "FI_EFA_USE_HUGE_PAGE", "FI_EFA_SET_CUDA_SYNC_MEMOPS"):
            assert key in profile.env
        assert profile.env["FI_PROVIDER"] == "efa"
        assert (profile.container is None) != (profile.venv is None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nodes: 1\npaths: {jobs: /j}\nparition: p5\n", r"bad\.yaml: parition: unknown key; did you mean 'partition'\?"),
        ("paths: {jobs: /j}\npartition: 'p5; rm -rf /'\n", r"bad\.yaml: partition: expected letters, digits"),
        ("paths: {jobs: /j}\ntime: '1'\nsignal_seconds: 60\n", r"bad\.yaml: signal_seconds: must be shorter than the time limit"),
        ("paths: {jobs: /j}\nvenv: /v\ncontainer: {image: x}\n", r"bad\.yaml: venv: set a container or a venv, not both"),
        ("paths: {jobs: /j}\nenv: {'A B': x}\n", r"bad\.yaml: env\['A B'\]: expected an environment variable name"),
        ("paths: {jobs: /j}\nsbatch_options: ['--comment=$(id)']\n", r"bad\.yaml: sbatch_options\[0\]: expected an sbatch option"),
        ("nodes: 0\npaths: {jobs: /j}\n", r"bad\.yaml: nodes: must be >= 1, got 0"),
        ("- a list\n", r"bad\.yaml: expected a mapping"),
    ],
)
def test_bad_profile_is_one_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=expected) as info:
        load_profile(str(path))
    assert "\n" not in str(info.value)


def test_unknown_cluster_lists_profiles(capsys, tmp_path):
    recipe = _cluster_recipe(tmp_path / "r.yaml")
    assert main(["submit", str(recipe), "--cluster", "hyperpod-h100", "--dry-run", "--no-check-paths"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --cluster hyperpod-h100: unknown cluster profile; expected one of:")
    assert "hyperpod-b300" in err and "\n" not in err


# ---------------------------------------------------------------------------- rendering
def test_dp_follows_nodes_and_gpus(tmp_path):
    prepared = _render(tmp_path, "hyperpod-h200", nodes=4)
    assert prepared.recipe.parallel.dp == 32
    assert "#SBATCH --nodes=4\n" in prepared.train_script
    local = _render(tmp_path, "local", eval_suite=None)
    assert local.recipe.parallel.dp == 1


def test_dp_override_that_contradicts_the_job_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"parallel\.dp must be 16"):
        _render(tmp_path, "hyperpod-h200", overrides=["parallel.dp=8"])
    ok = _render(tmp_path, "hyperpod-h200", overrides=["parallel.dp=16"])
    assert ok.recipe.parallel.dp == 16


def test_global_batch_must_fit_the_ranks(tmp_path):
    with pytest.raises(UserError, match=r"train\.micro_batch x parallel\.dp = 1 x 48 must divide"):
        _render(tmp_path, "hyperpod-h200", nodes=6)


def test_job_name_is_sanitized_and_name_checked(tmp_path):
    assert safe_name("run $(touch x); `id`") == "run_touch_x_id"
    with pytest.raises(UserError, match=r"--name 'a b'"):
        _render(tmp_path, "local", name="a b", eval_suite=None)


def test_eval_chain_needs_a_baseline_for_a_model_trained_from_scratch(tmp_path):
    recipe = _cluster_recipe(tmp_path / "r.yaml")
    data = yaml.safe_load(recipe.read_text())
    data["model"] = {"init": {"hidden_size": 32}}
    data["tokenizer"] = {"path": "/fsx/tok"}
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"--eval-baseline: required, since the recipe trains from scratch"):
        _render(tmp_path, "local", recipe=recipe)
    prepared = _render(tmp_path, "local", recipe=recipe, eval_baseline="/fsx/base.json")
    assert prepared.spec.eval.baseline_is_results


def test_eval_chain_paths_are_checked(tmp_path):
    recipe = load_recipe(_cluster_recipe(tmp_path / "r.yaml"), check_paths=False)
    with pytest.raises(UserError, match=r"--eval-suite no-such-suite: no such suite"):
        eval_chain("no-such-suite", None, None, recipe)
    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\ntasks: [mine]\n")
    with pytest.raises(UserError, match=r"--eval-policy: required, since there is no mine\.gate\.yaml beside"):
        eval_chain(str(suite), None, None, recipe)
    (tmp_path / "mine.gate.yaml").write_text("tasks: {}\n")
    with pytest.raises(UserError, match=r"--eval-baseline /nowhere: no such results JSON or model directory"):
        eval_chain(str(suite), None, "/nowhere", recipe)
    chain = eval_chain(str(suite), None, str(tmp_path), recipe)
    assert chain.suite == str(suite) and chain.suite_tag == "mine"
    assert chain.policy == str(tmp_path / "mine.gate.yaml") and not chain.baseline_is_results


def test_the_job_runs_in_its_job_directory_not_where_submit_ran(tmp_path, monkeypatch):
    """``paths.workdir`` defaults to the job directory (launch/profile.py says so); the
    directory submit is called from leaves no trace in the job but the paths it resolved."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = _cluster_recipe(tmp_path / "r.yaml", run_dir="runs/demo")  # relative: resolved at submit
    prepared = _render(tmp_path, "local", recipe=recipe, eval_baseline="/fsx/base.json")
    job_dir = elsewhere / "runs" / "jobs" / "demo"
    assert prepared.spec.job_dir == str(job_dir) and prepared.spec.workdir == str(job_dir)
    assert prepared.recipe.logging.run_dir == elsewhere / "runs" / "demo"
    for script, names in ((prepared.train_script, ["JOB_DIR", "WORKDIR"]), (prepared.eval_script, ["WORKDIR"])):
        assert set(_run_header(script, names, tmp_path).values()) == {str(job_dir)}
    profile = yaml.safe_load((PROFILE_DIR / "local.yaml").read_text())
    profile["paths"]["workdir"] = "project"  # a profile's own workdir wins; relative to where submit runs
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile))
    mine = _render(tmp_path, str(tmp_path / "p.yaml"), recipe=recipe, eval_suite=None)
    assert mine.spec.workdir == str(elsewhere / "project")


def test_eval_task_dirs_are_resolved_where_submit_runs(tmp_path, monkeypatch):
    """hebrew-mini's tasks (``workdir_include: [runs/demo/eval/tasks]``) are found from the
    directory submit runs in, passed to the job as absolute ``--tasks-dir``s, checked at once."""
    recipe = load_recipe(_cluster_recipe(tmp_path / "r.yaml"), check_paths=False)
    project, elsewhere = tmp_path / "my project", tmp_path / "elsewhere"
    tasks = project / "runs" / "demo" / "eval" / "tasks"
    tasks.mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    chain = eval_chain("hebrew-mini", None, str(tmp_path), recipe)
    assert chain.tasks_dirs == (str(tasks),)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserError, match=r"hebrew-mini\.yaml: workdir_include runs/demo/eval/tasks: no such task "
                                         r"directory under .*elsewhere; build it with `hebtron data demo`") as info:
        eval_chain("hebrew-mini", None, str(tmp_path), recipe)
    assert "\n" not in str(info.value)
    chain = eval_chain("hebrew-mini", None, str(tmp_path), recipe, tasks_dirs=[str(tasks)])
    assert chain.tasks_dirs == (str(tasks),)
    with pytest.raises(UserError, match=r"--eval-tasks-dir nowhere: no such directory"):
        eval_chain("hebrew-mini", None, str(tmp_path), recipe, tasks_dirs=["nowhere"])
    # unchecked (files on the cluster): left to the job's working directory
    assert eval_chain("hebrew-mini", None, str(tmp_path), recipe, check_paths=False).tasks_dirs == ()
    # the eval job hands them, one shell word each, to both of its `hebtron eval run`s
    prepared = _render(tmp_path, "local", eval_baseline="/fsx/base", eval_tasks_dirs=[str(tasks), "/b $(id)"])
    assert _run_header(prepared.eval_script, ["TASKS_DIRS"], tmp_path) == {"TASKS_DIRS": str(tasks)}  # ${A[0]}
    assert "TASKS_DIRS=(" + shlex.quote(str(tasks)) + " '/b $(id)')\n" in prepared.eval_script
    assert prepared.eval_script.count('eval run --suite "$SUITE" "${tasks[@]}" ') == 2


@pytest.mark.parametrize("cluster", HYPERPOD)
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_hyperpod_scripts_match_golden(tmp_path, cluster, kind):
    prepared = _render(tmp_path, cluster, eval_baseline="/fsx/hebtron/eval/baselines/nemotron3-nano.json")
    script = prepared.train_script if kind == "train" else prepared.eval_script
    golden = GOLDEN_DIR / f"{cluster}.{kind}.sbatch"
    if UPDATE_GOLDEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(script, encoding="utf-8")
    assert golden.is_file(), f"{golden} missing; generate it with HEBTRON_UPDATE_GOLDEN=1 and review it"
    assert script == golden.read_text(encoding="utf-8"), (
        f"{kind} script for {cluster} differs from {golden}; if the change is intended, regenerate with "
        "HEBTRON_UPDATE_GOLDEN=1 pytest tests/test_launch.py and review the diff"
    )


def _shellcheck(path: Path, severity: str = "info") -> None:
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck not installed: `make test` installs it (slurm/local/install-deps.sh)"
    done = subprocess.run([exe, f"--severity={severity}", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", [f"{c}.{k}.sbatch" for c in HYPERPOD for k in ("train", "eval")])
def test_golden_scripts_pass_shellcheck(name):
    path = GOLDEN_DIR / name
    assert path.is_file(), f"{path} missing"
    _shellcheck(path)


def test_local_scripts_pass_shellcheck(tmp_path):
    prepared = _render(tmp_path, "local", eval_baseline="/fsx/base")
    for kind, script in (("train", prepared.train_script), ("eval", prepared.eval_script)):
        path = tmp_path / f"local.{kind}.sbatch"
        path.write_text(script)
        _shellcheck(path)


def test_sbatch_lines_are_checked():
    check_sbatch_script("#SBATCH --partition=p5en\n#SBATCH --signal=B:USR1@600\n#SBATCH --output=slurm-%j.out\n")
    for bad in ("#SBATCH --partition='x y'", "#SBATCH --job-name=a$(id)", "#SBATCH -p x"):
        with pytest.raises(ValueError, match="not a plain #SBATCH option"):
            check_sbatch_script(bad + "\n")


# -------------------------------------------------------------------------- hostile values
HOSTILE = "x $(touch {mark}) `touch {mark}` ; rm -rf {canary} ; 'single' \"double\" \\ $HOME *"


def _run_header(script: str, names: list[str], tmp_path: Path) -> dict[str, str]:
    """Execute the script's value block in bash and read the variables back."""
    body, stop = [], ("restarts=", 'echo "hebtron: eval job')
    for line in script.splitlines():
        if line.startswith(stop):
            break
        body.append(line)
    probe = "\n".join(body) + "\nprintf '%s\\0' " + " ".join(f'"${n}"' for n in names) + "\n"
    path = tmp_path / "probe.sh"
    path.write_text(probe)
    done = subprocess.run(["bash", str(path)], capture_output=True, cwd=tmp_path, check=True)
    return dict(zip(names, done.stdout.decode().split("\0")))


def test_hostile_values_stay_inert(tmp_path):
    mark, canary = tmp_path / "pwned", tmp_path / "canary"
    canary.mkdir()
    hostile = HOSTILE.format(mark=mark, canary=canary)
    jobs = f"{tmp_path}/jobs {hostile}"
    profile = yaml.safe_load((PROFILE_DIR / "hyperpod-h200.yaml").read_text())
    profile["paths"] = {"jobs": jobs, "workdir": f"/fsx/{hostile}", "cache": f"/fsx/cache {hostile}"}
    profile["container"] = {"image": f"img {hostile}", "mounts": [f"/fsx:/fsx {hostile}"], "workdir": f"/w {hostile}"}
    profile["env"]["NCCL_DEBUG"] = hostile
    profile_path = tmp_path / "hostile.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    run_dir = f"{tmp_path}/runs/{hostile}\nline two"
    recipe = _cluster_recipe(tmp_path / "r.yaml", run_dir=run_dir)
    prepared = prepare(recipe, str(profile_path), [], eval_suite=f"suite {hostile}", eval_policy=f"/p {hostile}",
                       eval_baseline=f"/b {hostile}.json", check_paths=False)
    assert prepared.spec.job_name == safe_name(run_dir.split("/")[-1])
    train = _run_header(prepared.train_script, ["JOB_DIR", "RECIPE", "WORKDIR", "CONTAINER_IMAGE", "CONTAINER_MOUNTS",
                                                 "CONTAINER_WORKDIR", "NCCL_DEBUG", "HF_HOME"], tmp_path)
    assert train["JOB_DIR"] == prepared.spec.job_dir and train["JOB_DIR"].startswith(jobs)
    assert train["RECIPE"] == prepared.spec.recipe
    assert train["WORKDIR"] == f"/fsx/{hostile}"
    assert train["CONTAINER_IMAGE"] == f"img {hostile}"
    assert train["CONTAINER_MOUNTS"] == f"/fsx:/fsx {hostile}"
    assert train["CONTAINER_WORKDIR"] == f"/w {hostile}"
    assert train["NCCL_DEBUG"] == hostile
    assert train["HF_HOME"] == f"/fsx/cache {hostile}"
    ev = _run_header(prepared.eval_script, ["CKPT_DIR", "SUITE", "POLICY", "BASELINE"], tmp_path)
    assert ev["CKPT_DIR"] == f"{run_dir}/checkpoints"
    assert ev["SUITE"] == f"suite {hostile}"
    assert ev["POLICY"] == f"/p {hostile}"
    assert ev["BASELINE"] == f"/b {hostile}.json"
    assert not mark.exists() and canary.is_dir()
    for kind, script in (("train", prepared.train_script), ("eval", prepared.eval_script)):
        path = tmp_path / f"hostile.{kind}.sbatch"
        path.write_text(script)
        subprocess.run(["bash", "-n", str(path)], check=True)
        _shellcheck(path, "warning")  # info-level SC2016 ("$ in single quotes") is the point here
    assert not mark.exists() and canary.is_dir()


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _cluster_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs" / "demo"))
    code = main(["submit", str(recipe), "train.lr=2e-4", "--cluster", "local", "--dry-run", "--no-check-paths"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --job-name=demo\n" in out
    assert f"JOB_DIR={tmp_path}/runs/jobs/demo\n" in out
    assert not (tmp_path / "runs" / "jobs").exists()
