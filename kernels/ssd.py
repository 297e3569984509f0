"""Mamba2 chunked state-space-duality (SSD) scan that restarts its state at document starts.

The recurrence per head is ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t`` and ``y_t = C_t h_t + D x_t``;
a token that starts a document sees ``h_{t-1} = 0``. The reference below is plain PyTorch (the
CPU path) and follows the chunked form of Dao & Gu (2024): quadratic attention-like work inside a
chunk, a linear recurrence between chunks. Packed documents are handled by masking, not by
splitting rows, so the packed result equals running each document alone.

Precision: every decay exponent is a sum over a contiguous span computed by a masked cumulative
sum (never a difference of two long cumulative sums), which keeps fp32 errors at the level of
one chunk. On CUDA mamba-ssm's Triton kernel (which takes ``seq_idx``) runs instead; without it a CUDA run
stops with one line unless ``HEBTRON_ALLOW_REFERENCE_KERNELS=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hebtron.kernels.dispatch import SSD_SCAN, gpu_kernel


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{k=j+1}^{i} a[..., k]`` for ``j <= i``, ``-inf`` above the diagonal."""
    n = a.size(-1)
    expanded = a[..., None].expand(*a.shape, n)  # [..., k, j] = a_k
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)
    summed = expanded.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.ones(n, n, dtype=torch.bool, device=a.device).tril()
    return summed.masked_fill(~lower, -math.inf)


def _span_adjoint(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n * n, n) 0/1 matrix: row ``i * n + j`` has ones at ``j < k <= i`` (the spans of :func:`segsum`)."""
    k = torch.arange(n, device=device)
    return ((k[None, :, None] < k) & (k <= k[:, None, None])).to(dtype).reshape(n * n, n)


class _SpanDecay(torch.autograd.Function):
    """``exp(segsum(a))``, zero across documents (``same_doc`` False): the intra-chunk decay.

    Forward is :func:`segsum` (each exponent summed over its own span) and keeps only the
    decay. Backward is written out: d decay / d seg = decay, and each ``a_k`` receives the
    gradient of every span that contains it, one matmul with the 0/1 span matrix. Autograd
    over segsum instead keeps the expanded (..., l, s) sums and runs masked fills, two flips
    and a reversed cumsum over them."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, same_doc: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        seg = segsum(a)
        if same_doc is not None:
            seg = seg.masked_fill_(~same_doc, -math.inf)
        decay = seg.exp_()
        ctx.save_for_backward(decay)
        return decay

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (decay,) = ctx.saved_tensors
        n = decay.shape[-1]
        grad_seg = (grad * decay).flatten(-2)  # zero wherever the decay is (masked or -inf)
        return grad_seg @ _span_adjoint(n, grad.device, grad.dtype), None


def ssd_chunk_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked SSD scan; returns y with the shape and dtype of ``x``.

    x: (b, T, heads, p); dt: (b, T, heads) before bias/softplus; A: (heads,) negative;
    B, C: (b, T, groups, n); D, dt_bias: (heads,); seq_idx: (b, T) document index per token,
    contiguous documents with distinct ids (e.g. 0, 0, 1, 1, 1, 2), or None.
    Computed in fp32.
    """
    batch, seqlen, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups
    out_dtype = x.dtype

    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    pad = (-seqlen) % chunk_size
    nchunks = (seqlen + pad) // chunk_size
    xf = x.float()
    xdt = xf * dt[..., None]
    a = dt * A.float()
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
    L = chunk_size
    # layouts: xdt (b, c, l, g, r, p); B, C (b, c, l, g, n); a -> (b, c, g, r, l)
    xdt = xdt.view(batch, nchunks, L, groups, rep, p)
    Bc = B.float().view(batch, nchunks, L, groups, n)
    Cc = C.float().view(batch, nchunks, L, groups, n)
    a = a.view(batch, nchunks, L, groups, rep).permute(0, 1, 3, 4, 2)
    sidx = seq_idx.view(batch, nchunks, L) if seq_idx is not None else None

    same_doc = sidx[:, :, None, None, :, None] == sidx[:, :, None, None, None, :] if sidx is not None else None
    decay = _SpanDecay.apply(a, same_doc)  # (b, c, g, r, l, s)

    # 1. inside each chunk: y[l] = sum_s (C_l . B_s) decay[l, s] xdt[s]
    cb = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    scores = cb[:, :, :, None] * decay  # (b, c, g, r, l, s)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end (tokens of the last document only)
    decay_to_end = decay[..., -1, :]  # (b, c, g, r, l) = exp(sum_{k=l+1}^{L-1} a_k), masked by document
    states = torch.einsum("bclgrp,bclgn->bcgrpn", xdt * decay_to_end.permute(0, 1, 4, 2, 3)[..., None], Bc)

    # 3. between chunks: the state entering chunk c, from the chunks before it (same document only)
    chunk_decay = a.sum(dim=-1)  # (b, c, g, r)
    padded = F.pad(chunk_decay.permute(0, 2, 3, 1), (1, 0))  # (b, g, r, c+1)
    across = segsum(padded)  # (b, g, r, c+1, z)
    if sidx is not None:
        last = sidx[:, :, -1]
        prev_last = torch.cat([torch.full_like(last[:, :1], -1), last], dim=1)  # doc at end of chunk z-1
        connected = prev_last[:, :, None] == prev_last[:, None, :]
        across = across.masked_fill(~connected[:, None, None], -math.inf)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (b, c+1, g, r, p, n)
    entering = torch.einsum("bgrcz,bzgrpn->bcgrpn", torch.exp(across), states)[:, :-1]

    # 4. the entering state's contribution to each token of the chunk
    decay_from_start = torch.exp(a.cumsum(dim=-1))  # (b, c, g, r, l)
    if sidx is not None:
        doc_before = prev_last[:, :-1]  # (b, c): document of the state entering chunk c
        decay_from_start = decay_from_start * (sidx == doc_before[:, :, None])[:, :, None, None]
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cc, entering)
    y = y + y_off * decay_from_start.permute(0, 1, 4, 2, 3)[..., None]

    y = y.reshape(batch, nchunks * L, heads, p)[:, :seqlen]
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(out_dtype)


def ssd_sequential_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recurrence token by token (dt already discretized): the ground truth in tests."""
    batch, seqlen, heads, p = x.shape
    rep = heads // B.shape[2]
    Bh = B.float().repeat_interleave(rep, dim=2)
    Ch = C.float().repeat_interleave(rep, dim=2)
    state = x.new_zeros(batch, heads, p, B.shape[3], dtype=torch.float32)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t].float() * A.float())  # (b, h)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None]
        elif t == 0:
            decay = torch.zeros_like(decay)
        update = (dt[:, t].float()[..., None] * x[:, t].float())[..., None] * Bh[:, t, :, None, :]
        state = state * decay[..., None, None] + update
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y = y + D.float()[:, None] * x[:, t].float()
        ys.append(y)
    return torch.stack(ys, dim=1).to(x.dtype)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch: mamba-ssm's Triton kernel on CUDA (its absence there is an error, see
    :mod:`hebtron.kernels.dispatch`), the reference elsewhere."""
    if x.is_cuda and (kernel := gpu_kernel(SSD_SCAN, x.device)) is not None:
        idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        return kernel(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, seq_idx=idx
        )
    return ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, seq_idx)
