"""Checkpoint saves under faults, on real filesystems and real runs of ``hebtron train``.

- A tmpfs too small for a save: one line, exit 74, no scratch left, ``latest`` untouched (it
  still loads), and after the tmpfs is enlarged ``--resume auto`` gives the losses of an
  uninterrupted run bit for bit. The same for a checkpoint directory remounted read-only mid-run.
- ``checkpoint.prune_before_save`` with room for exactly ``keep_last`` checkpoints: the run completes
  (without it, it stops at the third save).
- A stop signal on an interval step saves once. A re-save swaps atomically; a kill between the
  two renames of the fallback swap is repaired at the next start, the step kept.
- The step that aborts a run is the last record of metrics.jsonl, in TensorBoard too.

The suite runs as root, so the tests mount tmpfs (and skip, saying why, where they cannot).
Training runs in this process through ``hebtron.cli.main`` (about a second each); the kill at
the swap's exact moment is a real SIGKILL in a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hebtron.checkpoints import COMPLETE_FILE, find_latest, stale_scratch
from hebtron.cli import main
from hebtron.train.checkpoint import exchange_paths, load_checkpoint
from hebtron.train.storage import checkpoint_bytes

from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
pytestmark = pytest.mark.usefixtures("one_thread")  # the child process below runs one thread too: same sums


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")


@pytest.fixture(scope="module")
def reference(fixture_dir, tmp_path_factory) -> dict:
    """An uninterrupted 12-step run (checkpoints every 4 steps, all kept): its losses, its
    checkpoints and the disk one checkpoint takes on tmpfs (whole pages)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    recipe = write_recipe(fixture_dir, run)
    assert main(["train", str(recipe), "checkpoint.keep_last=0"]) == 0
    step = run / "checkpoints" / "step_00000004"
    pages = sum(-(-p.stat().st_size // PAGE) * PAGE for p in step.iterdir() if p.is_file())
    return {"losses": _losses(run), "run": run, "fixture": fixture_dir, "pages": pages,
            "bytes": checkpoint_bytes(step)}


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _train(capsys, recipe: Path, *args: str) -> tuple[int, str]:
    """``hebtron train`` in this process: (exit code, stderr); stdout stays in ``capsys``' buffer."""
    capsys.readouterr()
    code = main(["train", str(recipe), *args])
    captured = capsys.readouterr()
    print(captured.out, end="")
    return code, captured.err.strip()


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err})")
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (not root, or no mount namespace): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _no_scratch(root: Path) -> None:
    leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]
    assert leftovers == [], leftovers


