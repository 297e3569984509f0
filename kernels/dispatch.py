"""Which implementation a kernel runs on a device, with no silent fallback on GPUs.

On CUDA the PyTorch references of the SSD scan and the causal conv1d are 5 to 10 times slower
than mamba-ssm's and causal-conv1d's kernels and keep gigabytes more activations, so a GPU run
that silently fell back would look healthy and cost a week. Where the package is missing or its
import fails, :func:`gpu_kernel` raises one line naming the package and the import error. The
opt-out, for a debugging session on a GPU without the packages, is
``HEBTRON_ALLOW_REFERENCE_KERNELS=1``: the reference runs, and :func:`describe` says so.

Off CUDA the references are the implementation (no GPU package is ever imported on CPU).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hebtron.errors import UserError

ALLOW_REFERENCE_ENV = "HEBTRON_ALLOW_REFERENCE_KERNELS"


class KernelUnavailable(UserError):
    """A GPU kernel's package is missing or broken where CUDA runs."""


@dataclass(frozen=True)
class GPUKernel:
    """A kernel's GPU implementation: the package to install, and where the function lives."""

    name: str
    package: str
    module: str
    attr: str


SSD_SCAN = GPUKernel("SSD scan", "mamba-ssm", "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
CAUSAL_CONV1D = GPUKernel("conv1d", "causal-conv1d", "causal_conv1d", "causal_conv1d_fn")
GPU_KERNELS = (SSD_SCAN, CAUSAL_CONV1D)


@functools.cache
def _load(kernel: GPUKernel) -> tuple[Callable | None, str]:
    """The kernel function, or None and why its import failed (any exception: a broken build
    raises OSError or RuntimeError from its extension, not only ImportError)."""
    try:
        return getattr(importlib.import_module(kernel.module), kernel.attr), ""
    except Exception as err:  # noqa: BLE001 - reported in full to the user, never swallowed
        return None, f"{type(err).__name__}: {err}".splitlines()[0][:300]


def references_allowed() -> bool:
    return os.environ.get(ALLOW_REFERENCE_ENV, "") == "1"


def gpu_kernel(kernel: GPUKernel, device: torch.device) -> Callable | None:
    """The GPU function to run on ``device``; None means the PyTorch reference runs (any device
    but CUDA, or CUDA with the opt-out set). Raises :class:`KernelUnavailable` otherwise."""
    if device.type != "cuda":
        return None
    fn, error = _load(kernel)
    if fn is not None:
        return fn
    if references_allowed():
        return None
    raise KernelUnavailable(
        f"the {kernel.name} kernel on CUDA needs {kernel.package}, whose import failed ({error}); "
        f"pip install 'hebtron[gpu]' (or {kernel.package} built for this torch and CUDA), or set "
        f"{ALLOW_REFERENCE_ENV}=1 to run the PyTorch reference: 5-10x slower, with far more activation memory"
    )


def describe(kernel: GPUKernel, device: torch.device) -> str:
    """What runs on ``device``, for the start-of-run summary (raises where a run would)."""
    if gpu_kernel(kernel, device) is not None:
        return f"{kernel.package} ({kernel.attr})"
    if device.type == "cuda":
        return f"PyTorch reference ({ALLOW_REFERENCE_ENV}=1: {kernel.package} did not import)"
    return "PyTorch reference"
