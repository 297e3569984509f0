"""hebtron batches -> the inputs Megatron's hybrid model takes.

A hebtron micro-batch is ``b`` rows of ``T`` tokens with ``seq_idx`` (document per token). When
every row is one document it goes to Megatron as is (``[b, T]``, causal attention). When any row
holds several documents (CPT windows across document ends, packed SFT), the micro-batch becomes
Megatron's THD layout: one row of ``b * T`` tokens and ``cu_seqlens`` at every document start
and every row start. Attention then masks across documents, and the Mamba mixer restarts its
conv and scan at each of them, so the result equals the native model's on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MegatronInputs:
    tokens: torch.Tensor  # (b, T) or (1, b*T) for THD
    labels: torch.Tensor  # same shape as tokens
    loss_mask: torch.Tensor  # same shape, float
    packed_seq_params: Any  # PackedSeqParams or None
    rows: int  # b of the original micro-batch (to unflatten THD outputs)

    @property
    def packed(self) -> bool:
        return self.packed_seq_params is not None


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """Flat (b*T) boolean: True where a document (or a row) starts."""
    b, t = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts.reshape(b * t)


def to_megatron(batch: dict[str, torch.Tensor], pad_to: int = 1, force_packed: bool = False) -> MegatronInputs:
    """Build Megatron inputs from a hebtron micro-batch (``input_ids``, ``labels``, ``loss_mask``,
    optional ``seq_idx`` / ``position_ids``). ``force_packed`` uses THD even for one-document
    rows; ``pad_to`` checks the packed length is a multiple (sequence parallelism splits it)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    tokens, labels = batch["input_ids"], batch["labels"]
    loss_mask = batch["loss_mask"].float()
    b, t = tokens.shape
    seq_idx = batch.get("seq_idx")
    if seq_idx is None and batch.get("position_ids") is not None:
        seq_idx = (batch["position_ids"] == 0).long().cumsum(dim=-1)
    if seq_idx is None:
        if not force_packed:
            return MegatronInputs(tokens, labels, loss_mask, None, b)
        seq_idx = torch.zeros_like(tokens)
    elif not force_packed and bool((seq_idx == seq_idx[:, :1]).all()):
        return MegatronInputs(tokens, labels, loss_mask, None, b)
    starts = document_starts(seq_idx)
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([b * t])]).to(torch.int32)
    if (b * t) % pad_to:
        raise ValueError(f"packed length {b * t} is not a multiple of {pad_to}")
    lengths = cu[1:] - cu[:-1]
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu.to(tokens.device),
        cu_seqlens_kv=cu.to(tokens.device),
        max_seqlen_q=int(lengths.max()),
        max_seqlen_kv=int(lengths.max()),
    )
    return MegatronInputs(tokens.reshape(1, b * t), labels.reshape(1, b * t), loss_mask.reshape(1, b * t), params, b)


def unflatten(values: torch.Tensor, inputs: MegatronInputs) -> torch.Tensor:
    """(1, b*T, ...) THD outputs back to (b, T, ...)."""
    if not inputs.packed:
        return values
    return values.reshape(inputs.rows, -1, *values.shape[2:])
