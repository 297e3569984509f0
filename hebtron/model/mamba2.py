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
        batch, seqlen, _ = hidden.shape
        gate, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        xbc = causal_conv1d(
            xbc.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx, activation="silu"
        ).transpose(1, 2)
        x, B, C = xbc.split([self.inner, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)
        y = ssd_chunk_scan(
            x.reshape(batch, seqlen, self.num_heads, self.head_dim),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(batch, seqlen, self.n_groups, self.state_size),
            C.reshape(batch, seqlen, self.n_groups, self.state_size),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            seq_idx=seq_idx,
        )
        y = self.norm(y.reshape(batch, seqlen, self.inner), gate)
        return self.out_proj(y.to(hidden.dtype))
