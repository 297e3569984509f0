"""Shared fixtures: tiny hybrid configurations covering every layer type."""

from __future__ import annotations

import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hebtron.model import HybridConfig  # noqa: E402

TINY_CONFIGS: dict[str, dict] = {
    # every layer type, grouped routing, shared expert, GQA 4:2
    "all-types-grouped": dict(
        vocab_size=97, hidden_size=64, hybrid_override_pattern="M*-EM", mamba_num_heads=8, mamba_head_dim=16,
        ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    ),
    # Nemotron 3 Nano shape in miniature: MEMEM*E..., MQA-ish GQA 8:1, top-3 of 6, no normalization
    "nano-like": dict(
        vocab_size=131, hidden_size=48, hybrid_override_pattern="MEM*EME", mamba_num_heads=6, mamba_head_dim=8,
        ssm_state_size=8, n_groups=3, conv_kernel=3, chunk_size=8, num_attention_heads=8, num_key_value_heads=1,
        head_dim=6, n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=40, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, tie_word_embeddings=False,
    ),
    # dense MLPs and attention first, full GQA 6:3, bias on mamba projections, odd chunking
    "dense-first": dict(
        vocab_size=64, hidden_size=72, hybrid_override_pattern="*-M-E*M", mamba_num_heads=4, mamba_head_dim=18,
        ssm_state_size=12, n_groups=1, conv_kernel=4, chunk_size=5, num_attention_heads=6, num_key_value_heads=3,
        head_dim=12, intermediate_size=80, n_routed_experts=12, num_experts_per_tok=4, moe_intermediate_size=20,
        moe_shared_expert_intermediate_size=36, n_group=3, topk_group=3, routed_scaling_factor=1.7, use_bias=True,
    ),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config(request) -> HybridConfig:
    return HybridConfig(**TINY_CONFIGS[request.param])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from threads, and on a busy machine spinning threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Tests that run ``hebtron.cli.main`` or a trainer in this process let it install its
    SIGTERM/SIGUSR1 handlers (stop at the next step); put pytest's back afterwards, so that a
    later signal to the test process is not swallowed by a trainer that no longer runs."""
    before = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
    yield
    for sig, handler in before.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


# Run order. `make test` hands whole modules to two xdist workers in collection order
# (--dist loadscope --no-loadscope-reorder). The real-Slurm modules go first: they mostly wait on
# Slurm (a time limit's signal, requeues), so started first they overlap everything else instead of
# running last, alone. The other slow modules (torchrun ranks, Megatron) follow, then the rest.
_RUN_FIRST = ("test_slurm.py", "test_slurm_megatron.py", "test_slurm_watch.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        if name in _RUN_FIRST:
            return _RUN_FIRST.index(name)
        return len(_RUN_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: collection order within a rank
