"""hebtron submit on a real single-node Slurm (slurm/local/start.sh): auto-resume after the
time-limit signal, with losses equal to an uninterrupted run; the stop save on `scontrol
requeue` and the restart limit (the requeue that resumes runs on the Megatron backend, in
tests/test_slurm_megatron.py); a chained evaluation that writes a gate verdict; hostile recipe values that
stay inert on the way through sbatch, bash, srun and torchrun.

All jobs are submitted at once (the node offers 4 one-CPU slots) and the tests then follow
them, so the module takes about as long as its slowest job. Slurm missing is an error, not a
skip: `make test` installs it (slurm/local/install-deps.sh). HEBTRON_SKIP_SLURM_TESTS=1 skips,
visibly, on machines where that is intended.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from hebtron.launch.submit import safe_name
from tests.test_eval_fixtures import build_tiny_checkpoint, write_demo_corpus, write_suite
from tests.train_fixtures import build_training_fixture, stop_saves, write_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a real Slurm, jobs of minutes
START, STOP = REPO / "slurm" / "local" / "start.sh", REPO / "slurm" / "local" / "stop.sh"
NEEDED = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel")
# One recipe for the interrupted run and its reference: a constant LR and no step budget, so
# every run follows the same trajectory and the tests stop them when they have seen enough.
ENDLESS = dict(schedule="constant", total_steps=1_000_000, eval_interval=0)
AFTER_RESUME = 40  # steps a resumed run must make before we compare it


# --------------------------------------------------------------------------------- helpers
def _which(cmd: str) -> bool:
    return shutil.which(cmd) is not None or Path("/usr/sbin", cmd).exists()


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def _wait(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.5)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        out.append((record["step"], record["loss"]))
    return out


class Cluster:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir = env, workdir
        self.stopped = False

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(list(cmd), env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def hebtron(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "hebtron.cli", *args)

    def state(self, job_id: str) -> str:
        done = self.run("squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T", check=False)
        return done.stdout.strip()

    def wait_state(self, job_id: str, states: set[str], timeout: float, log: Path | None = None) -> str:
        return _wait(lambda: self.state(job_id) if self.state(job_id) in states else "", timeout,
                     f"job {job_id} in {states} (now {self.state(job_id)!r})", log)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.environ.get("HEBTRON_SKIP_SLURM_TESTS") == "1":
        pytest.skip("HEBTRON_SKIP_SLURM_TESTS=1")
    missing = [c for c in NEEDED if not _which(c)]
    if missing:
        pytest.fail(f"Slurm is not installed here (missing {', '.join(missing)}); "
                    "run slurm/local/install-deps.sh (make test does)", pytrace=False)
    state = Path(tempfile.mkdtemp(prefix="hbslurm-", dir="/tmp"))  # short: munge's socket path
    env = dict(os.environ, HEBTRON_SLURM_DIR=str(state), HEBTRON_SLURM_PORT=str(_free_port_pair()),
               HEBTRON_SLURM_CPUS="4", PATH=os.environ.get("PATH", "") + ":/usr/sbin")
    env.pop("SLURM_CONF", None)
    done = subprocess.run([str(START)], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f"slurm/local/start.sh failed:\n{done.stderr}", pytrace=False)
    env["SLURM_CONF"] = re.fullmatch(r"export SLURM_CONF=(\S+)\n", done.stdout).group(1)
    workdir = tmp_path_factory.mktemp("slurm_work")
    yield Cluster(env, workdir)
    subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submit every job of the module at once; the tests below follow them."""
    work = cluster.workdir
    fixture = build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")

    # The interrupted run (its uninterrupted reference runs afterwards, for as many steps).
    base = yaml.safe_load((REPO / "slurm" / "local.yaml").read_text())
    base["paths"]["jobs"] = str(work / "runs" / "jobs")
    profiles = {}
    # slurmctld checks time limits every 30 s and sends the warning up to 30 s early: with a
    # 2-minute limit and signal_seconds 60, USR1 lands 30 to 60 s after each start.
    for name, changes in {"timelimit": {"time": "2", "signal_seconds": 60, "max_restarts": 1}}.items():
        profiles[name] = work / f"{name}.yaml"
        profiles[name].write_text(yaml.safe_dump(base | changes))

    def endless(name: str) -> Path:
        return write_recipe(fixture, work / "runs" / name, **ENDLESS)

    submitted: dict[str, dict] = {}
    common = ["checkpoint.interval=50", "logging.log_interval=50"]
    for name, cluster_arg in (("timelimit", str(profiles["timelimit"])),):
        recipe = endless(name)
        out = cluster.hebtron("submit", str(recipe), *common, "--cluster", cluster_arg).stdout.strip()
        submitted[name] = {"id": out, "run_dir": work / "runs" / name, "recipe": recipe, "overrides": common,
                           "log": work / "runs" / "jobs" / name / f"slurm-{out}.out"}

    # The demo job: a short run chained to an evaluation; its run directory's name is hostile.
    token = uuid.uuid4().hex[:8]
    mark, canary = Path(f"/tmp/hebtron-pwned-{token}"), work / "canary"
    canary.mkdir()
    hostile = f"demo $(touch {mark}) `touch {mark}-tick` ; rm -rf {canary} ; echo"
    run_dir = work / "runs" / hostile
    recipe = write_recipe(fixture, run_dir, total_steps=40, eval_interval=20)
    eval_root = tmp_path_factory.getbasetemp() / "slurm_eval"
    baseline = build_tiny_checkpoint(eval_root / "baseline")
    write_demo_corpus(eval_root / "data")
    from hebtron.demo.minisuite import build_mini_suite

    build_mini_suite(eval_root / "data", eval_root / "eval")
    suite = write_suite(eval_root / "tiny.yaml", eval_root / "eval" / "tasks", limit=4)
    shutil.copy(REPO / "eval" / "suites" / "hebrew-mini.gate.yaml", eval_root / "tiny.gate.yaml")
    done = cluster.hebtron("submit", str(recipe), "checkpoint.interval=20", "--cluster", "local",
                           "--eval-suite", str(suite), "--eval-baseline", str(baseline))
    record = json.loads((Path(re.search(r"job dir: (.*)\n", done.stderr).group(1)) / "job.json").read_text())
    submitted["demo"] = {"id": done.stdout.strip(), "record": record, "run_dir": run_dir, "mark": mark,
                         "canary": canary, "log": Path(record["job_dir"]) / f"slurm-{done.stdout.strip()}.out"}
    yield submitted
    if not cluster.stopped:
        for job in submitted.values():
            cluster.run("scancel", job["id"], check=False)


