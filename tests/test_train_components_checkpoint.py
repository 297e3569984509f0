"""Atomic checkpoints: bitwise round trip, crashes at every point of a save, pruning, damage.

(What other commands may do to a save in progress: tests/test_checkpoint_layout.py.)"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hebtron.checkpoints import checkpoint_problem, find_latest, list_checkpoints, mark_keep, scratch_tag
from hebtron.errors import CheckpointError
from hebtron.train.checkpoint import capture_rng, load_checkpoint, prune_checkpoints, restore_rng, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(13, 8)
        self.mixer = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 13, bias=False)
        self.lm_head.weight = self.embeddings.weight  # tied
        self.register_buffer("scale_bf16", torch.randn(5).to(torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.mixer(self.embeddings(ids))))


def trained(seed: int = 0) -> tuple[Net, torch.optim.AdamW]:
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        step(net, opt)
    return net, opt


def step(net: Net, opt: torch.optim.Optimizer) -> None:
    ids = torch.arange(12).remainder(13).view(2, 6)
    loss = net(ids).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def save(root: Path, s: int, keep_last: int | None = None, value: float | None = None) -> Path:
    state = {"w": torch.full((4,), float(s if value is None else value))}
    return save_checkpoint(root, s, state, {"state": {}}, {"tokens": s * 100}, keep_last)


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    net, opt = trained()
    extra = {"tokens": 1234, "schedule": {"lr_scale": 1.5}, "rng": capture_rng()}
    expect_py, expect_np, expect_torch = random.random(), np.random.rand(3), torch.rand(3)

    path = save_checkpoint(tmp_path, 7, net.state_dict(), opt.state_dict(), extra, keep_last=3)
    assert path == tmp_path / "step_00000007"
    assert (tmp_path / "latest").read_text().strip() == "step_00000007"
    model_state, optim_state, got = load_checkpoint(path)

    for k, v in net.state_dict().items():
        assert model_state[k].dtype == v.dtype and torch.equal(model_state[k], v), k
    assert model_state["lm_head.weight"] is model_state["embeddings.weight"]  # tie survives
    assert got["step"] == 7 and got["tokens"] == 1234 and got["schedule"] == {"lr_scale": 1.5}

    net2, opt2 = trained(seed=1)
    net2.load_state_dict(model_state)
    opt2.load_state_dict(optim_state)
    step(net, opt)
    step(net2, opt2)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    restore_rng(got)  # accepts the whole extra
    assert random.random() == expect_py
    assert np.array_equal(np.random.rand(3), expect_np)
    assert torch.equal(torch.rand(3), expect_torch)


def test_shared_storage_views_are_saved_independently(tmp_path: Path) -> None:
    base = torch.arange(10, dtype=torch.float32)
    state = {"all": base, "head": base[:4], "tail": base[6:], "t": torch.ones(3, 2).t(),
             "empty": torch.zeros(0)}
    model_state, _, _ = load_checkpoint(save_checkpoint(tmp_path, 1, state))
    for k, v in state.items():
        assert torch.equal(model_state[k], v), k


def test_extra_must_be_json_and_nothing_is_left_behind(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, None, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    assert find_latest(tmp_path) is None
    assert find_latest(tmp_path / "nope") is None


def test_failed_rename_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save(tmp_path, 1)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert find_latest(tmp_path) == tmp_path / "step_00000001"
    assert not (tmp_path / f"step_00000002.tmp-{scratch_tag()}").exists()  # the failed save removed its scratch
    save(tmp_path, 3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_00000001", "step_00000003"]


CRASH_SCRIPT = textwrap.dedent("""
    import os, shutil, signal, sys, torch
    from hebtron.train import checkpoint as ck
    root, point = sys.argv[1], sys.argv[2]

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    ck.save_checkpoint(root, 1, {"w": torch.ones(256, 256)}, {"s": 1}, {"tokens": 1})
    if point == "model_written":
        ck.fsync_file = die                # right after model.safetensors is written
    elif point == "before_rename":
        os.rename = die                    # tmp dir complete, not yet renamed
    elif point == "before_latest":
        os.replace = die                   # renamed, pointer not yet switched
    elif point == "mid_prune":
        ck.shutil.rmtree = die             # step 1 renamed to trash, not yet deleted
    ck.save_checkpoint(root, 2, {"w": torch.full((256, 256), 2.0)}, {"s": 2}, {"tokens": 2},
                       keep_last=1)
    print("survived")
