"""HF NemotronH <-> Megatron weights: bit-exact round trips, in memory and through Megatron
distributed checkpoints on disk (``hebtron convert``), and Megatron's fused-QKV layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hebtron.backends.megatron.convert import _qkv_interleave, hf_to_megatron, megatron_to_hf
from hebtron.errors import CheckpointError
from hebtron.model.config import HybridConfig
from hebtron.model.decoder import HybridModel
from hebtron.model.hf import load_hf_state_dict, save_hf
from tests.conftest import TINY_CONFIGS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:megatron.*")


def _model(name: str, **extra) -> HybridModel:
    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**{**TINY_CONFIGS[name], **extra}))
    with torch.no_grad():  # a non-zero expert bias, as in a trained Nemotron 3 checkpoint
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", ["all-types-grouped", "nano-like"])
def test_hf_to_megatron_to_hf_is_bit_exact(name, tmp_path):
    model = _model(name)
    save_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    state = load_hf_state_dict(tmp_path / "hf", model.config)
    canon = hf_to_megatron(state, model.config)
    assert "decoder.layers.0.mixer.in_proj.weight.z" in canon
    back = megatron_to_hf(canon, model.config)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_fused_qkv_follows_megatrons_group_interleaving():
    cfg = HybridConfig(vocab_size=8, hidden_size=4, hybrid_override_pattern="*", num_attention_heads=4,
                       num_key_value_heads=2, head_dim=1)
    q, k, v = torch.arange(4.0)[:, None].repeat(1, 4), 10 + torch.arange(2.0)[:, None].repeat(1, 4), \
        20 + torch.arange(2.0)[:, None].repeat(1, 4)
    # group g holds its 2 query heads, then its key, then its value
    assert _qkv_interleave(q, k, v, cfg)[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_unmappable_tensors_are_an_error_not_a_silent_drop():
    model = HybridModel(HybridConfig(**TINY_CONFIGS["dense-first"]))  # use_bias: Mamba projection biases
    with pytest.raises(CheckpointError, match="no Megatron counterpart"):
        hf_to_megatron(model.state_dict(), model.config)


@pytest.mark.slow
def test_convert_commands_round_trip_through_a_distributed_checkpoint(tmp_path, monkeypatch):
    model = _model("nano-like")
    save_hf(model, tmp_path / "hf")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for args in (["hf-to-megatron", tmp_path / "hf", tmp_path / "mcore"],
                 ["megatron-to-hf", tmp_path / "mcore", tmp_path / "hf2"]):
        proc = subprocess.run([sys.executable, "-m", "hebtron.cli", "convert", *map(str, args)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "mcore" / "metadata.json").is_file()
    a, b = load_hf_state_dict(tmp_path / "hf", model.config), load_hf_state_dict(tmp_path / "hf2", model.config)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    _streams_one_layer_at_a_time_into_shards(tmp_path, model, a, monkeypatch)
    bad = subprocess.run([sys.executable, "-m", "hebtron.cli", "convert", "megatron-to-hf", str(tmp_path / "hf"),
                          str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def _streams_one_layer_at_a_time_into_shards(tmp_path: Path, model: HybridModel, want: dict, monkeypatch) -> None:
    """The way back reads one layer's tensors per load (bounded memory) and writes indexed shards."""
    from hebtron.backends.megatron import hf_export

    reads: list[list[str]] = []

    class Recording(hf_export.DistCheckpointReader):
        def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
            reads.append(keys)
            return super().read(keys)

    monkeypatch.setattr(hf_export, "DistCheckpointReader", Recording)
    out = tmp_path / "sharded"
    out.mkdir()
    hf_export.write_hf_weights(tmp_path / "mcore", model.config, out, max_shard_bytes=64 * 1024)
    assert len(reads) == model.config.num_hidden_layers + 1
    for keys in reads:  # one layer (or the embedding, final norm and head) per load
        assert len({k.split(".")[2] if k.startswith("decoder.layers.") else "top" for k in keys}) == 1, keys
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    got = load_hf_state_dict(out, model.config)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
