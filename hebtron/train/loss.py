"""Token losses, summed: the loop divides by the global count of loss tokens.

Summing per micro-batch and dividing once by the count over the whole optimizer step (all
micro-batches, all ranks) weighs every loss token equally however the batch is split;
averaging per micro-batch would over-weigh micro-batches with few loss tokens.

Training uses :func:`token_loss_sum_from_hidden`: the head and the loss run chunk by chunk
(:mod:`hebtron.kernels.chunked_ce`), so no (b, T, vocab) fp32 logits exist in forward or
backward. :func:`token_loss_sum` takes logits that are already there (evaluation of other
models, tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hebtron.kernels.chunked_ce import chunked_linear_cross_entropy

PLAIN_MAX_LOGITS = 2**25  # 128 MB of fp32 logits: below this the head is materialized
LOSS_IMPLEMENTATION = "chunked linear cross-entropy (plain below 2^25 logits per micro-batch)"


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over tokens where ``loss_mask`` is 1 (fp32)."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    return (losses * loss_mask.reshape(-1).to(losses.dtype)).sum()


def token_loss_sum_from_hidden(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`token_loss_sum` of ``hidden @ lm_head_weight.T`` without materializing the logits:
    ``hidden`` (b, T, H) after the final norm (``model(..., return_hidden=True).hidden``),
    ``loss_mask`` float weights (SFT per-sample averaging allowed), labels -100 count zero.

    Small logits (at most :data:`PLAIN_MAX_LOGITS` entries, e.g. the CPU demo's 4 x 256 x 8k)
    are cheaper materialized than recomputed chunk by chunk in backward, so unless a
    ``chunk_size`` is asked for they take the plain path; Nemotron-sized heads (8k x 131k per
    row) always go through the chunked kernel."""
    if chunk_size is None and hidden.shape[:-1].numel() * lm_head_weight.shape[0] <= PLAIN_MAX_LOGITS:
        return token_loss_sum(F.linear(hidden, lm_head_weight), labels, loss_mask)
    return chunked_linear_cross_entropy(hidden, lm_head_weight, labels, loss_mask, chunk_size)
