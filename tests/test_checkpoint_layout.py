"""The checkpoint layout and what may touch a save in progress.

Issue 13's acceptance: a save in progress (a scratch directory of another host, and a live one
of a second process on this host) survives ``hebtron jobs``, ``recipe show``, ``export`` and
``eval run`` started meanwhile: read-only commands change nothing on disk. Only a writer removes
scratch entries, and only its own host's whose process is gone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from hebtron.checkpoints import (
    CheckpointRef,
    checkpoint_name,
    checkpoint_problem,
    checkpoint_tokenizer,
    find_latest,
    list_checkpoints,
    parse_scratch,
    resolve_checkpoint,
    scratch_path,
    scratch_tag,
    stale_scratch,
    this_host,
    tokenizer_dir,
    write_text_synced,
)
from hebtron.cli import main
from hebtron.errors import CheckpointError
from hebtron.train.checkpoint import publish_checkpoint, save_checkpoint
from tests.test_eval_fixtures import eval_env  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]
OTHER_HOST = "compute-node-17"


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry under ``root``: (is a directory, size, mtime); what a reader must not change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A live second process on this host (stands for a writer still saving)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def scratch_dir(path: Path, payload: bytes = b"half a model") -> Path:
    path.mkdir()
    (path / "model.safetensors").write_bytes(payload)
    (path / "megatron").mkdir()
    (path / "megatron" / "shard_0.distcp").write_bytes(payload * 3)
    return path


@pytest.fixture
def run_ckpts(eval_env, tmp_path: Path) -> Path:  # noqa: F811
    """A copy of the tiny training checkpoints directory (``step_00000007``, ``latest``)."""
    return Path(shutil.copytree(eval_env["checkpoint"].parent, tmp_path / "run" / "checkpoints"))


def test_save_in_progress_survives_read_only_commands(run_ckpts: Path, eval_env, sleeper, tmp_path: Path,  # noqa: F811
                                                      capsys) -> None:
    assert OTHER_HOST != this_host()
    other = scratch_dir(scratch_path(run_ckpts, checkpoint_name(8), "tmp", f"{OTHER_HOST}-{dead_pid()}"))
    live = scratch_dir(scratch_path(run_ckpts, checkpoint_name(9), "tmp", scratch_tag(sleeper.pid)))
    # a crashed writer's leftovers too: only a writer may remove them, never a reader
    gone = dead_pid()
    scratch_dir(scratch_path(run_ckpts, checkpoint_name(10), "tmp", scratch_tag(gone)))
    scratch_dir(run_ckpts / f"{checkpoint_name(11)}.tmp-{gone}")
    before = snapshot(run_ckpts)
    assert {other.name, live.name} <= set(before)

    # hebtron jobs: a submitted run whose checkpoints are being written
    jobs = tmp_path / "jobs"
    (jobs / "demo").mkdir(parents=True)
    (jobs / "demo" / "job.json").write_text(json.dumps(
        {"name": "demo", "job_dir": str(jobs / "demo"), "ckpt_dir": str(run_ckpts), "submitted_at": "2025-01-01"}))
    assert main(["jobs", "--jobs-dir", str(jobs)]) == 0
    assert "step 7" in capsys.readouterr().out
    assert snapshot(run_ckpts) == before

    # recipe show: model.hf_path names the checkpoints directory (resolved to its latest step)
    data = tmp_path / "data"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        (data / f"he_train{suffix}").write_bytes(b"")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"hf_path": str(run_ckpts)},
        "data": {"seq_len": 32, "sources": [{"name": "he", "path": str(data / "he_train"), "lang": "he"}]},
        "train": {"global_batch": 8, "micro_batch": 4, "lr": 1e-3, "total_steps": 2},
        "logging": {"run_dir": str(tmp_path / "run2")},
    }))
    assert main(["recipe", "show", str(recipe)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["hf_path"] == str(run_ckpts / "step_00000007")
    assert snapshot(run_ckpts) == before

    # export: the latest complete checkpoint, with the tokenizer its run recorded
    assert main(["export", str(run_ckpts), "--hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert snapshot(run_ckpts) == before

    # eval run on the mini suite
    out = tmp_path / "r.json"
    assert main(["eval", "run", "--suite", str(eval_env["suite"]), "--checkpoint", str(run_ckpts), "--out", str(out),
                 "--device", "cpu", "--limit", "2"]) == 0
    result = json.loads(out.read_text())["hebtron"]
    assert result["status"] == "ok" and result["checkpoint"] == str(run_ckpts.resolve() / "step_00000007")
    assert snapshot(run_ckpts) == before

    for scratch in (other, live):
        assert (scratch / "model.safetensors").read_bytes() == b"half a model"
        assert (scratch / "megatron" / "shard_0.distcp").read_bytes() == b"half a model" * 3


def _make_scratch(root: Path, sleeper_pid: int) -> tuple[list[Path], list[Path]]:
    """(entries a writer of this host may remove, entries it must keep)."""
    gone = dead_pid()
    stale = [
        scratch_dir(scratch_path(root, checkpoint_name(2), "tmp", scratch_tag(gone))),
        scratch_dir(scratch_path(root, checkpoint_name(1), "trash", scratch_tag(gone))),
        scratch_dir(root / f"{checkpoint_name(3)}.tmp-{gone}"),  # name from before hosts were recorded
    ]
    latest_tmp = scratch_path(root, "latest", "tmp", scratch_tag(gone))
    latest_tmp.write_text("step_00000002\n")
    stale.append(latest_tmp)
    keep = [
        scratch_dir(scratch_path(root, checkpoint_name(2), "tmp", f"{OTHER_HOST}-{gone}")),
        scratch_dir(scratch_path(root, checkpoint_name(4), "tmp", f"{OTHER_HOST}-{sleeper_pid}")),
        scratch_dir(scratch_path(root, checkpoint_name(5), "tmp", scratch_tag(sleeper_pid))),
        scratch_dir(root / f"{checkpoint_name(6)}.tmp-{sleeper_pid}"),
    ]
    return stale, keep


def test_save_removes_only_this_hosts_dead_scratch(tmp_path: Path, sleeper) -> None:
    root = tmp_path / "ckpts"
    save_checkpoint(root, 1, {"w": torch.zeros(4)})
    stale, keep = _make_scratch(root, sleeper.pid)
    before = snapshot(root)

    # lookups only look
    assert find_latest(root) == root / "step_00000001"
    assert [s for s, _ in list_checkpoints(root)] == [1]
    assert resolve_checkpoint(root).step == 1
    assert stale_scratch(root) == sorted(stale)
    assert snapshot(root) == before

    save_checkpoint(root, 7, {"w": torch.ones(4)})
    assert find_latest(root) == root / "step_00000007"
    assert not any(p.exists() for p in stale)
    for p in keep:
        assert (p / "model.safetensors").read_bytes() == b"half a model", p
    assert stale_scratch(root) == []


def test_publish_removes_dead_scratch_but_not_its_own(tmp_path: Path, sleeper) -> None:
    """The Megatron saver writes its own scratch directory and hands it to publish_checkpoint."""
    root = tmp_path / "ckpts"
    root.mkdir()
    stale, keep = _make_scratch(root, sleeper.pid)
    tmp = scratch_path(root, checkpoint_name(3))  # this process's: must survive until renamed
    tmp.mkdir()
    write_text_synced(tmp / "trainer_state.json", json.dumps({"format": 1, "step": 3, "extra": {}}))
    (tmp / "megatron").mkdir()
    (tmp / "megatron" / "shard.distcp").write_bytes(b"weights")

    final = publish_checkpoint(tmp, root, 3)
    assert final == find_latest(root) == root / "step_00000003" and checkpoint_problem(final) is None
    assert (final / "megatron" / "shard.distcp").read_bytes() == b"weights"
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


MEGATRON_SAVE = """
import sys
from pathlib import Path
import torch.distributed as dist
from hebtron.backends.megatron import checkpoint as mcheckpoint

