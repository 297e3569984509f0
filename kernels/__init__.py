"""Compute kernels for hebtron, importable as ``hebtron.kernels``.

Each kernel has a pure-PyTorch reference (the CPU path); GPU kernels from mamba-ssm /
causal-conv1d are used where installed and never imported on CPU.

Names load lazily (``from hebtron.kernels import chunked_linear_cross_entropy``), so importing
the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "chunked_linear_cross_entropy": "hebtron.kernels.chunked_ce",
    "linear_cross_entropy_reference": "hebtron.kernels.chunked_ce",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hebtron.kernels' has no attribute {name!r}")