""")


@pytest.mark.parametrize("point, expected_step", [
    ("model_written", 1), ("before_rename", 1), ("before_latest", 1), ("mid_prune", 2),
])
def test_sigkill_during_save_never_exposes_incomplete(tmp_path: Path, point: str,
                                                      expected_step: int) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), point],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(".tmp-" in p.name or ".trash-" in p.name for p in tmp_path.iterdir()) or \
        point == "before_latest"
    pointed = tmp_path / (tmp_path / "latest").read_text().strip()
    assert checkpoint_problem(pointed) is None  # the pointer itself, before any fallback
    scratch = sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".trash-" in p.name)
    latest = find_latest(tmp_path)
    assert latest == pointed == tmp_path / f"step_{expected_step:08d}"
    model_state, optim_state, extra = load_checkpoint(latest)
    assert torch.all(model_state["w"] == expected_step)
    assert optim_state == {"s": expected_step} and extra["tokens"] == expected_step
    # looking and loading leave the dead writer's scratch alone; the next save removes it
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".trash-" in p.name) == scratch
    save(tmp_path, 3)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]


LOOP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from hebtron.train.checkpoint import save_checkpoint
    root = sys.argv[1]
    big = torch.randn(4 * 1024 * 1024)  # 16 MiB per checkpoint
    for s in range(1, 1000):
        big[0] = s
        save_checkpoint(root, s, {"w": big}, {"step": s}, {"step_seen": s}, keep_last=2)
        print(s, flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.029])
def test_sigkill_at_arbitrary_moment(tmp_path: Path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", LOOP_SCRIPT, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 2:
                break
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    pointed = tmp_path / (tmp_path / "latest").read_text().strip()
    assert checkpoint_problem(pointed) is None
    latest = find_latest(tmp_path)
    assert latest == pointed
    model_state, optim_state, extra = load_checkpoint(latest)
    s = extra["step"]
    assert s >= 2 and model_state["w"][0].item() == s and optim_state == {"step": s}
    assert extra["step_seen"] == s


def test_keep_last_prunes_but_protects_latest_and_keep(tmp_path: Path) -> None:
    for s in range(1, 6):
        save(tmp_path, s, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    mark_keep(tmp_path / "step_00000004", "passed eval gate")
    for s in range(6, 8):
        save(tmp_path, s, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 7]
    (tmp_path / "latest").write_text("step_00000004\n")  # e.g. rolled back by hand
    save(tmp_path, 8)
    (tmp_path / "latest").write_text("step_00000007\n")
    assert prune_checkpoints(tmp_path, 1) == []  # 4 has KEEP, 7 is latest, 8 is newest
    (tmp_path / "step_00000004" / "KEEP").unlink()
    assert prune_checkpoints(tmp_path, 1) == [tmp_path / "step_00000004"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7, 8]


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 3, value=1.0)
    save(tmp_path, 3, value=9.0)
    model_state, _, _ = load_checkpoint(find_latest(tmp_path))
    assert torch.all(model_state["w"] == 9.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


def test_truncated_file_is_detected_and_skipped(tmp_path: Path) -> None:
    save(tmp_path, 1)
    bad = save(tmp_path, 2)
    model = bad / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(bad)
    assert find_latest(tmp_path) == tmp_path / "step_00000001"


def test_missing_and_incomplete_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "step_00000009")
    path = save(tmp_path, 1)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="COMPLETE"):
        load_checkpoint(path)
    assert find_latest(tmp_path) is None
    (tmp_path / "latest").write_text("../../etc\n")
    assert find_latest(tmp_path) is None


def _rewrite_same_size(path: Path, payload: bytes) -> None:
    size = path.stat().st_size
    path.write_bytes(payload[:size].ljust(size, b" "))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_damaged_contents_raise_checkpoint_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": torch.zeros(64)}, {"state": {}}, {"a": 1})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    optim = path / "optimizer.pt"
    original = optim.read_bytes()
    evil = pickle.dumps(Evil())
    optim.write_bytes(evil)
    manifest = json.loads((path / "COMPLETE").read_text())
    manifest["files"]["optimizer.pt"] = len(evil)
    (path / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(path)  # weights_only refuses to run the pickle
    model_state, optim_state, _ = load_checkpoint(path, load_optimizer=False)
    assert optim_state is None and torch.equal(model_state["w"], torch.zeros(64))

    optim.write_bytes(original)
    manifest["files"]["optimizer.pt"] = len(original)
    (path / "COMPLETE").write_text(json.dumps(manifest))
    _rewrite_same_size(path / "trainer_state.json", b"{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        load_checkpoint(path)
    _rewrite_same_size(path / "model.safetensors", b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)


def test_dtensor_like_state_is_refused(tmp_path: Path) -> None:
    class FakeDTensor(torch.Tensor):
        def full_tensor(self):  # pragma: no cover - never called
            return self

    t = torch.zeros(2).as_subclass(FakeDTensor)
    with pytest.raises(TypeError, match="DTensor"):
        save_checkpoint(tmp_path, 1, {"w": t})


def test_scratch_of_live_writer_is_left_alone(tmp_path: Path) -> None:
    save(tmp_path, 1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"step_00000002.tmp-{scratch_tag(sleeper.pid)}"
        live.mkdir()
        assert find_latest(tmp_path) == tmp_path / "step_00000001"
        save(tmp_path, 3)
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    find_latest(tmp_path)
    assert live.exists()  # a lookup never deletes
    save(tmp_path, 4)
    assert not live.exists()  # the next writer does, once the writer is gone
    assert checkpoint_problem(tmp_path / "step_00000001") is None
