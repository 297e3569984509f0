"""The GPU (Transformer Engine spec) Mamba mixer, run on CPU: Megatron's real ``MambaMixer.forward``
with its fused kernel ``mamba_split_conv1d_scan_combined`` replaced by a recorder that computes
the same with hebtron's PyTorch kernels. It must get Nemotron-H's ``dt_limit`` and the packed
``seq_idx`` and then equal hebtron's CPU mixer (itself checked against native and HF), packed and
unpacked; with the clamp taken away the outputs differ, so the comparison can fail. Megatron runs
in a child process (its CPU compatibility layer patches torch)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # Megatron-Core in a child process

# dt_bias is set so softplus(dt) mostly falls below time_step_min: the clamp decides the result
CONFIG = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M", mamba_num_heads=4, mamba_head_dim=8,
              ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8, time_step_min=0.02)


def test_te_spec_mixer_clamps_dt_and_matches_the_cpu_mixer():
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["mixer_class"] == "ClampedMambaMixer" and r["spec_dt_limit"] == [0.02, "inf"], r
    # the unpacked and packed calls got Nemotron-H's clamp; the last one ran with the clamp taken away
    assert r["kernel_dt_limits"] == [[0.02, "inf"], [0.02, "inf"], [0.0, "inf"]], r
    assert r["kernel_restored"], r  # the mixer module's name is Megatron's own again after each call
    assert r["unpacked"] < 1e-5 and r["packed"] < 1e-5, r
    assert r["packed_seq_idx_reached_kernel"] and r["filled_seq_idx_equals_megatrons"], r
    assert r["unclamped"] > 1e-3, r  # without dt_limit the GPU path would train a different model


def _reference_kernel(calls: list):
    """``mamba_split_conv1d_scan_combined`` (mamba-ssm, no rmsnorm_weight / outproj) in PyTorch:
    zxbcdt -> z | xBC | dt, causal conv + SiLU, SSD scan with dt softplus and clamp, y * silu(z)."""
    import types

    import torch
    import torch.nn.functional as F

    from hebtron.model.mamba2 import conv_and_scan

    def kernel(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None,
               dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu", rmsnorm_weight=None,
               rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1,
               norm_before_gate=True):
        assert activation == "silu" and rmsnorm_weight is None and outproj_weight is None and not norm_before_gate
        calls.append({"dt_limit": list(dt_limit), "seq_idx": seq_idx})
        heads = dt_bias.shape[0]
        conv_dim = conv1d_weight.shape[0]
        inner = heads * headdim
        state = (conv_dim - inner) // (2 * ngroups)
        z, xbc, dt = zxbcdt.split([inner, conv_dim, heads], dim=-1)
        conv = types.SimpleNamespace(weight=conv1d_weight.unsqueeze(1), bias=conv1d_bias)
        y = conv_and_scan(xbc, dt, conv, torch.log(-A), D, dt_bias, tuple(dt_limit), chunk_size, heads, headdim,
                          ngroups, state, None if seq_idx is None else seq_idx.long())
        return y * F.silu(z)

    return kernel


def _held(mixer, name: str) -> str:
    """A parameter's name as the mixer holds it (megatron-core 0.19: conv1d_weight, not conv1d.weight)."""
    return name if "conv1d" in mixer._modules or not name.startswith("conv1d.") else name.replace(".", "_")


