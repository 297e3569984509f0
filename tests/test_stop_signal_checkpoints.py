"""A stop signal sent to every process, as Slurm sends it, still gets its checkpoint.

Slurm delivers SIGTERM (``scontrol requeue``, preemption, scancel) to every process of the job
step, and torchrun forwards the signal it gets with ``killpg`` to each rank's process group
(torch.distributed.elastic starts ranks with ``start_new_session``). So a rank's helper processes
get the signal too: megatron-core's checkpoint writer keeps a spawned ``multiprocessing.Manager``
from the first save on, and with the default disposition it died at once; the save at the stop
step then failed with ``BrokenPipeError`` and the run resumed from the previous interval. A
SIGTERM sent to the rank alone never showed it. These tests send the signal the way it arrives:

- ranks started one per process (as ``srun`` starts tasks) in one process group, and
  ``killpg``: every rank and every helper gets SIGTERM; each rank exits 75;
- the resume runs under torchrun, as ``slurm/train.sbatch.j2`` runs it (SIGTERM to every process
  under torchrun, as Slurm sends it on a requeue, is tests/test_slurm_megatron.py's, on a real Slurm).

Each time the checkpoint at the stop step must be complete and ``latest``, and ``--resume auto``
must continue from it (the losses against an uninterrupted run: the Slurm tests). Megatron on 2 gloo
ranks (dp=2) and native on 2 FSDP ranks; the native test also checks its sharded checkpoint
against one uninterrupted process, resumed in one process and exported.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hebtron.checkpoints import checkpoint_problem, find_latest
from hebtron.train.commands import STOPPED_EXIT_CODE
from tests.train_fixtures import build_training_fixture, stop_saves, write_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning:megatron.*")]
# constant LR and no step budget: every run follows one trajectory; the stop step decides the rest
ENDLESS = dict(schedule="constant", total_steps=1_000_000, eval_interval=0)
INTERVAL = 4
AFTER = 3  # steps the resumed run makes past the stop step


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", **extra}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in record:
            out.append((record["step"], record["loss"]))
    return out


def _wait(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(p.read_text()[-3000:] for p in logs if p.exists())
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.1)


class Run:
    """One training run of ``recipe`` on 2 ranks, as separate processes or under torchrun."""

    def __init__(self, recipe: Path, run_dir: Path, overrides: list[str], log_dir: Path) -> None:
        self.recipe, self.run_dir, self.overrides, self.log_dir = recipe, run_dir, overrides, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _args(self, *extra: str) -> list[str]:
        return ["-m", "hebtron.cli", "train", str(self.recipe), *self.overrides, *extra, "--resume", "auto"]

    def _open(self, name: str):
        path = self.log_dir / name
        self.logs.append(path)
        return open(path, "w")  # noqa: SIM115 - the child holds it; closed when we drop it

    def start_ranks(self, *extra: str) -> None:
        """Two ``hebtron train`` processes in one new process group, like two srun tasks."""
        port = str(_port())
        for rank in (0, 1):
            env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            group = self.procs[0].pid if self.procs else 0  # rank 0 leads a new group; rank 1 joins it
            with self._open(f"rank{rank}.log") as log:
                self.procs.append(subprocess.Popen([sys.executable, *self._args(*extra)], cwd=REPO, env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, process_group=group))

    def start_torchrun(self, *extra: str) -> None:
        """torchrun with the launch options of slurm/train.sbatch.j2, in its own session."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_port()}",
               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=120",
               *self._args(*extra)]
        with self._open("torchrun.log") as log:
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def wait(self, timeout: float = 300) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
                p.wait()

    def text(self) -> str:
        return "\n".join(p.read_text() for p in self.logs)


def _interrupt(run: Run, send, after_step: int) -> None:
    """Wait for a checkpoint and ``after_step`` logged steps, then ``send`` the signal."""
    ckpts = run.run_dir / "checkpoints"

    def ready() -> bool:
        assert all(p.poll() is None for p in run.procs), f"a process ended early\n{run.text()[-4000:]}"
        return find_latest(ckpts) is not None and len(_losses(run.run_dir)) >= after_step

    try:
        _wait(ready, 400, f"a checkpoint and step {after_step}", run.logs)
        send()
    except BaseException:
        run.kill()
        raise


def _check_stop(run: Run, before: int) -> int:
    """The stop step's checkpoint is complete and ``latest``; returns that step."""
    text = run.text()
    saved = stop_saves(text, 15)
    assert saved, text[-6000:]
    step = saved[-1]
    assert step >= before, (step, before)
    latest = find_latest(run.run_dir / "checkpoints")
    assert latest is not None and latest.name == f"step_{step:08d}", (latest, text[-6000:])
    assert checkpoint_problem(latest) is None
    # no rank failed: the one traceback allowed is torchrun's own way out on SIGTERM
    tracebacks = text.count("Traceback (most recent call last)")
    torchrun_exits = len(re.findall(r"SignalException: Process \d+ got signal", text))
    assert "BrokenPipeError" not in text and tracebacks == torchrun_exits, text[-6000:]
    assert f"stopped by a signal at step {step}; continue with --resume auto" in text
    return step


