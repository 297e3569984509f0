"""Mamba2 mixer: in_proj -> causal conv1d -> chunked SSD scan (+ D skip) -> gated RMSNorm -> out_proj.

Parameter names and shapes match HF ``NemotronHMamba2Mixer`` so checkpoints map one to one.
``seq_idx`` restarts the conv and the scan at every document start (exact packing).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hebtron.kernels.causal_conv1d import causal_conv1d
from hebtron.kernels.ssd import ssd_chunk_scan
from hebtron.model.config import HybridConfig
from hebtron.model.norms import GatedRMSNorm


def conv_and_scan(
    xbc: torch.Tensor, dt: torch.Tensor, conv1d: nn.Conv1d, A_log: torch.Tensor, D: torch.Tensor,
    dt_bias: torch.Tensor, dt_limit: tuple[float, float], chunk_size: int, num_heads: int, head_dim: int,
    n_groups: int, state_size: int, seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Mamba2 token mixing between in_proj and the gated norm: depthwise causal conv (SiLU)
    over x|B|C, then the chunked SSD scan with the D skip; (batch, seqlen, heads x head_dim).
    One definition for this mixer and the Megatron CPU spec, so both backends mix alike."""
    batch, seqlen, _ = xbc.shape
    xbc = causal_conv1d(
        xbc.transpose(1, 2), conv1d.weight.squeeze(1), conv1d.bias, seq_idx=seq_idx, activation="silu"
    ).transpose(1, 2)
    inner, groups_state = num_heads * head_dim, n_groups * state_size
    x, B, C = xbc.split([inner, groups_state, groups_state], dim=-1)
    y = ssd_chunk_scan(
        x.reshape(batch, seqlen, num_heads, head_dim),
        dt,
        -torch.exp(A_log.float()),
        B.reshape(batch, seqlen, n_groups, state_size),
        C.reshape(batch, seqlen, n_groups, state_size),
        chunk_size,
        D=D,
        dt_bias=dt_bias,
        dt_softplus=True,
        dt_limit=dt_limit,
        seq_idx=seq_idx,
    )
    return y.reshape(batch, seqlen, inner)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.chunk_size = config.chunk_size
        self.inner = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        # Nemotron-H clamps dt from below at time_step_min (both its kernel and torch paths).
        self.dt_limit = (config.time_step_min, math.inf)
        self.in_proj = nn.Linear(config.hidden_size, self.inner + self.conv_dim + self.num_heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.inner, self.inner // self.n_groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        gate, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        y = conv_and_scan(xbc, dt, self.conv1d, self.A_log, self.D, self.dt_bias, self.dt_limit, self.chunk_size,
                          self.num_heads, self.head_dim, self.n_groups, self.state_size, seq_idx)
        y = self.norm(y, gate)
        return self.out_proj(y.to(hidden.dtype))
