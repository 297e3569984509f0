"""Depthwise causal conv1d that restarts at document boundaries (packed sequences).

The reference is plain PyTorch and is the CPU path. On CUDA, when the ``causal-conv1d``
package is installed, its kernel is used: it takes ``seq_idx`` natively. Nothing GPU-only is
imported on CPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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


@functools.cache
def _cuda_kernel():
    try:
        from causal_conv1d import causal_conv1d_fn  # type: ignore[import-not-found]
    except ImportError:
        return None
    return causal_conv1d_fn


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Dispatch: the causal-conv1d CUDA kernel where available, else the reference."""
    if x.is_cuda and (kernel := _cuda_kernel()) is not None:
        idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        return kernel(x, weight, bias, seq_idx=idx, activation=activation)
    return causal_conv1d_ref(x, weight, bias, seq_idx, activation)