root = Path(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{root.parent / 'store'}", rank=0, world_size=1)

class Engine:  # what mcheckpoint.save needs of MegatronEngine: a rank and a sharded save
    rank = 0
    def save_checkpoint(self, path):
        path.mkdir(parents=True)
        (path / "shard.distcp").write_bytes(b"weights")

final = mcheckpoint.save(Engine(), root, 5, {"tokens": 1}, "{}")
print(final.name)
dist.destroy_process_group()
"""


def test_megatron_saver_names_its_scratch_for_its_host_and_cleans_like_native(tmp_path: Path, sleeper) -> None:
    root = tmp_path / "ckpts"
    root.mkdir()
    stale, keep = _make_scratch(root, sleeper.pid)
    done = subprocess.run([sys.executable, "-c", MEGATRON_SAVE, str(root)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "step_00000005" == find_latest(root).name
    assert resolve_checkpoint(root).extra == {"tokens": 1}
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert stale_scratch(root) == []


def test_a_failed_save_of_ours_is_swept_by_our_next_save(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    save_checkpoint(root, 1, {"w": torch.zeros(4)})
    ours = scratch_dir(scratch_path(root, checkpoint_name(2)))
    assert stale_scratch(root) == [] and stale_scratch(root, include_own=True) == [ours]
    save_checkpoint(root, 2, {"w": torch.ones(4)})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]


@pytest.mark.parametrize("name, host, pid", [
    ("step_00000006.tmp-login-1-4242", "login-1", 4242),
    ("step_00000006.trash-ip-10-0-0-7.ec2.internal-17", "ip-10-0-0-7.ec2.internal", 17),
    ("latest.tmp-node7-99", "node7", 99),
    ("step_00000006.tmp-4242", None, 4242),  # the old name: no host
])
def test_scratch_names(name: str, host: str | None, pid: int) -> None:
    s = parse_scratch(Path("/ckpts") / name)
    assert s is not None and (s.host, s.pid) == (host, pid)


@pytest.mark.parametrize("name", ["step_00000006", "latest", "step_6.tmp-", "notes.tmp-12", "step_x.tmp-h-1"])
def test_not_scratch_names(name: str) -> None:
    assert parse_scratch(Path(name)) is None


def test_own_scratch_name_round_trips() -> None:
    s = parse_scratch(scratch_path(Path("/ckpts"), checkpoint_name(6)))
    assert s is not None and s.host == this_host() and s.pid == __import__("os").getpid()


def test_resolver_and_tokenizer_lookup(run_ckpts: Path, eval_env, tmp_path: Path) -> None:  # noqa: F811
    step = run_ckpts / "step_00000007"
    tok = (eval_env["root"] / "model" / "tokenizer").resolve()
    for given in (run_ckpts, step, step / "."):
        ref = resolve_checkpoint(given)
        assert ref.path == step.resolve() and ref.step == 7 and ref.is_training_checkpoint
        assert ref.recorded_tokenizer == tok and checkpoint_tokenizer(ref) == tok
    assert tokenizer_dir(run_ckpts) == tok and tokenizer_dir(step) == tok
    assert tokenizer_dir(tok / "tokenizer.json") == tok
    assert checkpoint_tokenizer(resolve_checkpoint(step), tok / "tokenizer.json") == tok  # --tokenizer FILE

    hf = tmp_path / "hf"  # a Hugging Face directory carries its own tokenizer
    hf.mkdir()
    shutil.copy(step / "config.json", hf / "config.json")
    shutil.copy(tok / "tokenizer.json", hf / "tokenizer.json")
    ref = resolve_checkpoint(hf)
    assert ref == CheckpointRef(hf.resolve()) and not ref.is_training_checkpoint
    assert checkpoint_tokenizer(ref) == hf.resolve() and tokenizer_dir(hf) == hf

    empty = tmp_path / "empty"
    empty.mkdir()
    assert tokenizer_dir(empty) == empty  # nothing better known: the loader reports it
    with pytest.raises(CheckpointError, match="no such checkpoint or model directory"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json.*holds no complete checkpoint"):
        resolve_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no tokenizer files and none recorded.*--tokenizer DIR"):
        checkpoint_tokenizer(CheckpointRef(empty))
    with pytest.raises(CheckpointError, match="empty: no tokenizer files"):
        checkpoint_tokenizer(ref, empty)
    (step / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="COMPLETE: missing"):
        resolve_checkpoint(step)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(run_ckpts)


def test_layout_module_imports_no_tensor_library() -> None:
    code = ("import sys, hebtron.checkpoints; "
            "print(sorted(m for m in ('torch', 'safetensors', 'transformers', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
