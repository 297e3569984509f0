"""Grouped-query attention as in Nemotron-H: no positional encoding (the Mamba layers carry order),
no biases, causal; with ``seq_idx`` a token attends only inside its own document.

No dense (b, 1, T, T) mask is built for training. The decoder describes a batch's documents once
per forward (:func:`prepare_documents`) and every attention layer takes one of these paths
(:func:`attention_path` decides, from the device and dtype only, with no host sync):

- ``sdpa_causal``: rows without document boundaries; ``scaled_dot_product_attention(is_causal=True)``,
  so the flash kernels stay usable.
- ``varlen``: CUDA, fp16/bf16, ``torch.nn.attention.varlen`` present: the flash varlen kernel over
  ``cu_seqlens`` (the batch flattened, one segment per document).
- ``flex``: CUDA otherwise (e.g. fp32): compiled FlexAttention with a document block mask, so
  the blocks that cross documents and the upper triangle are never computed.
- ``segments``: every other device (CPU). torch's FlexAttention has no backward on CPU (it raises
  ``NotImplementedError``), so a CPU step runs causal SDPA once per document: exact, memory
  O(sum of document lengths squared) at most, no mask.
- ``dense``: the (b, 1, T, T) boolean mask, kept only as the reference for tests.

Documents are the maximal runs of equal ``seq_idx`` in a row (what the packer writes; trailing
padding is a run of its own), so every path agrees on what a document is.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from hebtron.model.config import HybridConfig

ATTENTION_IMPLS = ("auto", "sdpa_causal", "varlen", "flex", "segments", "dense")
FLEX_BLOCK_SIZE = 128  # FlexAttention's default sparse block (its Triton kernels tile by it)

# Compile FlexAttention (one compiled callable per process). Uncompiled, flex_attention runs an
# unfused implementation that materializes every score. Tests may set this False on CPU to skip a
# ~20 s inductor compile per shape: the block mask and mask_mod given to flex are the same.
flex_compiled = True


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, 1, T, T) boolean mask: causal and same document. The test reference only."""
    seqlen = seq_idx.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=seq_idx.device).tril()
    return (causal & (seq_idx[:, :, None] == seq_idx[:, None, :])).unsqueeze(1)


def document_runs(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, T) int64 run index per row (0, 1, ...): a new document wherever ``seq_idx`` changes.
    Monotone by construction, which the block-mask and cu_seqlens builders rely on."""
    change = torch.zeros_like(seq_idx, dtype=torch.long)
    change[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return change.cumsum(dim=1)


# ----------------------------------------------------------------------------- dispatch
@functools.cache
def _varlen_api() -> tuple[Callable[..., torch.Tensor], frozenset[str]] | None:
    """``varlen_attn`` and its keyword names, or None where this torch has none. Its signature
    moved between releases (``is_causal`` -> ``window_size``; ``enable_gqa`` added later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen_fits(dtype: torch.dtype, head_dim: int) -> bool:
    """The flash varlen kernel takes fp16/bf16 and head dims that are multiples of 8 up to 256."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def attention_path(
    device: torch.device, dtype: torch.dtype, head_dim: int, has_documents: bool, requested: str = "auto"
) -> str:
    """The attention implementation for one forward (see the module docstring). Metadata only:
    no tensor is read, so choosing costs no host sync. ``requested`` forces one (tests, benches)."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation: expected one of {', '.join(ATTENTION_IMPLS)}, got {requested!r}")
    if not has_documents:
        return "sdpa_causal"
    if requested == "varlen":
        if device.type != "cuda":
            raise ValueError(
                f"attention implementation 'varlen' needs CUDA (torch.nn.attention.varlen), not {device.type}"
            )
        if _varlen_api() is None:
            raise ValueError(
                f"attention implementation 'varlen': this torch ({torch.__version__}) has no torch.nn.attention.varlen"
            )
        if not _flash_varlen_fits(dtype, head_dim):
            raise ValueError(f"attention implementation 'varlen' needs fp16/bf16 and head_dim % 8 == 0 <= 256, "
                             f"got {dtype} and head_dim {head_dim}")
        return "varlen"
    if requested != "auto":
        return requested
    if device.type == "cuda":
        if _varlen_api() is not None and _flash_varlen_fits(dtype, head_dim):
            return "varlen"
        return "flex"
    return "segments"


# ------------------------------------------------------------------ document layout
def _document_causal_mask_mod(runs: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention mask_mod: same run and causal. ``runs`` is padded to whole blocks, so the
    kernel's indices past T stay in bounds (their keys are never live: kv >= T > q)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (runs[b, q] == runs[b, kv]) & (kv <= q)

    return mask_mod


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, nq, nk) booleans -> BlockMask's (count, indices), live block indices first."""
    as_int = blocks.to(torch.int32)
    counts = as_int.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.unsqueeze(1).contiguous(), indices.unsqueeze(1).contiguous()


