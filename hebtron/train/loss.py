"""Token losses, summed: the loop divides by the global count of loss tokens.

Summing per micro-batch and dividing once by the count over the whole optimizer step (all
micro-batches, all ranks) weighs every loss token equally however the batch is split;
averaging per micro-batch would over-weigh micro-batches with few loss tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over tokens where ``loss_mask`` is 1 (fp32)."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    return (losses * loss_mask.reshape(-1).to(losses.dtype)).sum()
