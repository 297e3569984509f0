"""Depthwise causal conv1d that restarts at document boundaries (packed sequences).

The reference is plain PyTorch and is the CPU path. On CUDA the ``causal-conv1d`` package's
kernel runs (it takes ``seq_idx`` natively); without it a CUDA run stops with one line unless
``HEBTRON_ALLOW_REFERENCE_KERNELS=1``. Nothing GPU-only is imported on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hebtron.kernels.dispatch import CAUSAL_CONV1D, gpu_kernel


class _TimeMajorConv(torch.autograd.Function):
    """The depthwise causal conv as K shifted multiply-adds over (batch, time, channels), with
    its backward written out. The mixer passes a transposed view of its (batch, time, channels)
    projection, so this layout is the contiguous one: every op streams memory, and the hand
    backward runs about half the elementwise passes autograd would over the shifted copies.
    ``same[s - 1]`` (batch, time) is 1 where token t - s belongs to t's document (None: one
    document per row)."""

    @staticmethod
    def forward(ctx: Any, xt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                same: torch.Tensor | None) -> torch.Tensor:
        kernel, time = weight.shape[-1], xt.shape[1]
        out = xt * weight[:, kernel - 1]
        for shift in range(1, min(kernel, time)):
            shifted = xt[:, :-shift] if same is None else xt[:, :-shift] * same[shift - 1, :, shift:, None]
            out[:, shift:].addcmul_(shifted, weight[:, kernel - 1 - shift])
        if bias is not None:
            out += bias
        ctx.save_for_backward(xt, weight, same)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xt, weight, same = ctx.saved_tensors
        kernel, time = weight.shape[-1], xt.shape[1]
        grad_x = grad * weight[:, kernel - 1]
        grad_w = torch.zeros_like(weight)
        grad_w[:, kernel - 1] = (grad * xt).sum((0, 1))
        for shift in range(1, min(kernel, time)):
            g = grad[:, shift:] if same is None else grad[:, shift:] * same[shift - 1, :, shift:, None]
            grad_x[:, :-shift].addcmul_(g, weight[:, kernel - 1 - shift])
            grad_w[:, kernel - 1 - shift] = (g * xt[:, :-shift]).sum((0, 1))
        grad_b = grad.sum((0, 1)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Causal depthwise conv over time, never mixing tokens of different documents.

    x: (batch, channels, time); weight: (channels, kernel); bias: (channels,);
    seq_idx: (batch, time) document index per token, or None for one document per row.
    Output[t] = sum_k weight[:, k] * x[t - (K-1) + k], counting only inputs of t's document.
    """
    kernel = weight.shape[-1]
    same = None
    if seq_idx is not None:  # same[s - 1][b, t]: token t - s is in t's document
        same = torch.stack([torch.cat([torch.zeros_like(seq_idx[:, :shift], dtype=torch.bool),
                                       seq_idx[:, shift:] == seq_idx[:, :-shift]], dim=1)
                            for shift in range(1, kernel)]).to(x.dtype) if kernel > 1 else None
    out = _TimeMajorConv.apply(x.transpose(1, 2), weight, bias, same).transpose(1, 2)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    return out


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Dispatch: the causal-conv1d kernel on CUDA (its absence there is an error, see
    :mod:`hebtron.kernels.dispatch`), the reference elsewhere."""
    if x.is_cuda and (kernel := gpu_kernel(CAUSAL_CONV1D, x.device)) is not None:
        idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        return kernel(x, weight, bias, seq_idx=idx, activation=activation)
    return causal_conv1d_ref(x, weight, bias, seq_idx, activation)
