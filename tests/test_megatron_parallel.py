"""Parallel equivalence on 2 gloo ranks (real Megatron-Core on CPU): tp=2 and ep=2 give the loss of
tp=1/ep=1 for the same batch and weights, before and after an optimizer step (so gradient
reductions are covered too), and a distributed checkpoint saved at ep=2 loads at ep=1 with
equal weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.train_fixtures import run_two_ranks

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two torchrun ranks of Megatron-Core

CONFIG = dict(
    vocab_size=96, hidden_size=64, hybrid_override_pattern="M*-EME", mamba_num_heads=8, mamba_head_dim=16,
    ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5,
)
PLANS = {"tp1_ep1": dict(dp=2), "tp2": dict(tp=2, dp=1, sequence_parallel=True), "ep2": dict(ep=2, dp=2)}


def test_tp2_and_ep2_match_one_way_and_checkpoints_reshard(tmp_path):
    proc = run_two_ranks(__file__, str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    ref = r["tp1_ep1"]
    assert abs(ref["loss_before"] - ref["native_loss"]) < 1e-4, r
    for plan in ("tp2", "ep2"):
        assert abs(r[plan]["loss_before"] - ref["loss_before"]) < 1e-5, (plan, r)
        assert abs(r[plan]["grad_norm"] - ref["grad_norm"]) < 1e-5 * ref["grad_norm"], (plan, r)
        assert abs(r[plan]["loss_after"] - ref["loss_after"]) < 1e-4, (plan, r)
    assert ref["loss_after"] < ref["loss_before"]
    assert r["reshard"]["max_abs_diff"] == 0.0 and r["reshard"]["tensors"] > 20, r


def _worker(out_dir: Path) -> None:
    import torch

    from hebtron.backends.megatron import compat

    compat.apply()
    from hebtron.backends.megatron.config_map import ParallelPlan
    from hebtron.backends.megatron.convert import hf_to_megatron
    from hebtron.backends.megatron.step import MegatronEngine, OptimSettings
    from hebtron.model.config import HybridConfig
    from hebtron.model.decoder import HybridModel
    from hebtron.train.loss import token_loss_sum

    cfg = HybridConfig(**CONFIG)
    torch.manual_seed(0)
    native = HybridModel(cfg)
    canon = hf_to_megatron(native.state_dict(), cfg)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, cfg.vocab_size, (4, 32), generator=g),
        "labels": torch.randint(0, cfg.vocab_size, (4, 32), generator=g),
        "loss_mask": (torch.rand(4, 32, generator=g) > 0.2).long(),
        "seq_idx": torch.tensor([[0] * 10 + [1] * 22, [0] * 5 + [1] * 7 + [2] * 20, [0] * 32, [0] * 16 + [1] * 16]),
    }
    with torch.no_grad():
        native_loss = float(token_loss_sum(native(batch["input_ids"], seq_idx=batch["seq_idx"]).logits,
                                           batch["labels"], batch["loss_mask"]) / batch["loss_mask"].sum())
    results: dict = {}
    saved: dict = {}
    for name, plan in PLANS.items():
        engine = MegatronEngine(cfg, ParallelPlan(**plan), optim=OptimSettings(lr=1e-3))
        engine.load_weights(canon)
        micros = engine.micro_inputs(engine.rank_rows(batch), micro_batch=1)
        before, tokens = engine.evaluate(micros)
        step = engine.train_step(micros, lr=1e-3)
        after, _ = engine.evaluate(micros)
        results[name] = {"loss_before": before / tokens, "loss_after": after / tokens, "grad_norm": step.grad_norm,
                         "native_loss": native_loss}
        if name == "ep2":
            saved = engine.gather_weights()
            engine.save_checkpoint(out_dir / "ckpt_ep2", with_optimizer=True)
        engine.close()
    engine = MegatronEngine(cfg, ParallelPlan(dp=2), with_optimizer=False)
    engine.load_checkpoint(out_dir / "ckpt_ep2", with_optimizer=False)
    loaded = engine.gather_weights()
    assert set(loaded) == set(saved)
    diff = max(float((loaded[k] - saved[k]).abs().max()) for k in saved)
    results["reshard"] = {"max_abs_diff": diff, "tensors": len(saved)}
    if engine.rank == 0:
        (out_dir / "result.json").write_text(json.dumps(results, indent=2))
    engine.close()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
