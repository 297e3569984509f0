"""Squared-ReLU MLP (Nemotron-H's dense layer and its MoE shared expert)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Relu2(torch.autograd.Function):
    """``relu(x) ** 2`` keeping one tensor for backward (``relu(x)``; the gradient is
    ``2 relu(x) grad``): autograd over ``relu`` then ``square`` keeps two and makes three
    elementwise passes in backward, in every expert and dense MLP."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        positive = torch.relu(x)
        ctx.save_for_backward(positive)
        return positive * positive

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (positive,) = ctx.saved_tensors
        return torch.mul(grad, positive).mul_(2)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (Nemotron-H's activation), with a hand-written backward."""
    return _Relu2.apply(x)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