def _every_step_once(run_dir: Path, steps: int) -> None:
    """The stopped and the resumed run together logged steps 1..steps, each once, in order.
    (That the losses equal an uninterrupted run's is checked where the same stop and resume
    run under Slurm: tests/test_slurm_megatron.py for Megatron, tests/test_slurm.py for native.)"""
    assert [s for s, _ in _losses(run_dir)] == list(range(1, steps + 1)), "every step logged once, in order"


def _retarget(overrides: list[str], run_dir: Path) -> list[str]:
    out = [o for o in overrides if not o.startswith(("logging.run_dir=", "checkpoint.dir="))]
    return [*out, f"logging.run_dir={run_dir}", f"checkpoint.dir={run_dir / 'checkpoints'}"]


def test_megatron_saves_at_the_stop_step_when_every_process_gets_sigterm(fixture_dir, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe(fixture_dir, run_dir, **ENDLESS)
    overrides = _retarget(["backend=megatron", "parallel.dp=2", f"checkpoint.interval={INTERVAL}"], run_dir)

    # 1. srun-style ranks in one process group: killpg reaches both ranks and their helpers
    first = Run(recipe, run_dir, overrides, tmp_path / "logs1")
    first.start_ranks()
    _interrupt(first, lambda: os.killpg(first.procs[0].pid, signal.SIGTERM), INTERVAL + 2)
    assert first.wait(180) == [STOPPED_EXIT_CODE, STOPPED_EXIT_CODE], first.text()[-6000:]
    stop1 = _check_stop(first, INTERVAL + 2)

    # 2. resumed under torchrun, as the job script runs it, to the end. (SIGTERM to every process under torchrun, what Slurm's proctrack
    # does on a requeue, is tests/test_slurm_megatron.py's job, on a real Slurm.)
    last = Run(recipe, run_dir, [*overrides, f"train.total_steps={stop1 + AFTER}"], tmp_path / "logs3")
    last.start_torchrun()
    assert last.wait(300) == [0], last.text()[-4000:]
    assert re.search(rf"resumed from \S+step_0*{stop1} at step {stop1}\b", last.text())
    _every_step_once(run_dir, stop1 + AFTER)


def test_native_fsdp_saves_at_the_stop_step_when_every_process_gets_sigterm(fixture_dir, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe(fixture_dir, run_dir, **ENDLESS)
    # keep_last 0: the stop step's checkpoint stays for the checks after the resume
    overrides = _retarget(["parallel.dp=2", f"checkpoint.interval={INTERVAL}", "checkpoint.keep_last=0"], run_dir)

    first = Run(recipe, run_dir, overrides, tmp_path / "logs1")
    first.start_ranks()
    _interrupt(first, lambda: os.killpg(first.procs[0].pid, signal.SIGTERM), INTERVAL + 2)
    assert first.wait(180) == [STOPPED_EXIT_CODE, STOPPED_EXIT_CODE], first.text()[-6000:]
    stop = _check_stop(first, INTERVAL + 2)

    last = Run(recipe, run_dir, [*overrides, f"train.total_steps={stop + AFTER}"], tmp_path / "logs2")
    last.start_ranks()
    assert last.wait(300) == [0, 0], last.text()[-4000:]
    assert re.search(rf"resumed from \S+step_0*{stop} at step {stop}\b", last.text())
    _every_step_once(run_dir, stop + AFTER)
    _sharded_checkpoint_resumes_anywhere_and_exports(recipe, run_dir, stop, tmp_path)


def _sharded_checkpoint_resumes_anywhere_and_exports(recipe: Path, run_dir: Path, stop: int, tmp_path: Path) -> None:
    """FSDP2 checkpoints are sharded (each rank wrote its own shards with
    torch.distributed.checkpoint, nothing gathered to rank 0): the dp=2 run, stopped and resumed,
    has the losses of one uninterrupted process (dp=2 equals it within 1e-5 relative per loss:
    the gradients agree within 1e-4, tests/test_train_loop.py), the same checkpoint resumes in one
    process with those losses, and its HF export (the one place that gathers) holds the
    uninterrupted run's weights at that step."""
    from hebtron.checkpoints import SHARDED_DIR, is_sharded_checkpoint
    from hebtron.cli import main as hebtron_main
    from hebtron.model.hf import load_hf

    ckpt = run_dir / "checkpoints" / f"step_{stop:08d}"
    assert is_sharded_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in (ckpt / SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    one = tmp_path / "one"
    total = [f"train.total_steps={stop + AFTER}", f"checkpoint.interval={stop}"]
    assert hebtron_main(["train", str(recipe), *_retarget(total, one)]) == 0
    reference = dict(_losses(one))
    for step, loss in _losses(run_dir):
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, loss, reference[step])

    single = tmp_path / "single"
    assert hebtron_main(["train", str(recipe), *_retarget(total, single), "--resume", str(ckpt)]) == 0
    resumed = _losses(single)
    assert [s for s, _ in resumed] == list(range(stop + 1, stop + AFTER + 1))
    for step, loss in resumed:
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, loss, reference[step])

    assert hebtron_main(["export", str(ckpt), "--hf", str(tmp_path / "export")]) == 0
    exported = load_hf(tmp_path / "export").state_dict()
    uninterrupted = load_hf(one / "checkpoints" / f"step_{stop:08d}").state_dict()
    assert exported.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert (ckpt / "hf" / "model.safetensors").is_file()  # the conversion, cached beside the shards
