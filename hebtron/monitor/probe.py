"""Probe a checkpoint's routing on mixed-language text, without training.

Before spending cluster hours on continued pretraining, run a few batches of Hebrew and
English through the base model and look at the per-layer, per-language figures: a deep layer
whose Hebrew load entropy is far below the English one is the collapse the aux losses must
undo. Documents are packed into rows (``seq_idx`` keeps them apart, so packing changes
nothing), languages taken in turn so that each gets its share of the token budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from hebtron.checkpoints import checkpoint_tokenizer, is_megatron_checkpoint, resolve_checkpoint
from hebtron.data.documents import ReadStats, iter_documents
from hebtron.lang import UNKNOWN_LANG
from hebtron.errors import CheckpointError, UserError
from hebtron.monitor.router import RouterStats

def _interleaved_documents(paths: Sequence[Path]) -> Iterator[tuple[str, int]]:
    """Documents of all files, one language after the other (he, en, he, en, ...)."""
    by_lang: dict[int, list[str]] = {}
    stats = ReadStats()
    for path in paths:
        for text, lang in iter_documents(path, stats, skip_empty=True):
            by_lang.setdefault(lang, []).append(text)
    if not by_lang:
        raise UserError(f"{', '.join(map(str, paths))}: no documents")
    for group in itertools.zip_longest(*by_lang.values()):
        for lang, text in zip(by_lang, group, strict=True):
            if text is not None:
                yield text, lang


def pack_rows(docs: Iterator[tuple[list[int], int]], seq_len: int, rows: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Token lists with a language id -> ``rows`` packed rows (input_ids, position_ids, seq_idx,
    lang); a document cut at a row end continues in the next row as a new segment."""
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    lang = torch.full((rows, seq_len), UNKNOWN_LANG, dtype=torch.long)
    seq_idx = torch.zeros(rows, seq_len, dtype=torch.long)
    position = torch.zeros(rows, seq_len, dtype=torch.long)
    r = c = seg = 0
    for tokens, lid in docs:
        while tokens and r < rows:
            take = min(len(tokens), seq_len - c)
            ids[r, c : c + take] = torch.tensor(tokens[:take])
            lang[r, c : c + take] = lid
            seq_idx[r, c : c + take] = seg
            position[r, c : c + take] = torch.arange(take)
            tokens, c, seg = tokens[take:], c + take, seg + 1
            if c == seq_len:
                r, c, seg = r + 1, 0, 0
        if r >= rows:
            break
    if c:  # padding after the last document: its own segment, language -1
        seq_idx[r, c:] = seg
        position[r, c:] = torch.arange(seq_len - c)
    used = r + (1 if c else 0)
    if used == 0:
        raise UserError("the data holds no tokens")
    return {"input_ids": ids[:used], "position_ids": position[:used], "seq_idx": seq_idx[:used], "lang": lang[:used]}


def probe(
    checkpoint: Path,
    data: Sequence[Path],
    tokenizer: Path | None = None,
    batches: int = 8,
    batch_size: int = 4,
    seq_len: int = 512,
    dtype: str | None = None,
    active_threshold: float = 0.25,
) -> dict[str, Any]:
    """Route ``batches`` x ``batch_size`` rows of ``data`` through ``checkpoint``; the figures as
    ``{"layers": [{"layer": i, "lang": {lang: figures}}], ...}``. ``checkpoint`` holds HF weights
    (the command converts a Megatron checkpoint first, with ``hebtron.backends.hf_dirs``)."""
    from hebtron.data.tokenizer import load_hf_tokenizer
    from hebtron.model.hf import load_hf

    ref = resolve_checkpoint(checkpoint)
    ckpt = ref.path
    if is_megatron_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt}: a Megatron checkpoint; probe its HF conversion "
                              "(hebtron.backends.hf_dirs.hf_directory, or `hebtron monitor probe`)")
    tok = load_hf_tokenizer(checkpoint_tokenizer(ref, tokenizer))
    model = load_hf(ckpt, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype or "float32"])
    layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "moe"]
    if not layers:
        raise UserError(f"{ckpt}: the model has no MoE layers; nothing to probe")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (model.config.pad_token_id or 0)
    docs = ((tok(text, add_special_tokens=False)["input_ids"], lang) for text, lang in _interleaved_documents(data))
    rows = pack_rows(docs, seq_len, batches * batch_size, pad_id)
    stats = RouterStats(layers, model.config.n_routed_experts, device)
    with torch.no_grad():
        for start in range(0, rows["input_ids"].shape[0], batch_size):
            batch = {k: v[start : start + batch_size].to(device) for k, v in rows.items()}
            out = model(batch["input_ids"], batch["position_ids"], batch["seq_idx"])
            stats.add_records(out.routers, batch, pad_id)
    summary = stats.summary(active_threshold)
    first = next(iter(summary.values()))
    return {
        "checkpoint": str(ckpt),
        "num_experts": model.config.n_routed_experts,
        "top_k": model.config.num_experts_per_tok,
        "tokens": {lang: row["tokens"] for lang, row in first.items()},
        "layers": [{"layer": layer, "lang": langs} for layer, langs in summary.items()],
    }