def document_block_mask(runs: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """FlexAttention block mask of document-causal attention, built from block-level extremes of
    the (monotone) run index: O(b (T / block)^2) work, no dense mask, no compile, no host sync.

    For a query block i and a key block j <= i: the block has live entries iff the key block's
    last run reaches the query block's first run (j == i always: a token sees itself); it is
    full (mask_mod skipped) iff j < i, both blocks are whole, and all their tokens share one run.
    """
    batch, seqlen = runs.shape
    nblocks = math.ceil(seqlen / block_size)
    pad = nblocks * block_size - seqlen
    block_max = F.pad(runs, (0, pad), value=-1).view(batch, nblocks, block_size).amax(dim=-1)
    block_min = F.pad(runs, (0, pad), value=seqlen).view(batch, nblocks, block_size).amin(dim=-1)  # runs < seqlen
    idx = torch.arange(nblocks, device=runs.device)
    below = idx[None, :] < idx[:, None]  # (q block, kv block): kv block strictly before
    diagonal = idx[None, :] == idx[:, None]
    whole = idx < seqlen // block_size
    live = diagonal | (below & (block_max[:, None, :] >= block_min[:, :, None]))
    full = below & (whole[:, None] & whole[None, :]) & (block_min[:, None, :] == block_max[:, :, None])
    partial = live & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    padded_runs = F.pad(runs, (0, pad), value=-1)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
        mask_mod=_document_causal_mask_mod(padded_runs), seq_lengths=(seqlen, seqlen),
    )


@dataclass
class Documents:
    """A batch's documents as one attention path needs them; built once per forward by the
    decoder and shared by every attention layer (and by activation-checkpoint recomputes)."""

    path: str
    cu_seqlens: torch.Tensor | None = None  # (n + 1,) int32 on the device, flattened batch (varlen)
    max_seqlen: int = 0  # longest document (varlen)
    segments: list[tuple[int, int]] | None = None  # (start, end) in the flattened batch (segments)
    block_mask: BlockMask | None = None  # flex
    mask: torch.Tensor | None = None  # (b, 1, T, T) bool (dense reference)


def _flat_segments(runs: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """cu_seqlens over the flattened batch (int64, on the CPU) and its values. One copy of the
    (b, T) boundary flags to the host on CUDA: once per forward, not per layer."""
    batch, seqlen = runs.shape
    starts = torch.ones_like(runs, dtype=torch.bool)
    starts[:, 1:] = runs[:, 1:] != runs[:, :-1]
    flat = starts.reshape(-1).cpu()
    cu = torch.cat([torch.nonzero(flat).flatten(), torch.tensor([batch * seqlen])])
    return cu, cu.tolist()


def prepare_documents(seq_idx: torch.Tensor, path: str, block_size: int = FLEX_BLOCK_SIZE) -> Documents:
    """What ``path`` needs from ``seq_idx`` (b, T), computed once for all attention layers."""
    runs = document_runs(seq_idx)
    if path == "dense":
        return Documents(path, mask=document_causal_mask(runs))
    if path == "flex":
        return Documents(path, block_mask=document_block_mask(runs, block_size))
    if path in ("varlen", "segments"):
        cu, bounds = _flat_segments(runs)
        max_seqlen = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        if path == "segments":
            return Documents(path, max_seqlen=max_seqlen, segments=list(zip(bounds[:-1], bounds[1:], strict=True)))
        cu_dev = cu.to(device=seq_idx.device, dtype=torch.int32)
        return Documents(path, cu_seqlens=cu_dev, max_seqlen=max_seqlen)
    raise ValueError(f"prepare_documents: no document layout for attention path {path!r}")


# ------------------------------------------------------------------------ kernels
@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    return torch.compile(flex_attention)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, gqa: bool) -> torch.Tensor:
    fn = _compiled_flex() if flex_compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """q (N, H, D), k/v (N, Hkv, D) over the flattened batch -> (N, H, D)."""
    api = _varlen_api()
    if api is None:  # attention_path never picks varlen then; reaching here is a bug
        raise RuntimeError("attention path 'varlen' without torch.nn.attention.varlen")
    varlen_attn, params = api
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        raise RuntimeError(f"torch.nn.attention.varlen.varlen_attn has no causal option (parameters: {sorted(params)})")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    cu = docs.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, docs.max_seqlen, docs.max_seqlen, **kwargs)


def _segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[tuple[int, int]], gqa: bool) -> torch.Tensor:
    """q (N, H, D), k/v (N, Hkv, D) over the flattened batch: causal SDPA per document -> (N, H, D)."""
    pieces = [
        F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
            is_causal=True, enable_gqa=gqa,
        )[0].transpose(0, 1)
        for a, b in segments
    ]
    return torch.cat(pieces, dim=0)


class Attention(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attn_head_dim
        h, hd, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=bias)

    def forward(self, hidden: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """``documents`` from :func:`prepare_documents`, or None for rows of one document each."""
        batch, seqlen, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        gqa = self.num_heads != self.num_kv_heads
        path = documents.path if documents is not None else "sdpa_causal"
        if path in ("varlen", "segments"):  # the batch flattened to (b * T, heads, head_dim): a free view
            n = batch * seqlen
            q, k, v = q.view(n, self.num_heads, -1), k.view(n, self.num_kv_heads, -1), v.view(n, self.num_kv_heads, -1)
            if path == "varlen":
                out = _varlen(q, k, v, documents)
            else:
                out = _segments(q, k, v, documents.segments, gqa)
            return self.o_proj(out.reshape(batch, seqlen, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, heads, T, head_dim)
        if path == "sdpa_causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif path == "flex":
            out = _flex(q, k, v, documents.block_mask, gqa)
        elif path == "dense":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.mask, enable_gqa=gqa)
        else:
            raise ValueError(f"unknown attention path {path!r}")
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))
