"""Activation checkpointing, applied to the decoder's blocks from outside the model (before
``fully_shard``, as torchtitan does), so the model code stays written for one device.

- ``full``: a block keeps only its inputs; its whole forward reruns in backward.
- ``selective``: a block keeps the outputs of its matmuls (dense and grouped) and attention, and
  reruns the cheap rest (norms, activations, gates, the SSD scan's elementwise work), through
  ``torch.utils.checkpoint``'s selective-checkpoint policy.

The block's ``forward`` is wrapped in place (no wrapper module), so parameter names, HF export,
optimizer state and FSDP2's per-block sharding are unchanged. Recomputation calls the block's
own forward again, never module hooks, and every op in it is deterministic (no dropout), so
gradients equal those of the plain run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")
_aten = torch.ops.aten
_SAVED_OPS = {
    op
    for name in ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                 "_efficient_attention_forward")
    if (op := getattr(getattr(_aten, name, None), "default", None)) is not None
}


def _keep_matmuls_and_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable[..., Any], selective: bool) -> Callable[..., Any]:
    options: dict[str, Any] = {"use_reentrant": False}
    if selective:
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls_and_attention)

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing is saved anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, **options, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block of ``model.backbone.layers`` (``mode``: none, full or selective)."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    for block in model.backbone.layers:
        block.forward = _checkpointed(block.forward, selective=mode == "selective")
