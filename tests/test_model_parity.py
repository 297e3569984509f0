"""Logit parity with transformers' NemotronHForCausalLM in both directions (fp32, unpacked)."""

from __future__ import annotations

import logging

import pytest
import torch

from hebtron.model import HybridConfig, HybridModel
from hebtron.model.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


def _randomize_router_bias(model: torch.nn.Module) -> None:
    """A non-zero expert bias so that parity also covers the biased expert choice."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)


def test_hebtron_saved_loads_in_transformers(tiny_config: HybridConfig, tmp_path):
    torch.manual_seed(0)
    model = HybridModel(tiny_config).eval()
    _randomize_router_bias(model)
    save_hf(model, tmp_path / "ckpt")
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "ckpt", local_files_only=True, dtype=torch.float32)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 37))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf.eval()(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_transformers_saved_loads_in_hebtron(tiny_config: HybridConfig, tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.NemotronHConfig(**tiny_config.to_hf_dict())
    hf = transformers.NemotronHForCausalLM(hf_config).eval()
    _randomize_router_bias(hf)
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, tiny_config.vocab_size, (3, 29))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_round_trip_is_bit_exact_and_sharded(tmp_path):
    from tests.conftest import TINY_CONFIGS

    torch.manual_seed(3)
    model = HybridModel(HybridConfig(**TINY_CONFIGS["all-types-grouped"]))
    save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = load_hf(tmp_path / "sharded")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_tied_embeddings_export(tmp_path):
    from tests.conftest import TINY_CONFIGS

    cfg = HybridConfig(**{**TINY_CONFIGS["nano-like"], "tie_word_embeddings": True})
    model = HybridModel(cfg)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    save_hf(model, tmp_path / "tied")
    again = load_hf(tmp_path / "tied")
    assert again.lm_head.weight is again.backbone.embeddings.weight
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