def _compare_with_uninterrupted(cluster: Cluster, run: dict) -> int:
    """The job's per-step losses equal those of the same recipe run once, uninterrupted, for as
    many steps: one rank with the job's environment (slurm/local.yaml: one thread), started after
    the job, so no reference job spins for as long as the interrupted one is followed."""
    losses = _losses(run["run_dir"])
    steps = [s for s, _ in losses]
    assert steps == list(range(1, len(steps) + 1)), "every step logged once, in order"
    reference = run["run_dir"].parent / f"{run['run_dir'].name}-reference"
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "hebtron.cli", "train", str(run["recipe"]), *run["overrides"],
         f"logging.run_dir={reference}", f"checkpoint.dir={reference / 'checkpoints'}", f"train.total_steps={len(steps)}"],
        env=env, cwd=cluster.workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ref = dict(_losses(reference))
    mismatched = [(s, loss, ref.get(s)) for s, loss in losses if loss != ref.get(s)]
    assert not mismatched, f"losses differ from the uninterrupted run at {mismatched[:5]}"
    return len(losses)


# ------------------------------------------------------------------------------------ tests
def test_local_slurm_is_up_and_start_is_idempotent(cluster):
    assert cluster.run("sinfo", "--noheader", "--format=%T").stdout.strip() in ("idle", "mixed", "allocated")
    state = Path(cluster.env["HEBTRON_SLURM_DIR"])
    pids = {p.name: p.read_text() for p in state.glob("*.pid")}
    again = subprocess.run([str(START)], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr
    assert again.stdout == f"export SLURM_CONF={cluster.env['SLURM_CONF']}\n"
    assert {p.name: p.read_text() for p in state.glob("*.pid")} == pids
    conf = Path(cluster.env["SLURM_CONF"]).read_text()
    assert "CPUs=4" in conf and f"StateSaveLocation={state}/state" in conf


def test_time_limit_signal_and_requeue_resume_with_the_same_losses_and_restarts_are_limited(cluster, jobs):
    """The time-limit USR1 checkpoints, requeues and resumes at its step; then ``scontrol
    requeue`` (SIGTERM to every process of the job) saves at its stop step and, max_restarts
    being 1, brings the job back only to give up. (A requeue that resumes: the Megatron job of
    tests/test_slurm_megatron.py.)"""
    job, log = jobs["timelimit"], jobs["timelimit"]["log"]

    def resumed_after_signal():
        text = log.read_text() if log.exists() else ""
        for step in stop_saves(text, 10):
            if step > 0 and re.search(rf"resumed from \S+step_0*{step} at step {step}\b", text):
                return step
        return None

    step = _wait(resumed_after_signal, 240, "a time-limit signal, a checkpoint and a resume from it", log)
    text = log.read_text()
    assert "checkpoint saved on USR1" in text and "start 2 " in text
    _wait(lambda: len(_losses(job["run_dir"])) >= step + AFTER_RESUME, 180, "steps after the resume", log)
    cluster.run("scontrol", "requeue", job["id"])
    cluster.wait_state(job["id"], {"FAILED"}, 180, log)
    text = log.read_text()
    assert stop_saves(text, 15), text[-4000:]
    assert "the job was restarted 2 times (limit 1); giving up" in text
    assert text.count("resumed from") == 1
    _compare_with_uninterrupted(cluster, job)


def test_chained_evaluation_writes_a_verdict_and_hostile_values_stay_inert(cluster, jobs):
    demo, record = jobs["demo"], jobs["demo"]["record"]
    assert cluster.wait_state(demo["id"], {"COMPLETED", "FAILED"}, 240, demo["log"]) == "COMPLETED", demo["log"].read_text()
    eval_id = record["eval_job_id"]
    eval_log = Path(record["job_dir"]) / f"slurm-eval-{eval_id}.out"
    final = cluster.wait_state(eval_id, {"COMPLETED", "FAILED", "CANCELLED"}, 300, eval_log)
    latest = demo["run_dir"] / "checkpoints" / "step_00000040"
    assert (demo["run_dir"] / "checkpoints" / "latest").read_text().strip() == latest.name
    verdict = json.loads((latest / "eval" / "tiny.verdict.json").read_text())
    assert verdict["verdict"] in ("accept", "reject"), eval_log.read_text()
    assert verdict["step"] == 40 and verdict["checkpoint"] == str(latest)
    assert final == ("COMPLETED" if verdict["verdict"] == "accept" else "FAILED")
    gate = json.loads((latest / "eval" / "tiny.gate.json").read_text())
    assert gate["verdict"] == verdict["verdict"]
    assert (latest / "KEEP").exists() == (verdict["verdict"] == "accept")
    assert (Path(record["job_dir"]) / "eval" / "tiny.baseline.json").is_file()  # the baseline model, evaluated first
    # the run directory's $(...), backticks and "; rm -rf" went through sbatch, bash, srun, torchrun, lm-eval
    assert not demo["mark"].exists() and not Path(f"{demo['mark']}-tick").exists()
    assert demo["canary"].is_dir()
    assert record["name"] == safe_name(demo["run_dir"].name) == Path(record["job_dir"]).name
    listing = cluster.hebtron("jobs", "--jobs-dir", str(cluster.workdir / "runs" / "jobs"), "--json").stdout
    rows = {row["train_job_id"]: row for row in map(json.loads, listing.splitlines())}
    row = rows[demo["id"]]
    assert row["train_state"] == "COMPLETED" and row["eval_state"] == final
    assert row["step"] == 40 and row["verdict"] == f"{verdict['verdict']} (step 40)"
    assert rows[jobs["timelimit"]["id"]]["train_state"] == "FAILED"  # it gave up after its restart
    table = cluster.hebtron("jobs", "--jobs-dir", str(cluster.workdir / "runs" / "jobs")).stdout
    assert table.startswith("NAME") and f"{verdict['verdict']} (step 40)" in table


def test_stop_is_idempotent(cluster, jobs):
    for job in jobs.values():
        cluster.run("scancel", job["id"], check=False)
    state = Path(cluster.env["HEBTRON_SLURM_DIR"])
    pids = [int(p.read_text()) for p in state.glob("*.pid")]
    assert len(pids) == 3
    for _ in range(2):
        done = subprocess.run([str(STOP)], env=cluster.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        cluster.stopped = True
    assert not list(state.glob("*.pid"))
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
