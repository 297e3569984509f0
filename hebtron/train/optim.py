"""AdamW with the usual weight-decay exemptions, and gradient clipping that reports the norm.

Weight decay pulls weights toward zero. That is right for matrices (projections, experts,
embeddings, the LM head) but wrong for parameters that set a scale or an offset: norm weights,
biases, and the Mamba2 per-head ``A_log``, ``D`` and ``dt_bias``. All of those are 1-D, so the
rule is simply "no decay on parameters with fewer than 2 dims" (the GPT-2/nanoGPT/Megatron
practice). ``no_decay_names`` adds substrings for anything else, e.g. ``("embeddings",)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = ()
) -> list[dict]:
    """Split trainable parameters into a decayed group (>= 2-D) and an undecayed one.

    ``named_parameters`` yields each tied parameter once, so a tied embedding/LM head is
    neither duplicated nor decayed twice. Empty groups are dropped.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(s in name for s in no_decay_names):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    no_decay_names: Sequence[str] = (),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """Decoupled-weight-decay AdamW over :func:`param_groups`.

    ``fused`` is left to PyTorch by default (it picks fused/foreach kernels on CUDA). Build the
    optimizer *after* FSDP2 sharding so its state is created per shard.
    """
    groups = param_groups(model, weight_decay, no_decay_names)
    if not groups:
        raise ValueError("build_adamw: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def clip_grad_norm(
    parameters: Iterable[torch.Tensor], max_norm: float | None, norm_type: float = 2.0
) -> float:
    """Clip gradients to ``max_norm`` and return the global norm measured *before* clipping.

    This is ``torch.nn.utils.clip_grad_norm_`` split into its two halves
    (``get_total_norm`` then ``clip_grads_with_norm_``) so the norm can be made global in
    between: with FSDP2 the gradients are DTensor shards and the norm comes back as a DTensor
    with a pending reduction; ``full_tensor()`` all-reduces it, so every rank sees the same
    number and clips by the same factor (the torchtitan recipe). Call it on every rank. If
    expert-parallel and dense parameters live on different meshes, reduce per mesh first.

    A non-finite norm leaves the gradients untouched: the step is going to be skipped by
    :class:`hebtron.train.guards.NanGuard`, and scaling by NaN would only hide where it came
    from. ``max_norm`` of ``None`` or ``<= 0`` measures without clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type)
    if hasattr(total, "full_tensor"):  # DTensor (FSDP2 / TP): reduce across shards
        total = total.full_tensor()
    norm = float(total)
    if max_norm is not None and max_norm > 0 and math.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norm
