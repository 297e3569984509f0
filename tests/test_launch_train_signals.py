"""`hebtron train` under the signals Slurm sends (no Slurm needed): exit code 75 after a
checkpoint, a signal while still importing, two ranks agreeing on the step to stop after, and
the held (blocked) stop signals of hebtron.train.stop_signals on real processes: helpers
started meanwhile survive the signal, and none is orphaned by one arriving at exit.
(tests/test_stop_signal_checkpoints.py signals whole Megatron and FSDP runs.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hebtron.checkpoints import find_latest
from hebtron.train.commands import STOPPED_EXIT_CODE

from tests.train_fixtures import build_training_fixture, write_recipe

LONG = dict(schedule="constant", total_steps=1_000_000, eval_interval=0)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _train(recipe: Path, *overrides: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "hebtron.cli", "train", str(recipe), *overrides, "--resume", "auto"],
        stdout=out, stderr=subprocess.STDOUT, env=env or _env(),
    )


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip().endswith("}"))


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _signal_bit(pid: int, field: str, sig: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except FileNotFoundError:
        pass
    return False


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for ``sig`` (SigCgt in /proc)."""
    return _signal_bit(pid, "SigCgt", sig)


def _holds(pid: int, sig: int) -> bool:
    """Whether the process has ``sig`` blocked or handled: hebtron's code has run its first line."""
    return _signal_bit(pid, "SigBlk", sig) or _catches(pid, sig)


