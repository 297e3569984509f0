"""Fused ``lm_head`` + cross-entropy, chunk by chunk over the tokens.

At 8k context and a 131,072-token vocabulary, logits in fp32 are ~4.3 GB per row, and the plain
path (logits, log-softmax, their gradients) peaks near four times that. Here the head and the
loss run over ``chunk_size`` tokens at a time: each chunk's logits give its loss and, when a
gradient is wanted, its share of the head's gradients, and are dropped. At most one chunk of
logits is ever alive, and they are computed once (the gradient is formed in forward, as
Liger-Kernel's fused linear cross-entropy does; backward only scales it).

:func:`linear_cross_entropy_reference` is the plain version (the full logits), the reference the
chunked one is checked against. Both return the weighted sum over tokens (labels ``-100``
count zero); the caller divides by its global token count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 512 MiB in fp32 (1,024 tokens at vocab 131,072)


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay near 512 MiB."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's where it is on (as ``nn.Linear`` would), else the input's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Plain version: full (N, V) fp32 logits, then ``F.cross_entropy``; weighted sum (fp32)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight).float()
    losses = F.cross_entropy(logits, labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX)
    return (losses * weights.reshape(-1).to(losses.dtype)).sum()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """hidden (N, H), weight (V, H), labels (N,), weights (N,) -> scalar fp32 sum.

    When a gradient is wanted, forward also computes it, chunk by chunk, while each chunk's
    logits are alive (d loss / d logits = softmax - onehot), and backward only scales it by
    the incoming scalar: the head's logits are computed once instead of twice, and no
    log-softmax backward runs. What is kept between the two is the size of the inputs, the
    gradients that backward would allocate anyway. Without a gradient, forward keeps nothing."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
        chunk_size: int, dtype: torch.dtype,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h, w = hidden.to(dtype), weight.to(dtype)
        valid = labels != IGNORE_INDEX
        safe_labels = labels.masked_fill(~valid, 0)  # any other bad label still fails in gather
        coef = weights.float() * valid  # d total / d (lse - target) per token
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        with torch.autograd.grad_mode.no_grad(), torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                stop = start + chunk_size
                logits = (h[start:stop] @ w.t()).float()
                target = logits.gather(1, safe_labels[start:stop, None]).squeeze(1)
                row_max = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(row_max).exp_()  # in place: one pass, no second (chunk, V) buffer
                sum_exp = exp.sum(dim=-1, keepdim=True)
                chunk_lse = (row_max + sum_exp.log()).squeeze(1)
                scale = coef[start:stop, None]
                total += ((chunk_lse - target) * scale.squeeze(1)).sum()
                if grad_h is None and grad_w is None:
                    continue
                grad = exp.mul_(scale / sum_exp)  # softmax * coef
                grad.scatter_add_(1, safe_labels[start:stop, None], -scale)
                grad = grad.to(dtype)
                if grad_h is not None:
                    torch.mm(grad, w, out=grad_h[start:stop])
                if grad_w is not None and dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h[start:stop])  # accumulate in place: no (V, H) temporary
                elif grad_w is not None:  # bf16/fp16 matmul, fp32 accumulation (mixed addmm is not on CPU)
                    grad_w += (grad.t() @ h[start:stop]).float()
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_total.float()
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            (grad_h * scale).to(hidden_dtype) if ctx.needs_input_grad[0] else None,
            (grad_w * scale).to(weight_dtype) if ctx.needs_input_grad[1] else None,
            None, None, None, None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over tokens of ``weights * cross_entropy(hidden @ weight.T, labels)`` (fp32 scalar),
    ``chunk_size`` tokens at a time (default: :func:`default_chunk_size`). ``hidden`` (..., H),
    ``labels`` / ``weights`` with the same leading shape; labels ``-100`` count zero."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    labels, weights = labels.reshape(-1), weights.reshape(-1)
    if labels.shape[0] != flat.shape[0] or weights.shape[0] != flat.shape[0]:
        raise ValueError(
            f"chunked cross-entropy: {flat.shape[0]} tokens of hidden state but {labels.shape[0]} labels "
            f"and {weights.shape[0]} weights"
        )
    if weight.shape[1] != flat.shape[1]:
        raise ValueError(f"chunked cross-entropy: head weight {tuple(weight.shape)} does not take hidden size {flat.shape[1]}")
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunked cross-entropy: chunk_size must be >= 1, got {chunk}")
    return _ChunkedLinearCrossEntropy.apply(flat, weight, labels, weights, chunk, _compute_dtype(flat))
