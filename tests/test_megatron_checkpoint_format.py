"""Routine Megatron checkpoints on 2 gloo ranks: the distributed optimizer's state is written
``dp_reshardable`` (each rank its own shard, no gather), recorded in the checkpoint's content
metadata with the layout; a resume at the same layout replays the next two steps bit-exactly; a resume
at another tensor-parallel layout stops with one CheckpointError naming ``checkpoint.reshardable``
(the weights alone still load there). The reshardable format itself is exercised by
tests/test_megatron_train.py, which resumes at another layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.train_fixtures import run_two_ranks

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two torchrun ranks of Megatron-Core

CONFIG = dict(
    vocab_size=96, hidden_size=64, hybrid_override_pattern="M*EM", mamba_num_heads=8, mamba_head_dim=16,
    ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
)


def test_routine_checkpoints_are_dp_reshardable_and_refuse_another_layout_in_one_line(tmp_path):
    proc = run_two_ranks(__file__, str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["metadata"]["distrib_optim_sharding_type"] == "dp_reshardable", r
    assert r["metadata"]["hebtron_layout"]["tp"] == 2 and r["metadata"]["hebtron_layout"]["dp"] == 1, r
    assert r["replayed_losses"] == r["losses"], r  # bit-exact resume at the saved layout, two steps on
    err = r["other_layout_error"]
    assert err.startswith("CheckpointError: ") and "\n" not in err, err
    assert "dp_reshardable, saved at tp=2" in err and "this run: tp=1" in err and "checkpoint.reshardable: true" in err
    assert r["weights_only_max_abs_diff"] == 0.0, r


def _worker(out_dir: Path) -> None:
    import torch

    from hebtron.backends.megatron import compat

    compat.apply()
    from megatron.core import dist_checkpointing

    from hebtron.backends.megatron.config_map import ParallelPlan
    from hebtron.backends.megatron.convert import hf_to_megatron
    from hebtron.backends.megatron.step import MegatronEngine, OptimSettings
    from hebtron.errors import CheckpointError
    from hebtron.model.config import HybridConfig
    from hebtron.model.decoder import HybridModel

    cfg = HybridConfig(**CONFIG)
    torch.manual_seed(0)
    canon = hf_to_megatron(HybridModel(cfg).state_dict(), cfg)
    g = torch.Generator().manual_seed(1)

    def batch() -> dict:
        return {"input_ids": torch.randint(0, cfg.vocab_size, (2, 32), generator=g),
                "labels": torch.randint(0, cfg.vocab_size, (2, 32), generator=g),
                "loss_mask": torch.ones(2, 32, dtype=torch.long)}

    batches = [batch() for _ in range(3)]
    result: dict = {}
    engine = MegatronEngine(cfg, ParallelPlan(tp=2, dp=1, sequence_parallel=True), optim=OptimSettings(lr=1e-3))
    engine.load_weights(canon)

    def step(b: dict) -> float:
        return engine.train_step(engine.micro_inputs(engine.rank_rows(b), 1), lr=1e-3).loss

    step(batches[0])
    saved = engine.gather_weights()
    engine.save_checkpoint(out_dir / "ckpt")
    result["metadata"] = dist_checkpointing.load_content_metadata(str(out_dir / "ckpt"))
    result["losses"] = [step(b) for b in batches[1:]]
    engine.load_checkpoint(out_dir / "ckpt")
    # step 3's loss follows step 2's update: it checks the Adam moments and step count, not only weights
    result["replayed_losses"] = [step(b) for b in batches[1:]]
    engine.close()

    other = MegatronEngine(cfg, ParallelPlan(tp=1, dp=2), optim=OptimSettings(lr=1e-3))
    try:
        other.load_checkpoint(out_dir / "ckpt")
        result["other_layout_error"] = "no error"
    except CheckpointError as err:
        result["other_layout_error"] = f"CheckpointError: {err}"
    other.load_checkpoint(out_dir / "ckpt", with_optimizer=False)
    loaded = other.gather_weights()
    result["weights_only_max_abs_diff"] = max(float((loaded[k] - saved[k]).abs().max()) for k in saved)
    if other.rank == 0:
        (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    other.close()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
