"""What each part of the model runs on a device: printed at the start of a run, so a GPU job
that would crawl on a reference kernel says so (or, without the opt-out, stops) before it trains."""

from __future__ import annotations

import torch
from torch import nn

from hebtron.kernels.dispatch import CAUSAL_CONV1D, SSD_SCAN, describe
from hebtron.model.attention import attention_path
from hebtron.model.moe import Experts


def implementations(model: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> dict[str, str]:
    """Attention (packed rows and single-document rows), SSD scan, conv1d and experts on
    ``device`` at ``compute_dtype``. Raises :class:`~hebtron.kernels.dispatch.KernelUnavailable`
    where the forward would. Metadata only: no tensor is read."""
    config = model.config
    pattern = config.hybrid_override_pattern
    out: dict[str, str] = {}
    if "*" in pattern:
        packed = attention_path(device, compute_dtype, config.head_dim, True, getattr(model, "attention_impl", "auto"))
        out["attention"] = f"{packed} (packed rows), sdpa_causal (one-document rows)"
    if "M" in pattern:
        out["SSD scan"] = describe(SSD_SCAN, device)
        out["conv1d"] = describe(CAUSAL_CONV1D, device)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if experts:
        out["experts"] = "grouped_mm" if all(m.grouped for m in experts) else "per-expert loop"
    return out
