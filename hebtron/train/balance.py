"""MoE load balancing: the auxiliary losses and the aux-loss-free expert bias, as formulas.

All losses use the router scores normalized per token to a distribution ``p`` (sigmoid scores
divided by their sum, as DeepSeek-V3 and Megatron do; softmax scores already sum to one) and
the detached top-k assignment counts. With ``E`` experts, top-``k`` routing and ``T`` real
tokens in the group a loss is taken over:

    f_i = count_i / (k T)          (fraction of assignments to expert i; sums to 1)
    P_i = sum_t p_ti / T           (mean probability of expert i)
    L   = E * sum_i f_i P_i        (1.0 when both are uniform)

The switch/GShard loss takes the group to be one micro-batch, the sequence-level loss
(DeepSeek-V3, Nemotron 3) one row, the global-batch loss the whole optimizer step (all
micro-batches on all ranks). The router z-loss is the mean of logsumexp(logits)^2. Padding is
excluded by the caller's mask. :mod:`hebtron.train.moe_step` applies them in the loop.
"""

from __future__ import annotations

import torch


def balance_loss(
    counts: torch.Tensor, prob_sums: torch.Tensor, tokens: torch.Tensor | float, top_k: int
) -> torch.Tensor:
    """``E * sum_i f_i P_i`` over the last axis: counts (..., E) detached, prob_sums (..., E) = sum
    of ``p`` over the same ``tokens`` real tokens (differentiable). Empty groups give 0."""
    num_experts = counts.shape[-1]
    t = torch.as_tensor(tokens, dtype=prob_sums.dtype, device=prob_sums.device).clamp(min=1)
    return num_experts * (counts.to(prob_sums.dtype) * prob_sums).sum(dim=-1) / (top_k * t * t)


def row_balance_losses(topk_idx: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sequence-level loss of every row: topk_idx (L, b, T, k), probs (L, b, T, E), mask (b, T)
    (True = real token) -> (L, b). Rows without real tokens give 0."""
    layers, rows, seq, _ = topk_idx.shape
    num_experts = probs.shape[-1]
    weight = mask.to(probs.dtype)
    counts = torch.zeros(layers, rows, num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(2, topk_idx.reshape(layers, rows, -1),
                        weight.repeat_interleave(top_k, dim=1).expand(layers, rows, seq * top_k))
    prob_sums = (probs * weight[None, :, :, None]).sum(dim=2)
    return balance_loss(counts, prob_sums, weight.sum(dim=1), top_k)


def z_loss_sums(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Router z-loss numerator: logits (L, N, E), mask (N,) -> (L,) sum over real tokens of
    logsumexp(logits)^2 (divide by the global token count for the mean)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return (lse.square() * mask.to(lse.dtype)).sum(dim=-1)


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): ``bias_i += rate * sign(mean_load - load_i)``.

    ``bias`` (E,) is the router's fp32 ``e_score_correction_bias`` (a buffer, outside the
    optimizer; it shifts which experts are chosen, not their weights). ``counts`` (E,) must be the
    step's assignment counts summed over ranks, so every rank applies the same update.
    """
    counts = counts.to(torch.float64)
    step = torch.sign(counts.mean() - counts) * rate
    bias.add_(step.to(device=bias.device, dtype=bias.dtype))
    return bias
