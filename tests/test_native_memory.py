"""``hebtron preflight --memory`` on a native (FSDP2) recipe at Nemotron 3 Nano widths: the
breakdown, the verdict, and the activation figure of a layer against a real forward's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hebtron.cli import main as hebtron_main
from hebtron.model.config import HybridConfig
from hebtron.model.decoder import Block
from hebtron.train import memory as mm
from tests.test_activation_checkpointing import LiveStorages

REPO = Path(__file__).resolve().parents[1]
NATIVE = str(REPO / "recipes" / "nemotron3-nano" / "cpt-h200-native.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def _report(capsys, *overrides: str) -> tuple[int, dict]:
    code = hebtron_main(["preflight", "--memory", NATIVE, *overrides, "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_native_nano_recipe_fits_and_unsharded_accumulation_does_not(capsys):
    code, report = _report(capsys)
    rows = {r["component"]: r["gb"] for r in report["rows"]}
    params = mm.total_parameters(HybridConfig.from_json_file(REPO / "recipes" / "nemotron3-nano" / "config.json"))
    assert code == 0 and report["backend"] == "native" and report["fits"] and report["dp"] == 16
    assert rows["weights"] == pytest.approx(params * 4 / 16 / 1e9, abs=2e-3)
    assert rows["gradients"] == pytest.approx(params * 4 / 16 / 1e9, abs=2e-3)
    assert rows["optimizer state"] == pytest.approx(params * 8 / 16 / 1e9, abs=2e-3)
    assert rows["recompute working set"] > 0 and report["activation_checkpointing"] == "full"
    assert 40 < report["total_gb"] < 80, report["total_gb"]

    code, report = _report(capsys, "train.sharded_accumulation=false")
    rows = {r["component"]: r["gb"] for r in report["rows"]}
    assert code == 1 and report["fits"] is False
    assert rows["gradients"] == pytest.approx(params * 4 / 1e9, abs=2e-3)  # unsharded fp32, every rank
    assert "train.sharded_accumulation: true" in report["verdict"]

    code, report = _report(capsys, "train.activation_checkpointing=none", "train.micro_batch=2")
    assert not any(r["component"] == "recompute working set" for r in report["rows"])
    assert report["micro_batches"] == 40


@pytest.mark.parametrize("kind", ["mamba", "attention", "moe"])
def test_a_layer_figure_is_within_ten_percent_of_a_real_forward(kind):
    """Nano widths (16 experts instead of 128: per-token activations depend on top-k, not on the
    expert count), the CPU kernels: the model's saved bytes against the bytes a real forward
    leaves alive for backward (every storage created in the forward still referenced after it,
    minus the layer's output)."""
    raw = json.loads((REPO / "recipes" / "nemotron3-nano" / "config.json").read_text())
    raw.pop("layers_block_type")
    cfg = HybridConfig.from_dict({**raw, "n_routed_experts": 16})
    batch, seq_len = 1, 64
    predicted = mm.measure_layer(cfg, kind, batch, seq_len, dtype=torch.float32, kernels="reference").saved

    block = Block(cfg, cfg.layer_types.index(kind))
    x = torch.randn(batch, seq_len, cfg.hidden_size, requires_grad=True)
    tracker = LiveStorages([*block.parameters(), *block.buffers(), x])
    with tracker:
        out, _ = block(x, None, None)
    held = tracker.live_bytes() - out.untyped_storage().nbytes() + x.untyped_storage().nbytes()  # input is saved too
    assert abs(held - predicted) <= 0.10 * predicted, (kind, held, predicted)
