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

LOSS_IMPLEMENTATION = "chunked linear cross-entropy, gradient formed in forward"


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
    The kernel computes the logits once, whatever their size (see :mod:`hebtron.kernels.chunked_ce`)."""
    return chunked_linear_cross_entropy(hidden, lm_head_weight, labels, loss_mask, chunk_size)