@pytest.mark.slow
def test_usr1_checkpoints_and_exits_75(fixture_dir, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(fixture_dir, run, **LONG)
    proc = _train(recipe, "checkpoint.interval=1000", log=tmp_path / "log")
    try:
        _wait(lambda: _steps(run) >= 5, 120, "5 training steps")
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    log = (tmp_path / "log").read_text()
    assert code == STOPPED_EXIT_CODE, log
    steps = _steps(run)
    latest = find_latest(run / "checkpoints")
    assert latest is not None and latest.name == f"step_{steps:08d}", log
    assert f"stopped by a signal at step {steps}; continue with --resume auto" in log


def test_signal_while_importing_is_not_fatal(fixture_dir, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(fixture_dir, run, **LONG)
    proc = _train(recipe, log=tmp_path / "log")
    try:
        # the first handler for USR1 is the command's own, installed before torch is imported
        _wait(lambda: _catches(proc.pid, signal.SIGUSR1) or proc.poll() is not None, 60, "a USR1 handler")
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    log = (tmp_path / "log").read_text()
    assert code == STOPPED_EXIT_CODE, log
    assert "signal 10 before training started: stopping (nothing new to save)" in log
    assert _steps(run) == 0


@pytest.mark.slow
def test_a_stop_signal_at_any_moment_of_the_start_exits_75(fixture_dir, tmp_path):
    """SIGTERM 0.1 s, 1 s and 3 s after launch: while the command modules are imported (the stop
    signals are blocked first thing in hebtron.cli.run), while torch and the engine load, and once
    training runs. Each ends with exit 75, never a death by the signal, and saves a checkpoint only
    where a step was trained since the last one.

    Before hebtron.cli.run the interpreter runs site.py (about 40 ms here, over 0.1 s on a loaded
    node) and no Python code can take a signal: a 0.1 s attempt that finds the process not yet
    there is repeated (up to 5 times), and one attempt must land with hebtron holding the signal."""
    landed_early = 0
    for attempt in range(5):
        run = tmp_path / f"run0.1-{attempt}"
        recipe = write_recipe(fixture_dir, run, **LONG)
        started = time.monotonic()
        proc = _train(recipe, "checkpoint.interval=1000", log=tmp_path / f"log0.1-{attempt}")
        try:
            time.sleep(max(0.0, started + 0.1 - time.monotonic()))
            held = _holds(proc.pid, signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
        if held:
            log = (tmp_path / f"log0.1-{attempt}").read_text()
            assert code == STOPPED_EXIT_CODE, (attempt, log[-2000:])
            assert find_latest(run / "checkpoints") is None and "signal 15" in log, log[-2000:]
            break
        landed_early += 1  # still in the interpreter's own start: outside what hebtron can catch
    else:
        pytest.fail("in 5 tries the interpreter never reached hebtron.cli.run within 0.1 s")

    procs = {}
    started = time.monotonic()
    for delay in (1.0, 3.0):
        run = tmp_path / f"run{delay}"
        recipe = write_recipe(fixture_dir, run, **LONG)
        procs[delay] = (_train(recipe, "checkpoint.interval=1000", log=tmp_path / f"log{delay}"), run)
    try:
        for delay, (proc, _) in procs.items():
            time.sleep(max(0.0, started + delay - time.monotonic()))
            proc.send_signal(signal.SIGTERM)
        codes = {delay: proc.wait(timeout=120) for delay, (proc, _) in procs.items()}
    finally:
        for proc, _ in procs.values():
            proc.kill()
    for delay, (_, run) in procs.items():
        log = (tmp_path / f"log{delay}").read_text()
        assert codes[delay] == STOPPED_EXIT_CODE, (delay, log[-2000:])
        steps = _steps(run)
        latest = find_latest(run / "checkpoints")
        if steps == 0:
            assert latest is None and "signal 15" in log, (delay, log[-2000:])
        else:
            assert latest is not None and latest.name == f"step_{steps:08d}", (delay, log[-2000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(fixture_dir, tmp_path):
    """Slurm may signal ranks at different moments; they must still checkpoint together."""
    run = tmp_path / "run"
    recipe = write_recipe(fixture_dir, run, **LONG)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(_train(recipe, "parallel.dp=2", "checkpoint.interval=1000", env=env, log=tmp_path / f"log{rank}"))
    try:
        _wait(lambda: _steps(run) >= 5 and _catches(procs[1].pid, signal.SIGUSR1), 120, "5 steps on two ranks")
        procs[1].send_signal(signal.SIGUSR1)  # rank 1 only
        codes = [p.wait(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp_path / f"log{r}").read_text() for r in (0, 1)]
    assert codes == [STOPPED_EXIT_CODE, STOPPED_EXIT_CODE], logs
    steps = _steps(run)
    latest = find_latest(run / "checkpoints")
    assert latest is not None and latest.name == f"step_{steps:08d}"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["extra"]["world_size"] == 2


_HOLD_PROBE = '''
import json, multiprocessing as mp, os, signal, subprocess, sys, time
from hebtron.train.stop_signals import StopSignals, blocked

def masks(pid):
    lines = open(f"/proc/{pid}/status").read().splitlines()
    return {k: int(v, 16) for k, v in (l.split(":") for l in lines) if k in ("SigBlk", "SigIgn")}

if __name__ == "__main__":
    stops = StopSignals().hold()
    os.kill(os.getpid(), signal.SIGTERM)  # stays pending: no handler runs, the process lives
    time.sleep(0.2)
    out = {"received_while_held": list(stops.received)}
    with blocked():  # what MegatronEngine.save_checkpoint does around megatron-core's writer
        manager = mp.get_context("spawn").Manager()  # the helper megatron-core spawns at the first save
    queue = manager.Queue()
    os.kill(manager._process.pid, signal.SIGTERM)  # Slurm signals every process of the step
    os.kill(manager._process.pid, signal.SIGUSR1)
    time.sleep(0.5)
    queue.put("still there")
    out["manager_answers"] = queue.get(timeout=10)
    out["manager"] = masks(manager._process.pid)
    out["exec_child"] = int(subprocess.run(["sed", "-n", "s/^SigBlk:\\\\t//p", "/proc/self/status"],
                                           capture_output=True, text=True).stdout, 16)
    out["taken"] = stops.take()
    manager.shutdown()
    stops.release()
    out["after_release"] = masks(os.getpid())["SigBlk"]
    out["handler_back"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    print(json.dumps(out))
'''


def test_held_stop_signals_wait_for_the_rank_and_helpers_inherit_them(tmp_path):
    """The mechanism of hebtron.train.stop_signals on real processes: a SIGTERM to the holder
    waits, pending, for ``take``; a helper spawned meanwhile (even after CPython's resource
    tracker would have unblocked SIGTERM) lives through SIGTERM and SIGUSR1; release puts the
    mask and the handlers back."""
    probe = tmp_path / "probe.py"
    probe.write_text(_HOLD_PROBE)
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120,
                          env=_env(), cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    bits = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
    assert out["received_while_held"] == [] and out["taken"] == signal.SIGTERM
    assert out["manager_answers"] == "still there" and out["manager"]["SigBlk"] & bits == bits
    assert out["exec_child"] & bits == bits
    assert out["after_release"] & bits == 0 and out["handler_back"]


_EXIT_PROBE = '''
import multiprocessing as mp, os, signal, sys, time
from hebtron.train.stop_signals import StopSignals, blocked

if __name__ == "__main__":
    stops = StopSignals().hold()
    with blocked():
        manager = mp.get_context("spawn").Manager()
    queue = manager.Queue()
    print(manager._process.pid, flush=True)
    stops.release(keep_handlers=sys.argv[1] == "keep")  # what `hebtron train` does on its way out
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. torchrun stopping the ranks after another one failed
    time.sleep(0.5)
'''


@pytest.mark.parametrize("how", ["keep", "restore"])
def test_a_stop_signal_while_exiting_leaves_no_helper_behind(tmp_path, how):
    """Helpers started with the signals blocked outlive a rank that dies of one; ``hebtron train``
    therefore exits through its exit handlers, which shut them down, whatever arrives late."""
    probe = tmp_path / "probe.py"
    probe.write_text(_EXIT_PROBE)
    out = tmp_path / "out"
    with open(out, "w") as fh:  # a file, not a pipe: an orphaned helper would hold a pipe open
        proc = subprocess.Popen([sys.executable, str(probe), how], stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                cwd=Path(__file__).resolve().parents[1])
        code = proc.wait(timeout=120)
    helper = int(out.read_text().split()[0])

    def gone() -> bool:
        try:
            return "zombie" in Path(f"/proc/{helper}/status").read_text()
        except FileNotFoundError:
            return True

    try:
        if how == "keep":
            _wait(gone, 10, "the helper to go")
        else:
            time.sleep(2)
        alive = not gone()
    finally:
        if how == "restore":
            try:
                os.kill(helper, signal.SIGKILL)  # the orphan this case makes
            except ProcessLookupError:
                pass
    if how == "keep":
        assert code == 0 and not alive, out.read_text()
    else:  # the failure kept out of `hebtron train`: died of the signal, helper orphaned
        assert code == -signal.SIGTERM and alive
