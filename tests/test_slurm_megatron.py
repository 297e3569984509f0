"""The cluster job end to end on the Megatron backend, on a real single-node Slurm.

``hebtron submit`` of a tiny hybrid ``backend: megatron`` recipe (Mamba, attention, MoE) on 2
ranks (dp=2, one torchrun per node as on HyperPod), with ``--eval-suite hebrew-mini``, from a
directory other than the repository (the one that holds ``runs/demo/eval/tasks``, as after
``hebtron data demo``):

- training runs; ``scontrol requeue`` mid-run makes every process of the step get SIGTERM
  (ranks, torchrun and megatron-core's writer helpers), the ranks save at the step they stopped
  (the log shows it) and the requeued job resumes from that step, not from the previous interval;
- the job runs in its job directory, not where submit ran (``paths.workdir`` defaults to it);
- the chained evaluation converts the Megatron checkpoint to HF on the fly, evaluates it and the
  baseline, gates, and writes ``KEEP`` on the accepted checkpoint;
- the per-step losses equal those of an uninterrupted job of the same recipe.

The gate policy here accepts any scores (a tiny random model against a tiny random baseline
decides nothing): the test is about the chain; tests/test_gate.py tests the gate's judgement.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.test_eval_fixtures import build_tiny_checkpoint, write_demo_corpus
from tests.test_slurm import REPO, Cluster, _losses, _wait, cluster  # noqa: F401 - cluster: the fixture
from tests.train_fixtures import build_training_fixture, stop_saves, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning:megatron.*")]
STEPS, INTERVAL = 160, 40  # room for the requeue to land mid-run on a fast machine
LENIENT_GATE = {
    "suite": "hebrew-mini",
    "description": "accepts any scores: the Slurm test checks the chain, not the model",
    "tasks": {"hebrew_mini_translation": {"metric": "chrf", "max_drop": 100.0, "scale": 0.01},
              "hebrew_mini_next_sentence": {"metric": "acc_mutual_info", "max_drop": 1.0},
              "hebrew_mini_cloze": {"metric": "acc", "max_drop": 1.0}},
    "aggregate": {"min_gain": -1.0},
}


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):  # noqa: F811 - the imported fixture
    """The requeued job with its evaluation chain, and the uninterrupted reference, submitted at once."""
    work = cluster.workdir
    assert not str(work).startswith(str(REPO))
    fixture = build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")
    # what `hebtron data demo` leaves in a project directory: the mini suite's tasks
    from hebtron.demo.minisuite import build_mini_suite

    write_demo_corpus(work / "demo_data")
    build_mini_suite(work / "demo_data", work / "runs" / "demo" / "eval")
    baseline = build_tiny_checkpoint(tmp_path_factory.getbasetemp() / "mega_baseline")
    policy = work / "lenient.gate.yaml"
    policy.write_text(yaml.safe_dump(LENIENT_GATE))

    profile = yaml.safe_load((REPO / "slurm" / "local.yaml").read_text())
    profile |= {"procs_per_node": 2, "cpus_per_task": 2, "max_restarts": 3}
    # tests/test_slurm.py's cluster runs at the same time, numbering its jobs from 1 as well: its
    # rendezvous ports are 29500 + job id, these 30500 + job id
    profile["rdzv_port"] = 30500
    profile["paths"] = {"jobs": str(work / "runs" / "jobs")}
    (work / "local2.yaml").write_text(yaml.safe_dump(profile))

    overrides = ["backend=megatron", f"checkpoint.interval={INTERVAL}", "logging.log_interval=20"]
    submitted = {}
    for name, extra in (("mega", ["--eval-suite", "hebrew-mini", "--eval-policy", str(policy),
                                  "--eval-baseline", str(baseline)]),
                        ("mega-reference", [])):
        recipe = write_recipe(fixture, work / "runs" / name, schedule="constant", total_steps=STEPS, eval_interval=0)
        done = cluster.hebtron("submit", str(recipe), *overrides, "--cluster", str(work / "local2.yaml"), *extra)
        job_dir = Path(re.search(r"job dir: (.*)\n", done.stderr).group(1))
        job_id = done.stdout.strip()
        submitted[name] = {"id": job_id, "job_dir": job_dir, "run_dir": work / "runs" / name,
                           "record": json.loads((job_dir / "job.json").read_text()),
                           "log": job_dir / f"slurm-{job_id}.out"}
    yield submitted
    if not cluster.stopped:
        for job in submitted.values():
            for key in ("train_job_id", "eval_job_id"):
                if job["record"].get(key):
                    cluster.run("scancel", job["record"][key], check=False)


def test_megatron_job_survives_requeue_at_its_stop_step_and_its_checkpoint_is_kept(
        cluster: Cluster, jobs):  # noqa: F811 - the imported fixture
    job, log = jobs["mega"], jobs["mega"]["log"]
    ckpts = job["run_dir"] / "checkpoints"

    # the job runs in its job directory, with the suite's task dirs resolved where submit ran
    train_script = (job["job_dir"] / "train.sbatch").read_text()
    eval_script = (job["job_dir"] / "eval.sbatch").read_text()
    assert f"\nWORKDIR={job['job_dir']}\n" in train_script and f"\nWORKDIR={job['job_dir']}\n" in eval_script
    assert f"\nTASKS_DIRS=({cluster.workdir / 'runs' / 'demo' / 'eval' / 'tasks'})\n" in eval_script
    assert job["record"]["ranks"] == 2 and "parallel:\n  dp: 2" in (job["job_dir"] / "recipe.yaml").read_text()

    # requeue once the first interval checkpoint exists, while training goes on
    _wait(lambda: (ckpts / "latest").exists() and cluster.state(job["id"]) == "RUNNING"
          and len(_losses(job["run_dir"])) > INTERVAL, 600, "a first checkpoint", log)
    cluster.run("scontrol", "requeue", job["id"])
    resumed = _wait(lambda: re.search(r"resumed from \S+ at step (\d+)", log.read_text()), 600,
                    "the requeued job to resume", log)
    step = int(resumed.group(1))
    text = log.read_text()
    assert "start 2 " in text and step in stop_saves(text, 15), text[-4000:]
    assert re.search(rf"resumed from \S+step_0*{step} at step {step}\b", text)
    assert INTERVAL < step < STEPS and "BrokenPipeError" not in text

    # training completes; the chained evaluation converts, evaluates, gates and keeps
    assert cluster.wait_state(job["id"], {"COMPLETED", "FAILED"}, 900, log) == "COMPLETED", log.read_text()[-4000:]
    eval_id = job["record"]["eval_job_id"]
    eval_log = job["job_dir"] / f"slurm-eval-{eval_id}.out"
    final = cluster.wait_state(eval_id, {"COMPLETED", "FAILED", "CANCELLED"}, 900, eval_log)
    latest = ckpts / f"step_{STEPS:08d}"
    assert (ckpts / "latest").read_text().strip() == latest.name
    assert (latest / "megatron").is_dir()  # a Megatron checkpoint, evaluated as one
    verdict = json.loads((latest / "eval" / "hebrew-mini.verdict.json").read_text())
    assert final == "COMPLETED" and verdict["verdict"] == "accept", eval_log.read_text()[-4000:]
    assert verdict["step"] == STEPS and verdict["checkpoint"] == str(latest)
    assert (latest / "KEEP").is_file()
    results = json.loads((latest / "eval" / "hebrew-mini.json").read_text())
    assert set(results["results"]) >= set(LENIENT_GATE["tasks"]), results.keys()

    # the losses are those of the job that was never interrupted
    reference = jobs["mega-reference"]
    assert cluster.wait_state(reference["id"], {"COMPLETED", "FAILED"}, 900, reference["log"]) == "COMPLETED"
    losses = _losses(job["run_dir"])
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), "every step logged once, in order"
    mismatched = [(s, a, b) for (s, a), (_, b) in zip(losses, _losses(reference["run_dir"])) if a != b]
    assert not mismatched, f"losses differ from the uninterrupted run at {mismatched[:5]}"