def _worker() -> dict:
    import torch
    from torch import nn

    from hebtron.backends.megatron import compat, runtime

    compat.apply()
    from megatron.core.ssm import mamba_mixer as mm
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from hebtron.backends.megatron.batches import to_megatron
    from hebtron.backends.megatron.config_map import ParallelPlan, transformer_config
    from hebtron.backends.megatron.specs import local_stack_spec, te_stack_spec
    from hebtron.model.config import HybridConfig

    cfg = HybridConfig(**CONFIG)
    runtime.init_model_parallel(ParallelPlan(), seed=0)
    config = transformer_config(cfg, cpu=True)
    calls: list = []
    kernel = _reference_kernel(calls)
    mm.HAVE_MAMBA_SSM = True  # mamba-ssm does not exist here: the recorder stands in for its kernel
    mm.mamba_split_conv1d_scan_combined = kernel
    mm._check_mamba_sequence_packing_support = lambda **_: (True, None)

    te_spec = te_stack_spec(cfg).submodules.mamba_layer.submodules.mixer
    local_spec = local_stack_spec(cfg, None).submodules.mamba_layer.submodules.mixer
    linears = MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)  # TE's need a GPU
    pg = runtime.pg_collection()
    gpu = build_module(ModuleSpec(module=te_spec.module, params=te_spec.params, submodules=linears),
                       config, d_model=cfg.hidden_size, layer_number=1, pg_collection=pg)
    cpu = build_module(local_spec, config, d_model=cfg.hidden_size, layer_number=1, pg_collection=pg)
    with torch.no_grad():
        cpu.dt_bias.fill_(-5.0)  # softplus(dt + dt_bias) mostly below time_step_min = 0.02
        cpu.A_log.uniform_(-1.0, 1.0)
        cpu.D.normal_()
        cpu.norm.weight.normal_(1.0, 0.1)
        for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "out_proj.weight"):
            gpu.get_parameter(_held(gpu, name)).copy_(cpu.get_parameter(_held(cpu, name)))

    class GatedOutputNorm(nn.Module):
        """Megatron's RMSNormGated (norm_before_gate=False) after the kernel has gated y by silu(z)."""

        def __init__(self, weight: torch.Tensor, group: int, eps: float) -> None:
            super().__init__()
            self.weight, self.group, self.eps = weight, group, eps

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            g = y.float().view(*y.shape[:-1], -1, self.group)
            g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
            return (self.weight * g.view_as(y)).to(y.dtype)

    gpu.norm = GatedOutputNorm(cpu.norm.weight.detach(), cpu.norm.group_size, cpu.norm.eps)
    out: dict = {"mixer_class": type(gpu).__name__,
                 "spec_dt_limit": [te_spec.params["dt_limit"][0],
                                   "inf" if math.isinf(te_spec.params["dt_limit"][1]) else te_spec.params["dt_limit"][1]]}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 2, cfg.hidden_size, generator=g)  # (s, b, h)
    with torch.no_grad():
        out["unpacked"] = float((gpu(hidden)[0] - cpu(hidden)[0]).abs().max())
        ids = torch.zeros(1, 48, dtype=torch.long)
        seq_idx = torch.tensor([[0] * 11 + [1] * 20 + [2] * 17])
        params = to_megatron({"input_ids": ids, "labels": ids, "loss_mask": ids, "seq_idx": seq_idx}).packed_seq_params
        params.seq_idx = None  # as megatron-core 0.17+ PackedSeqParams without total_tokens: the mixer fills it
        packed = torch.randn(48, 1, cfg.hidden_size, generator=g)
        out["packed"] = float((gpu(packed, packed_seq_params=params)[0] - cpu(packed, packed_seq_params=params)[0]).abs().max())
        reached = calls[-1]["seq_idx"]
        out["packed_seq_idx_reached_kernel"] = reached is not None and bool((reached[0].long() == seq_idx[0]).all())
        out["filled_seq_idx_equals_megatrons"] = params.seq_idx is not None and bool(torch.equal(params.seq_idx, reached))
        gpu.dt_limit = (0.0, math.inf)
        out["unclamped"] = float((gpu(hidden)[0] - cpu(hidden)[0]).abs().max())
    out["kernel_dt_limits"] = [[c["dt_limit"][0], "inf" if math.isinf(c["dt_limit"][1]) else c["dt_limit"][1]]
                               for c in calls]
    out["kernel_restored"] = mm.mamba_split_conv1d_scan_combined is kernel
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(_worker()))
