"""The companion watch job on a real single-node Slurm (slurm/local/start.sh): `hebtron submit
--eval-suite S --eval-every 1` runs a toy training job and, beside it with no dependency, the
watch job; every checkpoint gets exactly one results file, the watch job ends after the training
job, `hebtron eval select` picks a checkpoint and writes KEEP, and `hebtron jobs` shows it.

Slurm missing is an error, not a skip (as in tests/test_slurm.py, whose cluster fixture this
module shares); HEBTRON_SKIP_SLURM_TESTS=1 skips.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_eval_fixtures import write_demo_corpus, write_suite
from tests.test_slurm import REPO, cluster  # noqa: F401 - the module-scoped local Slurm fixture
from hebtron.train.metrics import read_metrics
from tests.train_fixtures import build_training_fixture, write_recipe

pytestmark = pytest.mark.slow  # a real Slurm


def test_watch_job_beside_training_then_select_keep_and_jobs_show_the_best(cluster, tmp_path_factory):  # noqa: F811
    work = cluster.workdir
    fixture = build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")
    eval_root = tmp_path_factory.getbasetemp() / "watch_eval"
    write_demo_corpus(eval_root / "data")
    from hebtron.demo.minisuite import build_mini_suite

    build_mini_suite(eval_root / "data", eval_root / "eval")
    suite = write_suite(eval_root / "tiny.yaml", eval_root / "eval" / "tasks", limit=4)
    policy = eval_root / "tiny.gate.yaml"
    shutil.copy(REPO / "eval" / "suites" / "hebrew-mini.gate.yaml", policy)
    profile = yaml.safe_load((REPO / "slurm" / "local.yaml").read_text())
    profile["paths"]["jobs"] = str(work / "runs" / "jobs")
    profile["eval"]["poll"] = 1  # seconds between the watcher's looks (30 on a cluster)
    profile_path = work / "watch-profile.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    run_dir = work / "runs" / "watched"
    recipe = write_recipe(fixture, run_dir, total_steps=8, eval_interval=0)

    done = cluster.hebtron("submit", str(recipe), "checkpoint.interval=4", "--cluster", str(profile_path),
                           "--eval-suite", str(suite), "--eval-every", "1")
    job_dir = Path(re.search(r"job dir: (.*)\n", done.stderr).group(1))
    record = json.loads((job_dir / "job.json").read_text())
    train_id, watch_id = done.stdout.strip(), record["watch_job_id"]
    assert record["train_job_id"] == train_id and watch_id and record["eval_job_id"] is None
    train_log, watch_log = job_dir / f"slurm-{train_id}.out", job_dir / f"slurm-watch-{watch_id}.out"
    # beside training: the watch job starts while training is still queued or running
    cluster.wait_state(watch_id, {"RUNNING", "COMPLETED"}, 30, watch_log)
    assert cluster.wait_state(train_id, {"COMPLETED", "FAILED"}, 60, train_log) == "COMPLETED", train_log.read_text()
    assert cluster.wait_state(watch_id, {"COMPLETED", "FAILED"}, 90, watch_log) == "COMPLETED", watch_log.read_text()

    ckpt_dir = run_dir / "checkpoints"
    steps = sorted(p.name for p in ckpt_dir.glob("step_*"))
    assert steps == ["step_00000004", "step_00000008"], steps
    for name in steps:  # one result per checkpoint, evaluated once
        result = json.loads((ckpt_dir / name / "eval" / "tiny.json").read_text())
        assert result["hebtron"]["status"] == "ok" and result["hebtron"]["step"] == int(name[5:])
    state = json.loads((ckpt_dir / "eval-watch" / "tiny.json").read_text())
    assert state["evaluated"] == {"4": "ok", "8": "ok"} and state["final_step"] == 8
    assert watch_log.read_text().count("eval watch: step ") == 2, watch_log.read_text()
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]  # beside the loss, in the run dir
    assert [r["step"] for r in evals] == [4, 8] and all(r["suite"] == "tiny" for r in evals)

    for keep in ckpt_dir.glob("step_*/KEEP"):  # the watcher's own selection; select must write it again
        keep.unlink()
    shutil.rmtree(ckpt_dir / "select", ignore_errors=True)
    selected = cluster.hebtron(*("eval", "select", str(run_dir), "--suite", str(suite), "--policy", str(policy)))
    chosen = int(re.search(r"KEEP: step (\d+)", selected.stdout).group(1))
    assert [p.parent.name for p in ckpt_dir.glob("step_*/KEEP")] == [f"step_{chosen:08d}"]

    listing = cluster.hebtron("jobs", "--jobs-dir", str(work / "runs" / "jobs"), "--json").stdout
    row = {r["train_job_id"]: r for r in map(json.loads, listing.splitlines())}[train_id]
    assert (row["watch_job_id"], row["watch_state"], row["train_state"]) == (watch_id, "COMPLETED", "COMPLETED")
    assert row["best_step"] == chosen and row["best_checkpoint"] == str(ckpt_dir / f"step_{chosen:08d}")
    table = cluster.hebtron("jobs", "--jobs-dir", str(work / "runs" / "jobs")).stdout
    assert f"{watch_id} (watch)" in table and f"step {chosen} (tiny)" in table

