"""Bad configurations and checkpoints fail with one clear line naming the field or key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hebtron.errors import CheckpointError, ConfigError
from hebtron.model import HybridConfig, HybridModel
from hebtron.model.hf import load_hf, save_hf
from tests.conftest import TINY_CONFIGS

BASE = TINY_CONFIGS["all-types-grouped"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hybrid_override_pattern": "M*X"}, "hybrid_override_pattern"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 3}, "n_group"),
        ({"mamba_num_heads": 7}, "n_groups"),
        ({"router_score_function": "relu"}, "router_score_function"),
    ],
)
def test_bad_config_names_the_field(change: dict, field: str):
    with pytest.raises(ConfigError) as err:
        HybridConfig(**{**BASE, **change})
    message = str(err.value)
    assert field in message and "\n" not in message


def test_config_json_round_trip_keeps_unknown_keys():
    cfg = HybridConfig.from_dict({**BASE, "some_future_field": 3, "mamba_n_groups": 2})
    assert cfg.extra == {"some_future_field": 3} and cfg.n_groups == 2
    again = HybridConfig.from_dict(cfg.to_hf_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.hybrid_override_pattern == "M*-EM"


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_hf(HybridModel(HybridConfig(**BASE)), tmp_path / "ckpt")


def test_missing_key_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["backbone.layers.3.mixer.experts.5.up_proj.weight"]
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.3\.mixer\.experts\.5\.up_proj\.weight"):
        load_hf(checkpoint)


def test_misshaped_key_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["backbone.layers.0.mixer.in_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"in_proj\.weight.*shape \(3, 3\)"):
        load_hf(checkpoint)


def test_config_mismatch_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["hidden_size"] = 32
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected"):
        load_hf(checkpoint)


def test_cli_reports_bad_config_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "num_experts_per_tok": 99}))
    proc = subprocess.run(
        [sys.executable, "-m", "hebtron.cli", "model", "info", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "num_experts_per_tok" in proc.stderr and "Traceback" not in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "hebtron.cli", "model", "info", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 2 and "not found" in ok.stderr
