"""No silent fallback to the PyTorch references where CUDA runs: a missing or broken GPU kernel
package stops the run with one line naming the package and its import error, unless
``HEBTRON_ALLOW_REFERENCE_KERNELS=1``; off CUDA the references run and nothing GPU-only is
imported. (The GPU packages are not installed here, so the missing case is the real one.)"""

from __future__ import annotations

import sys

import pytest
import torch

from hebtron.errors import UserError
from hebtron.kernels import dispatch
from hebtron.kernels.dispatch import CAUSAL_CONV1D, SSD_SCAN, KernelUnavailable, describe, gpu_kernel
from hebtron.model import HybridConfig, HybridModel
from hebtron.model.implementations import implementations
from tests.conftest import TINY_CONFIGS

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_imports(monkeypatch):
    monkeypatch.delenv(dispatch.ALLOW_REFERENCE_ENV, raising=False)
    dispatch._load.cache_clear()
    yield
    dispatch._load.cache_clear()


@pytest.mark.parametrize("kernel,module", [(SSD_SCAN, "mamba_ssm"), (CAUSAL_CONV1D, "causal_conv1d")])
def test_a_missing_gpu_package_on_cuda_is_one_line_naming_it_and_the_opt_out(kernel, module):
    assert module not in sys.modules
    with pytest.raises(KernelUnavailable) as err:
        gpu_kernel(kernel, CUDA)
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert f"needs {kernel.package}" in message and f"No module named '{module}'" in message
    assert "HEBTRON_ALLOW_REFERENCE_KERNELS=1" in message


def test_a_broken_build_is_reported_with_its_own_error(tmp_path, monkeypatch):
    """An extension that fails to load raises OSError, not ImportError: still one line, with it."""
    (tmp_path / "causal_conv1d.py").write_text(
        "raise OSError('libcudart.so.12: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "causal_conv1d", raising=False)
    with pytest.raises(KernelUnavailable, match=r"causal-conv1d, whose import failed \(OSError: libcudart\.so\.12"):
        gpu_kernel(CAUSAL_CONV1D, CUDA)


def test_the_opt_out_runs_the_reference_and_says_so(monkeypatch):
    monkeypatch.setenv(dispatch.ALLOW_REFERENCE_ENV, "1")
    assert gpu_kernel(SSD_SCAN, CUDA) is None
    assert describe(SSD_SCAN, CUDA).startswith("PyTorch reference (HEBTRON_ALLOW_REFERENCE_KERNELS=1: mamba-ssm")


def test_off_cuda_the_reference_runs_without_importing_anything():
    for kernel in (SSD_SCAN, CAUSAL_CONV1D):
        assert gpu_kernel(kernel, CPU) is None and describe(kernel, CPU) == "PyTorch reference"
    assert dispatch._load.cache_info().currsize == 0  # no import was even tried


def test_the_run_summary_names_every_part_and_stops_on_cuda_without_the_kernels():
    model = HybridModel(HybridConfig(**TINY_CONFIGS["all-types-grouped"]))
    assert implementations(model, CPU, torch.float32) == {
        "attention": "segments (packed rows), sdpa_causal (one-document rows)",
        "SSD scan": "PyTorch reference", "conv1d": "PyTorch reference", "experts": "grouped_mm",
    }
    with pytest.raises(KernelUnavailable, match="needs mamba-ssm"):
        implementations(model, CUDA, torch.bfloat16)

