"""FSDP2 checkpoints are sharded: at dp=2 each rank writes its own shards with
torch.distributed.checkpoint (nothing gathered to rank 0), ``--resume auto`` at dp=2 continues
with the losses of an uninterrupted run, the same checkpoint loads into one process, and the HF
export (the one place that gathers) holds the uninterrupted run's weights at that step.

The reference is one process (the single-process format). dp=2 equals it within 1e-5 relative
per loss (tests/test_train_loop.py: the same gradients within 1e-4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hebtron.checkpoints import SHARDED_DIR, find_latest, is_sharded_checkpoint
from hebtron.cli import main as hebtron_main
from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # torchrun ranks


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hebtron.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def test_sharded_save_resumes_at_dp2_loads_in_one_process_and_exports(fixture_dir, tmp_path):
    recipe = write_recipe(fixture_dir, tmp_path / "one", total_steps=6, eval_interval=0, schedule="constant")
    every3 = ["checkpoint.interval=3", "checkpoint.keep_last=0"]
    assert hebtron_main(["train", str(recipe), *every3]) == 0
    reference = _losses(tmp_path / "one")

    two = tmp_path / "two"
    at = [f"logging.run_dir={two}", f"checkpoint.dir={two / 'ckpt'}", *every3]
    proc = _torchrun("train", str(recipe), *at, "parallel.dp=2", "train.total_steps=3")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    step3 = find_latest(two / "ckpt")
    assert step3 is not None and step3.name == "step_00000003" and is_sharded_checkpoint(step3)
    assert sorted(p.name for p in (step3 / SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step3 / "model.safetensors").exists() and not (step3 / "optimizer.pt").exists()

    proc = _torchrun("train", str(recipe), *at, "parallel.dp=2", "--resume", "auto")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    resumed = _losses(two)
    assert sorted(resumed) == list(range(1, 7))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, resumed, reference)

    single = tmp_path / "single"
    assert hebtron_main(["train", str(recipe), f"logging.run_dir={single}", f"checkpoint.dir={single / 'ckpt'}",
                         *every3, "--resume", str(step3)]) == 0
    for step, loss in _losses(single).items():
        assert step > 3 and loss == pytest.approx(reference[step], rel=1e-5), (step, loss, reference[step])

    from hebtron.model.hf import load_hf

    assert hebtron_main(["export", str(step3), "--hf", str(tmp_path / "export")]) == 0
    exported = load_hf(tmp_path / "export").state_dict()
    saved = load_hf(tmp_path / "one" / "checkpoints" / "step_00000003").state_dict()
    assert exported.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert (step3 / "hf" / "model.safetensors").is_file()  # the conversion, cached beside the shards
