"""The noise-scale probe and the batch-size policies inside the training loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hebtron.recipe import load_recipe
from hebtron.backends.engines import make_trainer
from hebtron.train.metrics import read_metrics
from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.mktemp("bs-fixture"))


PROBE_SCRIPT = r"""
import json, math, sys, torch
sys.path.insert(0, sys.argv[2])
from hebtron.backends.native import NativeBackend
from hebtron.model import HybridConfig, HybridModel
from hebtron.backends.native_engine import accumulate_gradients
from hebtron.train.engine import split_rows
from hebtron.backends.native_noise import GradientNoiseProbe
from hebtron.train.optim import clip_grad_norm
from tests.conftest import TINY_CONFIGS
from tests.test_train_loop import _varied_batch
world = int(sys.argv[3])
torch.manual_seed(0)
model = HybridModel(HybridConfig(**TINY_CONFIGS["all-types-grouped"]))
batch = _varied_batch(model.config.vocab_size)
tokens = float(batch["loss_mask"].sum())
backend = NativeBackend(world)
model = backend.wrap(model)
probe = GradientNoiseProbe(model, backend)
rows = 8 // world
first = backend.rank * rows
micro = [split_rows(batch, s, s + 4) for s in range(first, first + rows, 4)]  # 2 x 4 rows, or 1 x 4 per rank
probe.begin_step(True)
accumulate_gradients(model, micro, tokens, backend, noise=probe)
norm = clip_grad_norm(model.parameters(), math.inf)
m = probe.measurement(tokens, norm)
if backend.rank == 0:
    open(sys.argv[1], "w").write(json.dumps(m.__dict__))
backend.close()
"""


@pytest.mark.slow
def test_two_ranks_measure_the_same_noise_as_one(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json"), str(REPO), "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(script), str(tmp_path / "two.json"), str(REPO), "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    for key in ("g_small_sq", "g_big_sq", "b_small", "b_big"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert a["g_small_sq"] > a["g_big_sq"] > 0  # a smaller batch has a noisier gradient


def _adaptive(fixture_dir: Path, run: Path) -> Path:
    # constant LR: a run stopped early and resumed follows the same plan as one never stopped
    recipe = write_recipe(fixture_dir, run, global_batch=4, micro_batch=2, total_steps=14, lr=3e-3,
                          schedule="constant", warmup_tokens=0, min_lr=0.0)
    recipe.write_text(recipe.read_text() + (
        "batch_size: {policy: adaptive, max: 32, k: 1.0, interval: 3, warmup_updates: 3, ema: 0.5}\n"
    ))
    return recipe


def test_adaptive_grows_batch_scales_lr_and_resumes_exactly(fixture_dir, tmp_path):
    make_trainer(load_recipe(_adaptive(fixture_dir, tmp_path / "full"))).run()
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    sizes = [r["global_batch"] for r in records]
    assert sizes[0] == 4 and sizes == sorted(sizes) and sizes[-1] > 4, sizes
    assert all(s % 2 == 0 for s in sizes)
    grown = next(r for r in records if r["global_batch"] > 4)
    assert grown["lr_scale"] == pytest.approx((grown["global_batch"] / 4) ** 0.5)
    assert grown["lr"] == pytest.approx(3e-3 * grown["lr_scale"])
    assert "noise/b_simple_tokens" in records[-1]

    recipe = _adaptive(fixture_dir, tmp_path / "resumed")
    make_trainer(load_recipe(recipe, ["train.total_steps=8"])).run()  # stops mid-ramp with a checkpoint at step 8
    make_trainer(load_recipe(recipe), resume="auto").run()
    again = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["global_batch"] for r in again] == sizes
    assert [r["loss"] for r in again] == [r["loss"] for r in records]
