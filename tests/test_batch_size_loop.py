"""The noise-scale probe and the batch-size policies inside the training loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from hebtron.recipe import load_recipe
from hebtron.backends.engines import make_trainer
from hebtron.train.metrics import read_metrics
from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.mktemp("bs-fixture"))


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
