"""SFT batches for the training loop: packed conversations, blended by weight, resumable.

Each source (chat JSONL / Parquet / ``save_to_disk`` directory, or a Parquet file of rows
packed by ``hebtron data pack``) becomes a pool of packed rows at start-up. Each pool is an
endless stream of its rows, reshuffled every epoch from the seed; which pool the next row
comes from follows the CPT blending rule (the pool whose share lags its weight most), so
the interface and the resume guarantees are those of :class:`hebtron.data.cpt.CPTBatches`:
``next_batch(n)`` returns a dict of tensors, and ``state_dict()`` is a handful of integers
with which a fresh instance continues with the same batches.

Validation (:class:`SFTValidationBatches`) uses the validation set packed the same way, its
rows in packing order: the same fixed batches on every pass.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hebtron.data.chat import ChatReader, ChatStats, ChatTemplate, read_template_file
from hebtron.lang import UNKNOWN_LANG, lang_id
from hebtron.data.packing import (
    DEFAULT_BUFFER,
    LossAverage,
    PackedRows,
    PackingReport,
    PackStats,
    collate,
    pack_stream,
    packed_meta,
    read_packed_parquet,
)
from hebtron.errors import UserError

STATE_VERSION = 1
PHASE = "sft"


@dataclass(frozen=True)
class SFTOptions:
    """How conversations become rows (the recipe's ``sft`` section)."""

    template: str | None = None  # None/"auto", "tokenizer", "chatml" or Jinja source
    train_on: str = "all"
    overlong: str = "drop"
    strict: bool = False
    loss_average: LossAverage = "token"
    pad_to_multiple_of: int = 1
    pack_buffer: int = DEFAULT_BUFFER

    @classmethod
    def from_recipe(cls, section: Any) -> SFTOptions:
        template = read_template_file(section.template_file) if section.template_file else section.template
        return cls(template, section.train_on, section.overlong, section.strict, section.loss_average,
                   section.pad_to_multiple_of, section.pack_buffer)


def pad_id_of(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def build_pool(path: str | Path, tokenizer: Any, seq_len: int, options: SFTOptions, lang: str | None = None,
               name: str | None = None) -> tuple[PackedRows, PackingReport]:
    """Packed rows of one source and its report. A Parquet file written by ``hebtron data
    pack`` is loaded as it is (its seq_len and train_on must match)."""
    path = Path(path)
    name = name or path.name
    if path.suffix == ".parquet" and packed_meta(path) is not None:
        rows = read_packed_parquet(path)
        meta = rows.meta
        for key, want in (("seq_len", seq_len), ("train_on", options.train_on)):
            if meta.get(key) is not None and meta.get(key) != want:
                raise UserError(f"{path}: packed with {key} {meta.get(key)!r}, but this run uses {want!r}; "
                                "pack it again with hebtron data pack")
        chat = ChatStats.from_dict(meta.get("chat", {}))
        stats = PackStats(seq_len, int(meta.get("examples", rows.doc_lens.size)), len(rows),
                          int(meta.get("tokens", 0)), int(meta.get("loss_tokens", 0)))
        return rows, PackingReport(f"{name} (packed {path.name})", chat, stats)
    template = ChatTemplate(tokenizer, options.template, options.train_on)  # type: ignore[arg-type]
    reader = ChatReader(template, seq_len, options.overlong, options.strict,  # type: ignore[arg-type]
                        options.pad_to_multiple_of)
    stats = PackStats()
    default_lang = lang_id(lang) if lang else UNKNOWN_LANG
    rows = list(pack_stream(reader.read(path, default_lang), seq_len, pad_id_of(tokenizer),
                            options.pad_to_multiple_of, options.pack_buffer, stats))
    return PackedRows.from_rows(rows, seq_len), PackingReport(name, reader.stats, stats)


class SFTBatches:
    """Endless, resumable batches of packed rows blended from weighted pools."""

    def __init__(self, pools: Sequence[tuple[str, PackedRows, float]], seed: int = 0,
                 loss_average: LossAverage = "token", shuffle: bool = True,
                 reports: Sequence[PackingReport] = ()) -> None:
        if not pools:
            raise UserError("SFT data needs at least one source")
        for name, rows, weight in pools:
            if len(rows) == 0:
                raise UserError(f"SFT source {name!r}: no usable conversations (see the packing report)")
            if not weight > 0 or not math.isfinite(weight):
                raise UserError(f"SFT source {name!r}: weight must be positive, got {weight}")
        self.names = [p[0] for p in pools]
        self.pools = [p[1] for p in pools]
        w = np.array([p[2] for p in pools], dtype=np.float64)
        self.weights = w / w.sum()
        self.seq_len = self.pools[0].seq_len
        if any(p.seq_len != self.seq_len for p in self.pools):
            raise UserError(f"SFT sources have different seq_len: {[p.seq_len for p in self.pools]}")
        self.seed, self.shuffle, self.loss_average = seed, shuffle, loss_average
        self.reports = list(reports)
        self._salts = [zlib.crc32(n.encode()) for n in self.names]
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self.counts = [0] * len(self.pools)
        self.samples = 0

    phase_name = PHASE

    @property
    def tokens_seen(self) -> int:
        return self.samples * self.seq_len

    def report_lines(self) -> list[str]:
        return [line for r in self.reports for line in r.lines()]

    def _order(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._orders:
            n = len(self.pools[s])
            rng = np.random.default_rng([self.seed, self._salts[s], epoch])
            perm = rng.permutation(n) if self.shuffle else np.arange(n)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != s}  # one epoch per pool in memory
            self._orders[key] = perm
        return self._orders[key]

    def _advance(self) -> tuple[int, int]:
        lag = self.weights * (self.samples + 1) - np.asarray(self.counts)
        s = int(np.argmax(lag))
        epoch, offset = divmod(self.counts[s], len(self.pools[s]))
        self.counts[s] += 1
        self.samples += 1
        return s, int(self._order(s, epoch)[offset])

    def next_batch(self, n_sequences: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """The next ``n_sequences`` rows of the global batch; with ``world_size > 1`` only this
        rank's contiguous share is collated, and every rank's state advances identically."""
        if n_sequences < 1 or n_sequences % world_size or not 0 <= rank < world_size:
            raise ValueError(f"cannot split {n_sequences} sequences over {world_size} ranks (rank {rank})")
        picks = [self._advance() for _ in range(n_sequences)]
        per_rank = n_sequences // world_size
        rows = [self.pools[s].row(i) for s, i in picks[rank * per_rank : (rank + 1) * per_rank]]
        return collate(rows, self.loss_average)

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON position; loading it into a fresh instance continues identically."""
        return {
            "version": STATE_VERSION, "kind": PHASE, "seed": self.seed, "seq_len": self.seq_len,
            "sources": list(self.names), "rows": [len(p) for p in self.pools],
            "fingerprints": [p.fingerprint() for p in self.pools],
            "counts": list(self.counts), "samples": self.samples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state from different data or options."""
        mine = self.state_dict()
        for key in ("version", "kind", "seed", "seq_len", "sources", "rows", "fingerprints"):
            if state.get(key) != mine[key]:
                raise UserError(f"data state: {key} is {state.get(key)!r} in the checkpoint but {mine[key]!r} in "
                                "this run (the SFT data or its packing changed)")
        self.counts = [int(c) for c in state["counts"]]
        self.samples = int(state["samples"])


class SFTValidationBatches:
    """Fixed validation batches: the pool's rows in packing order, ``batch_size`` at a time."""

    def __init__(self, rows: PackedRows, batch_size: int, max_batches: int | None = None,
                 loss_average: LossAverage = "token", report: PackingReport | None = None) -> None:
        if len(rows) == 0:
            raise UserError(f"SFT validation set {report.name if report else ''}: no usable conversations")
        self.rows, self.batch_size, self.loss_average, self.report = rows, batch_size, loss_average, report
        n_batches = math.ceil(len(rows) / batch_size)
        self.n_batches = min(n_batches, max_batches) if max_batches else n_batches

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(self.n_batches):
            idx = range(b * self.batch_size, min((b + 1) * self.batch_size, len(self.rows)))
            yield collate([self.rows.row(i) for i in idx], self.loss_average)


# ---------------------------------------------------------------------- from a recipe
@lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from hebtron.data.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(Path(path))


def _pools(recipe: Any, sources: Sequence[Any]) -> list[tuple[Any, PackedRows, PackingReport]]:
    options = SFTOptions.from_recipe(recipe.sft)
    tokenizer = _tokenizer(str(recipe.tokenizer.path))
    out = []
    for s in sources:
        if s.format == "indexed":
            raise UserError(f"recipe: data source {s.name!r}: {s.path} is an indexed dataset; SFT reads chat "
                            "data (.jsonl / .parquet with a 'messages' column, a save_to_disk directory, or a "
                            "packed .parquet)")
        rows, report = build_pool(s.path, tokenizer, recipe.data.seq_len, options, s.lang, s.name)
        out.append((s, rows, report))
    return out


def build_sft_train_data(recipe: Any) -> SFTBatches:
    """The training batches of an SFT recipe (its ``sft`` section and ``data.sources``)."""
    pools = _pools(recipe, recipe.data.sources)
    sft = recipe.sft
    return SFTBatches([(s.name, rows, s.weight) for s, rows, _ in pools], seed=recipe.train.seed,
                      loss_average=sft.loss_average,
                      reports=[r for _, _, r in pools])


def build_sft_valid_data(recipe: Any) -> dict[str, SFTValidationBatches]:
    """Fixed validation batches per ``data.valid`` source, packed like the training data."""
    return {
        s.name: SFTValidationBatches(rows, recipe.train.micro_batch, recipe.train.eval_batches,
                                     recipe.sft.loss_average, report)
        for s, rows, report in _pools(recipe, recipe.data.valid)
    }
