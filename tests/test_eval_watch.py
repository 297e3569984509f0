"""Benchmarks over a whole run: evaluation leases vs pruning, ``eval select`` on crafted result
sets, ``eval table``, and ``eval watch`` beside a real training process (killed and restarted)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hebtron.checkpoints import KEEP_FILE, LEASE_PREFIX, list_checkpoints, live_leases
from hebtron.cli import main
from hebtron.eval.config import Policy
from hebtron.eval.run_results import archive_path, evaluated_checkpoints, results_path
from hebtron.eval.select import plateau, select, write_selection
from hebtron.eval.watch import acquire_lease, release_lease
from hebtron.train.checkpoint import prune_checkpoints, save_checkpoint
from hebtron.train.metrics import read_metrics
from tests.test_eval_fixtures import eval_env  # noqa: F401  (pytest fixture)
from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]
POLICY = {"tasks": {"task_a": {"metric": "acc", "max_drop": 0.05},
                    "task_b": {"metric": "chrf", "max_drop": 5.0, "scale": 0.01}},
          "select": {"tie_margin": 0.005, "plateau_window": 2}}


def _checkpoints(root: Path, steps: list[int], keep_last: int | None = None) -> Path:
    for step in steps:
        save_checkpoint(root, step, {"w": torch.zeros(1)}, extra={"tokens": step * 100}, keep_last=keep_last)
    return root


def _results(acc: float, chrf: float, acc_se: float = 0.01, chrf_se: float = 0.5, status: str = "ok") -> dict:
    return {"results": {"task_a": {"acc,none": acc, "acc_stderr,none": acc_se},
                        "task_b": {"chrf,none": chrf, "chrf_stderr,none": chrf_se}},
            "higher_is_better": {"task_a": {"acc": True}, "task_b": {"chrf": True}},
            "hebtron": {"status": status}}


def _write_results(ckpt_dir: Path, step: int, payload: dict, tag: str = "suite") -> None:
    path = results_path(ckpt_dir / f"step_{step:08d}", tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


# ------------------------------------------------------------------------------ leases
def test_a_live_lease_keeps_a_checkpoint_from_pruning_and_a_dead_one_does_not(tmp_path):
    root = _checkpoints(tmp_path / "ck", [1, 2, 3])
    leased = acquire_lease(root / "step_00000001", "suite")
    assert leased is not None and live_leases(root / "step_00000001") == [leased]
    deleted = prune_checkpoints(root, keep_last=1)
    assert [p.name for p in deleted] == ["step_00000002"]
    assert (root / "step_00000001").is_dir()  # being evaluated: left alone
    release_lease(leased)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host_dead = root / "step_00000001" / f"{LEASE_PREFIX}{leased.name[len(LEASE_PREFIX):].rpartition('-')[0]}-{dead.stdout.strip()}"
    host_dead.write_text("{}")  # a killed evaluator's lease: its process is gone
    assert live_leases(root / "step_00000001") == []
    assert [p.name for p in prune_checkpoints(root, keep_last=1)] == ["step_00000001"]
    assert acquire_lease(root / "step_00000001", "suite") is None  # gone: no lease, the watcher skips it


def test_another_hosts_lease_lives_by_its_heartbeat(tmp_path):
    ckpt = _checkpoints(tmp_path / "ck", [1]) / "step_00000001"
    lease = ckpt / f"{LEASE_PREFIX}eval-node-7-4242"
    lease.write_text("{}")
    assert live_leases(ckpt) == [lease]
    old = time.time() - 3600
    os.utime(lease, (old, old))  # no heartbeat for an hour: that evaluator is gone
    assert live_leases(ckpt) == []


# ------------------------------------------------------------------------------ select
@pytest.fixture
def policy_file(tmp_path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY), encoding="utf-8")
    return path


def _select(ckpt: Path, policy_file: Path, baseline: Path | None = None):
    policy = Policy.model_validate(yaml.safe_load(policy_file.read_text()))
    return select(ckpt, "suite", policy, policy_file, baseline), policy


def test_select_picks_the_best_passing_checkpoint_and_breaks_ties_toward_later_steps(tmp_path, policy_file):
    ckpt = _checkpoints(tmp_path / "ck", [10, 20, 30, 40, 50])
    _write_results(ckpt, 10, _results(0.50, 20.0))  # first evaluated: the baseline
    _write_results(ckpt, 20, _results(0.58, 24.0))  # aggregate (0.58 + 0.24) / 2 = 0.41
    _write_results(ckpt, 30, _results(0.70, 10.0))  # best aggregate 0.40? no: task_b fell 10 > 5: fails
    _write_results(ckpt, 40, _results(0.57, 24.5))  # 0.4075: within the 0.005 tie margin of 0.41
    _write_results(ckpt, 50, _results(0.40, 30.0))  # task_a fell 0.10 > 0.05: fails
    sel, policy = _select(ckpt, policy_file)
    assert sel.chosen is not None and sel.chosen.step == 40 and sel.exit_code == 0
    by_step = {c.step: c for c in sel.candidates}
    assert not by_step[30].eligible and "task_b: regressed" in by_step[30].reasons[0]
    assert not by_step[50].eligible and "task_a: regressed" in by_step[50].reasons[0]
    assert math.isclose(by_step[20].aggregate, 0.41)
    md, js = write_selection(sel, policy, ckpt)
    assert (ckpt / "step_00000040" / KEEP_FILE).is_file() and json.loads(js.read_text())["chosen"]["step"] == 40
    assert "Keep step 40" in md.read_text()
    # a better checkpoint lands: the choice moves and select's earlier KEEP is withdrawn
    _checkpoints(ckpt, [60])
    _write_results(ckpt, 60, _results(0.62, 26.0))
    sel, policy = _select(ckpt, policy_file)
    write_selection(sel, policy, ckpt)
    assert sel.chosen.step == 60 and not (ckpt / "step_00000040" / KEEP_FILE).exists()
    assert main(["eval", "select", str(ckpt), "--suite", "suite", "--policy", str(policy_file)]) == 0


def test_select_fails_closed_on_missing_crashed_and_nan_results(tmp_path, policy_file, capsys):
    ckpt = _checkpoints(tmp_path / "ck", [10, 20, 30, 40])
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_results(0.5, 20.0)))
    _write_results(ckpt, 10, {"results": {}, "hebtron": {"status": "crashed", "error": "CUDA OOM"}})
    _write_results(ckpt, 20, _results(float("nan"), 25.0))
    missing = _results(0.9, 30.0)
    del missing["results"]["task_b"]
    _write_results(ckpt, 30, missing)
    (ckpt / "step_00000040" / "eval").mkdir()
    (ckpt / "step_00000040" / "eval" / "suite.json").write_text('{"results": {"task_a": ')  # torn write
    sel, _ = _select(ckpt, policy_file, base)
    assert sel.chosen is None and sel.exit_code == 1
    reasons = {c.step: " ".join(c.reasons) for c in sel.candidates}
    assert "crashed (CUDA OOM)" in reasons[10] and "nan" in reasons[20].lower()
    assert "task_b: missing" in reasons[30] and "not JSON" in reasons[40]
    assert main(["eval", "select", str(ckpt), "--suite", "suite", "--policy", str(policy_file),
                 "--baseline", str(base)]) == 1
    assert not any((p / KEEP_FILE).exists() for _, p in list_checkpoints(ckpt))
    bad_base = tmp_path / "crashed.json"
    bad_base.write_text(json.dumps({"results": {}, "hebtron": {"status": "crashed", "error": "x"}}))
    _write_results(ckpt, 30, _results(0.9, 30.0))
    sel, _ = _select(ckpt, policy_file, bad_base)  # an unusable baseline: nothing can be judged
    assert sel.chosen is None and "baseline" in sel.reasons[0]
    assert main(["eval", "select", str(ckpt), "--suite", "suite", "--policy", str(policy_file),
                 "--baseline", str(tmp_path / "nope.json")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_plateau_is_reported_when_nothing_rises_beyond_its_stderr(tmp_path, policy_file):
    flat = _checkpoints(tmp_path / "flat", [1, 2, 3, 4, 5])
    for step, (acc, chrf) in zip([1, 2, 3, 4, 5], [(0.40, 20), (0.55, 25), (0.56, 25.3), (0.555, 25.5), (0.56, 25.4)]):
        _write_results(flat, step, _results(acc, chrf))
    sel, _ = _select(flat, policy_file)
    assert sel.plateau.plateau is True and "steps 4-5" in sel.plateau.note
    rising = _checkpoints(tmp_path / "rising", [1, 2, 3, 4, 5])
    for step, acc in zip([1, 2, 3, 4, 5], [0.40, 0.45, 0.50, 0.55, 0.60]):
        _write_results(rising, step, _results(acc, 20.0))
    sel, _ = _select(rising, policy_file)
    assert sel.plateau.plateau is False and "task_a" in sel.plateau.improved
    assert plateau(sel.candidates[:2], 2).plateau is None  # too few evaluations to tell


# ------------------------------------------------------------------------------ table
def test_table_draws_benchmarks_beside_the_loss_and_keeps_pruned_points(tmp_path):
    run = tmp_path / "run"
    ckpt = _checkpoints(run / "checkpoints", [10, 20, 30])
    for step, acc in ((10, 0.3), (20, 0.4), (30, 0.35)):
        _write_results(ckpt, step, _results(acc, 20.0 + step))
    archive = archive_path(ckpt, "suite", 5)  # an evaluated checkpoint pruned since: its archived results
    archive.parent.mkdir(parents=True)
    archive.write_text(json.dumps(_results(0.2, 10.0) | {"hebtron": {"status": "ok", "tokens": 500}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": s * 100, "loss": 5 - s / 10}) + "\n"
                                               for s in range(1, 31)) +
                                       json.dumps({"step": 10, "kind": "eval", "eval/task_a/acc": 0.3}) + "\n")
    assert [e.step for e in evaluated_checkpoints(ckpt, "suite")] == [5, 10, 20, 30]
    assert main(["eval", "table", str(run)]) == 0
    text = (run / "eval_table.md").read_text()
    assert "| suite | 5 | 500 | 0.2 ± 0.01 |" in text and "| suite | 30 | 3,000 | 0.35 ± 0.01 |" in text
    assert (run / "eval_table.png").stat().st_size > 10_000


def test_vllm_backend_is_one_line_without_vllm(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "run", "--suite", "hebrew-mini", "--checkpoint", str(tmp_path), "--out", str(out),
                 "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--backend vllm: the vllm package is not installed" in err and "Traceback" not in err
    assert json.loads(out.read_text())["hebtron"]["status"] == "crashed"


# ------------------------------------------------------------------------------ watch beside training
@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")


def _watch_cmd(run: Path, suite: Path, poll: float = 0.2) -> list[str]:
    return [sys.executable, "-m", "hebtron.cli", "eval", "watch", str(run), "--suite", str(suite), "--poll", str(poll)]


@pytest.mark.slow
def test_watch_beside_training_evaluates_every_checkpoint_once(fixture_dir, tmp_path, eval_env):  # noqa: F811
    """Training (keep_last 2, a checkpoint every 2 steps) and the watcher run as two processes:
    every checkpoint gets exactly one result, none is pruned while it waits or is evaluated, pruning
    resumes once each is evaluated, and the watcher ends after the run's last checkpoint."""
    run = tmp_path / "run"
    recipe = write_recipe(fixture_dir, run, total_steps=10, eval_interval=0)
    raw = yaml.safe_load(recipe.read_text())
    raw["checkpoint"] = {"interval": 2, "keep_last": 2, "dir": str(run / "checkpoints")}
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    watcher = subprocess.Popen(_watch_cmd(run, eval_env["suite"], poll=0.05), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert watcher.stdout.readline().startswith("eval watch: watching")  # up before training starts
    trainer = subprocess.run([sys.executable, "-m", "hebtron.cli", "train", str(recipe)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert trainer.returncode == 0, trainer.stderr[-2000:]
    output = watcher.communicate(timeout=300)[0]
    assert watcher.returncode == 0, output[-3000:]
    evaluated = evaluated_checkpoints(run / "checkpoints", "test-mini")
    assert [e.step for e in evaluated] == [2, 4, 6, 8, 10], output[-3000:]
    assert all(e.problem is None for e in evaluated), [e.problem for e in evaluated]
    assert sorted(r["step"] for r in read_metrics(run) if r.get("kind") == "eval") == [2, 4, 6, 8, 10]
    assert "pruned" not in output
    kept = [p for _, p in list_checkpoints(run / "checkpoints")]  # the trainer outran the evaluations,
    assert len(kept) == 5 and not any(list(p.glob(f"{LEASE_PREFIX}*")) for p in kept)  # so its prunes waited
    assert len(prune_checkpoints(run / "checkpoints", keep_last=2)) == 3  # leases released: the next save prunes


@pytest.mark.slow
def test_a_killed_and_restarted_watcher_evaluates_nothing_twice(tmp_path, eval_env):  # noqa: F811
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    for step in (1, 2, 3, 4):
        shutil.copytree(eval_env["checkpoint"], ckpt_dir / f"step_{step:08d}")
    (run / "metrics.jsonl").write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(_watch_cmd(ckpt_dir, eval_env["suite"]), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    archive = ckpt_dir / "eval-watch" / "test-mini"
    deadline = time.time() + 120
    while not (archive.is_dir() and any(archive.glob("*.json"))) and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # during the second checkpoint's evaluation
    first.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in archive.glob("*.json")}
    assert 1 <= len(done_before) < 4
    again = subprocess.run(_watch_cmd(ckpt_dir, eval_env["suite"]) + ["--once"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in archive.glob("*.json") if p.name in done_before} == done_before
    assert sorted(r["step"] for r in read_metrics(run) if r.get("kind") == "eval") == [1, 2, 3, 4]
    leftover = [q for _, p in list_checkpoints(ckpt_dir) for q in p.glob(f"{LEASE_PREFIX}*")]
    assert not leftover, (leftover, again.stdout[-1500:])
    third = subprocess.run(_watch_cmd(ckpt_dir, eval_env["suite"]) + ["--once"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "0 evaluated now" in third.stdout, third.stdout + third.stderr


def test_the_token_axis_continues_past_the_last_checkpoint():
    """The step axis has margins; mapped by a clamped interpolation they all read as the last
    token count, and the top axis's ticks piled up at the right edge (seen on the demo's PNG)."""
    import numpy as np

    from hebtron.eval.table import _extrapolated

    steps, tokens = np.array([0.0, 50.0, 147.0]), np.array([0.0, 102_400.0, 301_056.0])
    assert _extrapolated(np.array([25.0, 160.0, -5.0]), steps, tokens) == pytest.approx(
        [51_200.0, 301_056.0 + 13 * 2048.0, -5 * 2048.0])
    assert _extrapolated(_extrapolated(160.0, steps, tokens), tokens, steps) == pytest.approx(160.0)
