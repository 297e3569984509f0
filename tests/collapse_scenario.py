"""The routing-collapse scenario on CPU, shared by tests/test_monitor_collapse.py and
bench/router_collapse.py: a tiny hybrid (M*EME, 8 experts top-2) whose deep MoE layer (4)
routes Hebrew tokens to experts 0 and 1 from the start, trained on the fixture's he/en data
with the router monitor every step and a Hebrew collapse rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.train_fixtures import TINY_MODEL, write_recipe

MODEL = {**TINY_MODEL, "hybrid_override_pattern": "M*EME", "n_routed_experts": 8, "num_experts_per_tok": 2}
SKEWED_LAYER = 4
THRESHOLD = 0.6
RULE = {"metric": "load_entropy", "lang": "he", "below": THRESHOLD, "intervals": 3, "action": "warn"}


def shared_fixture(tmp_path_factory) -> Path:
    """One tiny tokenizer + data fixture per test session for the monitor and balance tests."""
    from tests.train_fixtures import build_training_fixture

    return build_training_fixture(tmp_path_factory.getbasetemp() / "monitor-train-fixture")


def run_collapse(fixture: Path, run_dir: Path, moe: dict[str, Any], steps: int = 40) -> list[dict[str, Any]]:
    """Train the skewed model with the given ``moe`` recipe section; returns the metrics records."""
    from hebtron.monitor.skew import language_token_ids, skew_routing
    from hebtron.recipe import load_recipe
    from hebtron.backends.engines import make_trainer
    from hebtron.train.metrics import read_metrics

    path = write_recipe(fixture, run_dir, total_steps=steps, eval_interval=0)
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe["model"]["init"] = MODEL
    # calibrated on contiguous windows: with them only the skewed layer loses its Hebrew load
    # entropy in 40 unbalanced steps (shuffled, layer 2 drifts below the threshold as well)
    recipe["data"]["shuffle_windows"] = False
    recipe["checkpoint"] = {"interval": 0, "keep_last": 1}
    recipe["logging"]["log_interval"] = 10**6
    recipe["moe"] = {"monitor": {"interval": 1}, "alarms": [RULE], **moe}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    trainer = make_trainer(load_recipe(path))
    try:
        skew_routing(trainer.engine.model, language_token_ids(trainer.tokenizer), layers=[SKEWED_LAYER], experts=[0, 1],
                     logit=3.0, embed_norm=1.0)
        trainer.run()
    finally:
        trainer.close()
    return read_metrics(run_dir)


def he_entropy(records: list[dict[str, Any]], layer: int = SKEWED_LAYER) -> list[float]:
    return [r["router"][f"layer_{layer}"]["he"]["load_entropy"] for r in records if "router" in r]


def alarms(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(r["step"], m) for r in records for m in r.get("router_alarm", [])]
