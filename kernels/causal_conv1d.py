"""Depthwise causal conv1d that restarts at document boundaries (packed sequences).

The reference is plain PyTorch and is the CPU path. On CUDA the ``causal-conv1d`` package's
kernel runs (it takes ``seq_idx`` natively); without it a CUDA run stops with one line unless
``HEBTRON_ALLOW_REFERENCE_KERNELS=1``. Nothing GPU-only is imported on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hebtron.kernels.dispatch import CAUSAL_CONV1D, gpu_kernel


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
    _, channels, time = x.shape
    kernel = weight.shape[-1]
    if seq_idx is None:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=kernel - 1, groups=channels)[..., :time]
    else:
        # Sum of K shifted copies; a shift by s contributes only where seq_idx[t - s] == seq_idx[t].
        out = x * weight[:, kernel - 1, None]
        for shift in range(1, min(kernel, time)):
            same_doc = (seq_idx[:, shift:] == seq_idx[:, :-shift]).unsqueeze(1).to(x.dtype)
            contrib = x[..., :-shift] * weight[:, kernel - 1 - shift, None] * same_doc
            out = out + F.pad(contrib, (shift, 0))
        if bias is not None:
            out = out + bias[:, None]
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
