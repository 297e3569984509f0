"""Mixture of experts: the Nemotron 3 router and squared-ReLU experts, plus a shared expert.

The router is computed in fp32. ``sigmoid`` (Nemotron 3): sigmoid scores, top-k chosen on
scores + ``e_score_correction_bias`` (the aux-loss-free balancing bias, a buffer outside the
optimizer), limited to the best ``topk_group`` of ``n_group`` groups, weights taken from the
unbiased scores, optionally normalized, then scaled by ``routed_scaling_factor``. ``softmax``
is the classic top-k over softmax probabilities. Every forward leaves a :class:`RouterRecord`
for aux losses and monitors; the model itself computes no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hebtron.model.config import HybridConfig
from hebtron.model.mlp import MLP, relu2


@dataclass
class RouterRecord:
    """What one MoE layer's router did in one forward. Token axis is batch-major (b * T)."""

    layer: int
    logits: torch.Tensor  # (N, E) fp32 router logits
    scores: torch.Tensor  # (N, E) fp32 sigmoid or softmax scores, differentiable
    topk_idx: torch.Tensor  # (N, k) selected experts
    topk_weight: torch.Tensor  # (N, k) combine weights (normalized, scaled), differentiable
    tokens_per_expert: torch.Tensor  # (E,) int64 assignment counts over all N tokens, on the device

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]


class TopKRouter(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.score_function = config.router_score_function
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, H) -> logits, scores, topk_idx, topk_weight."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 routing even under bf16 autocast, as Nemotron
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_function == "sigmoid" else logits.softmax(dim=-1)
        choice = (scores + self.e_score_correction_bias).detach()
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // self.n_group, dim=1), -torch.inf)
        topk_idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
        topk_weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, scores, topk_idx, topk_weight * self.scaling


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """grouped_mm is not on autocast's op lists: cast by hand to what autocast would use."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def grouped_experts(
    x_sorted: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """Squared-ReLU experts over tokens sorted by expert, as two ``grouped_mm`` calls.

    ``x_sorted`` (M, H) holds expert 0's rows first, then expert 1's, ...; ``tokens_per_expert``
    (E,) stays on the device (offsets are its int32 cumsum), so nothing waits for the host.
    grouped_mm wants each operand's row stride to be a multiple of 16 bytes (CPU and CUDA alike);
    a width off that (toy shapes only, e.g. 20 in bf16) is zero-padded, which changes no sum.
    Group sizes need no padding for bf16/fp32 (only fp8 variants want aligned groups).
    """
    dtype = _compute_dtype(x_sorted)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"grouped experts: grouped_mm takes float32, bfloat16 or float16, not {dtype}; "
                        "set experts.grouped = False to run the per-expert loop")
    align = 16 // dtype.itemsize
    hidden, inner = up_proj.shape[2], up_proj.shape[1]
    hidden_p, inner_p = -(-hidden // align) * align, -(-inner // align) * align
    offsets = tokens_per_expert.cumsum(0, dtype=torch.int32)
    up = up_proj.to(dtype)  # (E, inner, hidden)
    down = down_proj.to(dtype)  # (E, hidden, inner)
    if (hidden_p, inner_p) != (hidden, inner):
        up = F.pad(up, (0, hidden_p - hidden, 0, inner_p - inner))
        down = F.pad(down, (0, inner_p - inner, 0, hidden_p - hidden))
    h = F.grouped_mm(_pad_last(x_sorted.to(dtype), hidden_p), up.transpose(-2, -1), offs=offsets)
    y = F.grouped_mm(relu2(h), down.transpose(-2, -1), offs=offsets)
    return y[:, :hidden] if hidden_p != hidden else y


def looped_experts(
    x_sorted: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """The reference: one matmul pair per expert with tokens (reads the counts on the host)."""
    outputs = []
    start = 0
    for expert, count in enumerate(tokens_per_expert.tolist()):
        if count:
            chunk = x_sorted[start : start + count]
            outputs.append(relu2(chunk @ up_proj[expert].t()) @ down_proj[expert].t())
        start += count
    return torch.cat(outputs)


class Experts(nn.Module):
    """Routed squared-ReLU experts stored as stacked 3-D weights (on disk: one tensor per expert).

    ``grouped`` (default) runs them through ``grouped_mm``; False runs the per-expert loop, the
    reference the tests compare against.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.grouped = True

    def forward(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        """Tokens permuted by expert (a stable argsort on the device), the experts, weighted, scattered back."""
        k = topk_idx.shape[1]
        order = topk_idx.reshape(-1).argsort(stable=True)
        token_of = order // k
        x_sorted = x[token_of]
        run = grouped_experts if self.grouped else looped_experts
        y = run(x_sorted, self.up_proj, self.down_proj, tokens_per_expert) * topk_weight.reshape(-1)[order, None]
        return torch.zeros(x.shape[0], x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token_of, y)


class MoE(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        inner = config.moe_latent_size or config.hidden_size
        self.gate = TopKRouter(config)
        self.experts = Experts(config.n_routed_experts, inner, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, config.mlp_bias)
            if config.n_shared_experts > 0
            else None
        )
        if config.moe_latent_size:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, inner, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(inner, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, RouterRecord]:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits, scores, topk_idx, topk_weight = self.gate(x)
        flat_idx = topk_idx.reshape(-1)
        # scatter_add, not bincount: CUDA's bincount reads the max on the host
        tokens_per_expert = torch.zeros(self.gate.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx)
        )
        routed_in = self.fc1_latent_proj(x) if self.fc1_latent_proj is not None else x
        routed = self.experts(routed_in, topk_idx, topk_weight, tokens_per_expert)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed.to(x.dtype))
        out = routed.to(hidden.dtype).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        record = RouterRecord(self.layer_idx, logits, scores, topk_idx, topk_weight, tokens_per_expert)
        return out, record