def test_a_full_disk_at_the_second_save_is_one_line_and_resume_is_exact(reference, tmp_path, capsys):
    """Room for one checkpoint and a half: the second save is refused before it writes (free
    space below the previous checkpoint's size); then more room, and the run continues exactly."""
    run = tmp_path / "run"
    recipe = write_recipe(reference["fixture"], run)
    with tmpfs(tmp_path / "disk", reference["pages"] * 3 // 2) as disk:
        code, err = _train(capsys, recipe, f"checkpoint.dir={disk}")
        assert code == 74 and len(err.splitlines()) == 1, err
        assert "No space left on device" in err and str(disk) in err and "free" in err and "needs about" in err
        _no_scratch(disk)
        assert find_latest(disk) == disk / "step_00000004"
        load_checkpoint(disk / "step_00000004")  # latest still loads
        _mount("-o", f"remount,size={reference['pages'] * 4}", str(disk))
        code, err = _train(capsys, recipe, f"checkpoint.dir={disk}", "--resume", "auto")
        assert code == 0, err
        assert find_latest(disk) == disk / "step_00000012"
    assert _losses(run) == reference["losses"]  # bit for bit (JSON floats round-trip exactly)


def test_a_disk_full_in_the_middle_of_a_write_leaves_no_scratch(reference, tmp_path, capsys):
    """Half a checkpoint of room: the write itself fails with ENOSPC (torch.save's RuntimeError,
    safetensors' own error); one line, the partial directory removed, no latest."""
    run = tmp_path / "run"
    recipe = write_recipe(reference["fixture"], run)
    with tmpfs(tmp_path / "disk", reference["pages"] // 2) as disk:
        code, err = _train(capsys, recipe, f"checkpoint.dir={disk}")
        assert code == 74 and len(err.splitlines()) == 1, err
        assert "No space left on device (ENOSPC)" in err and "step_00000004.tmp-" in err and "removed" in err, err
        assert sorted(p.name for p in disk.iterdir()) == []


def test_a_checkpoint_dir_remounted_read_only_mid_run(reference, tmp_path, capsys, monkeypatch):
    """The directory goes read-only between the first and the second save (at the second save's
    start, so the moment is the same on every machine): one line, exit 74; rw again, resume exact."""
    from hebtron.train import loop

    run = tmp_path / "run"
    recipe = write_recipe(reference["fixture"], run)
    real = loop.ensure_room
    calls = []

    def read_only_at_the_second_save(root, *args, **kwargs):
        calls.append(root)
        if len(calls) == 2:
            _mount("-o", "remount,ro", str(root))
        return real(root, *args, **kwargs)

    monkeypatch.setattr(loop, "ensure_room", read_only_at_the_second_save)
    with tmpfs(tmp_path / "disk", reference["pages"] * 8) as disk:
        code, err = _train(capsys, recipe, f"checkpoint.dir={disk}")
        assert code == 74 and len(err.splitlines()) == 1, err
        assert "Read-only file system (EROFS)" in err and str(disk) in err, err
        monkeypatch.undo()
        _mount("-o", "remount,rw", str(disk))
        _no_scratch(disk)
        assert find_latest(disk) == disk / "step_00000004"
        code, err = _train(capsys, recipe, f"checkpoint.dir={disk}", "--resume", "auto")
        assert code == 0, err
    assert _losses(run) == reference["losses"]


def test_prune_before_save_fits_keep_last_in_exactly_that_room(reference, tmp_path, capsys):
    """Room for two checkpoints and a half, keep_last 2: the third save needs the oldest gone
    first. Without prune_before_save the run stops there (one line, 74); with it, it completes."""
    with tmpfs(tmp_path / "disk", reference["pages"] * 5 // 2) as disk:
        recipe = write_recipe(reference["fixture"], tmp_path / "without")
        code, err = _train(capsys, recipe, f"checkpoint.dir={disk}")
        assert code == 74 and "prune_before_save" in err, err
        assert find_latest(disk) == disk / "step_00000008"
        for step in disk.glob("step_*"):
            subprocess.run(["rm", "-rf", str(step)], check=True)
        (disk / "latest").unlink()
        run = tmp_path / "with"
        recipe = write_recipe(reference["fixture"], run)
        code, err = _train(capsys, recipe, f"checkpoint.dir={disk}", "checkpoint.prune_before_save=true")
        assert code == 0, err
        assert sorted(p.name for p in disk.iterdir()) == ["latest", "step_00000008", "step_00000012"]
    assert _losses(run) == reference["losses"]


def test_a_stop_signal_on_an_interval_step_saves_once(reference, tmp_path, capsys, monkeypatch):
    from hebtron.backends.native_engine import NativeEngine

    run = tmp_path / "run"
    recipe = write_recipe(reference["fixture"], run)
    saves: list[int] = []
    real_step, real_save = NativeEngine.train_step, NativeEngine.save

    def step(self, plan):
        result = real_step(self, plan)
        if plan.step == 4:  # SIGUSR1 lands during interval step 4; held (blocked), taken after it
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        return result

    def save(self, root, step_number, *args, **kwargs):
        saves.append(step_number)
        return real_save(self, root, step_number, *args, **kwargs)

    monkeypatch.setattr(NativeEngine, "train_step", step)
    monkeypatch.setattr(NativeEngine, "save", save)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 75
    out = capsys.readouterr().out
    assert saves == [4], (saves, out)
    assert "stopping at step 4 (its checkpoint is on disk)" in out
    assert find_latest(run / "checkpoints") == run / "checkpoints" / "step_00000004"


def test_a_re_save_is_swapped_in_atomically(reference, tmp_path, capsys):
    """Resumed from step 4, the run saves step 8 again while latest names it: exchanged in one
    rename (renameat2), so latest never names a missing directory; nothing left behind."""
    run = tmp_path / "run"
    recipe = write_recipe(reference["fixture"], run)
    ckpts = tmp_path / "ckpts"
    subprocess.run(["cp", "-a", str(reference["run"] / "checkpoints"), str(ckpts)], check=True)
    (ckpts / "latest").write_text("step_00000008\n")
    old = {s: (ckpts / f"step_0000000{s}" / COMPLETE_FILE).stat().st_ino for s in (4, 8)}
    code, err = _train(capsys, recipe, f"checkpoint.dir={ckpts}", "checkpoint.keep_last=0",
                       "--resume", str(ckpts / "step_00000004"))
    assert code == 0, err
    assert (ckpts / "step_00000004" / COMPLETE_FILE).stat().st_ino == old[4]
    assert (ckpts / "step_00000008" / COMPLETE_FILE).stat().st_ino != old[8]  # the new copy is in place
    assert find_latest(ckpts) == ckpts / "step_00000012"
    _no_scratch(ckpts)


def test_exchange_paths_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    if not exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or filesystem")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


KILL_IN_SWAP = r"""
import os, signal, sys
from hebtron.cli import main
from hebtron.train import checkpoint

checkpoint.exchange_paths = lambda a, b: False  # a filesystem without RENAME_EXCHANGE: two renames
real_rename = os.rename

def rename(src, dst):
    real_rename(src, dst)
    if ".trash-" in os.fspath(dst):  # the existing step_N moved aside; its new copy not yet in place
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_inside_the_re_save_swap_is_repaired_at_the_next_start(reference, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(reference["fixture"], run)
    ckpts = tmp_path / "ckpts"
    subprocess.run(["cp", "-a", str(reference["run"] / "checkpoints"), str(ckpts)], check=True)
    subprocess.run(["rm", "-rf", str(ckpts / "step_00000012")], check=True)
    (ckpts / "latest").write_text("step_00000008\n")
    script = tmp_path / "kill_in_swap.py"
    script.write_text(KILL_IN_SWAP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), "train", str(recipe), f"checkpoint.dir={ckpts}",
                           "checkpoint.keep_last=0", "--resume", str(ckpts / "step_00000004")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the exact moment: latest names step 8, which is gone; both of its copies lie under scratch names
    assert (ckpts / "latest").read_text().strip() == "step_00000008" and not (ckpts / "step_00000008").exists()
    assert {p.name.split(".")[1].split("-")[0] for p in stale_scratch(ckpts)} == {"tmp", "trash"}
    code, err = _train(capsys, recipe, f"checkpoint.dir={ckpts}", "checkpoint.keep_last=0", "--resume", "auto")
    out = capsys.readouterr().out
    assert code == 0, err
    assert "restored step_00000008" in out and "at step 8" in out, out
    assert (ckpts / "step_00000008").is_dir() and find_latest(ckpts) == ckpts / "step_00000012"
    assert _losses(run) == {s: v for s, v in reference["losses"].items() if s > 4}  # 5-8 killed run, 9-12 resumed
    _no_scratch(ckpts)


def test_the_aborting_step_is_the_last_record_in_metrics_and_tensorboard(reference, tmp_path, capsys):
    """An early kill (any rise of the raw loss, at LR 1) ends the run with exit 3; the record of
    the step that killed it, with the reason, is the file's last, and TensorBoard has it too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = write_recipe(reference["fixture"], run, lr=1.0, schedule="constant", warmup_tokens=0,
                          early_kill={"enabled": True, "window_steps": 12, "margin": 0.0, "beta": 0.0})
    code, err = _train(capsys, recipe, "logging.tensorboard=true")
    assert code == 3, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert "early kill at step" in last["aborted"] and f"step {last['step']}:" in last["aborted"], last
    assert [r["step"] for r in records] == list(range(1, last["step"] + 1))
    assert all("aborted" not in r for r in records[:-1])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("aborted")] == [last["step"]]
    assert "aborted/text_summary" in events.Tags()["tensors"]
