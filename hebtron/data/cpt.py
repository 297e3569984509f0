"""Continued-pretraining batches: fixed-length windows over blended, phased token streams.

Each source (one indexed dataset written by ``hebtron data prepare``) is an endless stream:
its documents, reshuffled every epoch from the seed, concatenated (each ends with ``</s>``).
Sample ``k`` of a source reads ``seq_len + 1`` tokens at window ``k`` and moves the cursor
by ``seq_len``, so every token is predicted exactly once per epoch (Megatron's GPT windows).
As in Megatron's shuffled sample index, window ``k`` is taken from a seeded permutation of
the windows of its block (about one epoch of the source, at most ``WINDOW_BLOCK`` windows):
otherwise one batch would hold consecutive windows of the same document, whose gradients
are correlated — fewer effective samples per step, and a gradient-noise estimate that
mistakes that shared noise for signal.
Which source a sample comes from follows Megatron's blending rule: the source whose share so
far lags its weight the most (``argmax(w * (n + 1) - count)``), which hits the weights
exactly up to one sample at every prefix. Phases run in order, each for a token budget and
with its own weights; cursors carry across phases so a source never restarts.

All state is a handful of integers, so ``state_dict()`` is plain JSON and resuming yields
the same batches as never stopping, whatever batch sizes are asked for along the way.

Each batch (``dict[str, torch.LongTensor]``, rows x ``seq_len``) holds ``input_ids``,
``labels`` (inputs shifted by one), ``position_ids`` and ``seq_idx`` (restart at every
document start and at the row start), ``loss_mask``, ``lang`` (per-token language id of
the input token) and ``cu_seqlens`` (1-D document boundaries over the flattened batch).
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hebtron.data.indexed import open_indexed, read_langs, read_meta
from hebtron.lang import UNKNOWN_LANG
from hebtron.errors import UserError

STATE_VERSION = 2  # 2: windows shuffled within blocks


@dataclass(frozen=True)
class Source:
    """One indexed dataset (``prefix`` without ``.bin``) and its default blend weight."""

    prefix: str
    weight: float = 1.0
    name: str | None = None

    @property
    def key(self) -> str:
        return self.name or Path(self.prefix).name


@dataclass(frozen=True)
class Phase:
    """A stretch of training: a token budget (None = endless, last phase only) and weights.

    ``weights`` maps source names to weights; sources left out get weight 0; ``None``
    means the sources' own weights.
    """

    name: str
    tokens: int | None = None
    weights: Mapping[str, float] | None = None


WINDOW_BLOCK = 1 << 20  # windows per shuffle block: 8 MiB of permutation, ~8.6B tokens at 8k context


class TokenStream:
    """One source as an endless token stream over epochs of seeded document order."""

    def __init__(self, prefix: str | Path, seed: int = 0, shuffle: bool = True, salt: str = ""):
        self.prefix = str(prefix)
        self.ds = open_indexed(prefix)
        docs = self.ds.document_indices
        if len(docs) != len(self.ds) + 1 or np.any(np.diff(docs) != 1):
            raise UserError(f"{prefix}: documents made of several sequences are not supported")
        self.lengths = np.asarray(self.ds.sequence_lengths, dtype=np.int64)
        self.total = int(self.lengths.sum())
        if self.total == 0:
            raise UserError(f"{prefix}: the dataset holds no tokens")
        self.langs = read_langs(prefix, len(self.lengths))
        self.seed, self.shuffle, self.salt = seed, shuffle, zlib.crc32(salt.encode())
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def window_start(self, window: int, seq_len: int) -> int:
        """Stream offset of the ``window``-th window: windows tile the stream, permuted within
        blocks of about one epoch, so each stream position is still read exactly once."""
        size = max(1, min(self.total // seq_len, WINDOW_BLOCK))
        block, j = divmod(window, size)
        key = (block, size)
        if key not in self._blocks:
            rng = np.random.default_rng([self.seed, self.salt, block, size, 1])
            self._blocks[key] = rng.permutation(size)
            while len(self._blocks) > 2:
                self._blocks.popitem(last=False)
        return (block * size + int(self._blocks[key][j])) * seq_len

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order of ``epoch`` and each document's start offset in that epoch."""
        if epoch not in self._epochs:
            n = len(self.lengths)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.salt, epoch])
                perm = rng.permutation(n)
            else:
                perm = np.arange(n)
            starts = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(self.lengths[perm], out=starts[1:])
            self._epochs[epoch] = (perm, starts)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens ``[start, start + length)`` of the stream, with a document-start flag and
        the language id for each token."""
        tokens = np.empty(length, dtype=np.int64)
        first = np.zeros(length, dtype=bool)
        langs = np.empty(length, dtype=np.int64)
        filled, pos = 0, start
        while filled < length:
            epoch, offset = divmod(pos, self.total)
            perm, starts = self.epoch_order(epoch)
            k = int(np.searchsorted(starts, offset, side="right")) - 1
            doc, in_doc = int(perm[k]), int(offset - starts[k])
            take = min(int(self.lengths[doc]) - in_doc, length - filled)
            tokens[filled : filled + take] = self.ds.get(doc, offset=in_doc, length=take)
            first[filled] = in_doc == 0
            langs[filled : filled + take] = self.langs[doc]
            filled += take
            pos += take
        return tokens, first, langs


def window_fields(
    tokens: np.ndarray, first: np.ndarray, langs: np.ndarray, real: int, pad_id: int,
    eod_mask_loss: bool = False,
) -> dict[str, np.ndarray]:
    """Per-token fields of one row from ``seq_len + 1`` stream tokens.

    ``real`` is how many of those tokens are data (the rest is padding: label ``pad_id``,
    loss 0, language -1, its own trailing segment). The row start counts as a document
    start. With ``eod_mask_loss`` the label that opens a new document (predicted from the
    previous document's last token) gets no loss, as in Megatron.
    """
    seq_len = tokens.size - 1
    tokens = tokens.copy()
    tokens[real:] = pad_id
    starts = first[:seq_len].copy()
    starts[0] = True
    if real < seq_len:
        starts[real] = True  # padding inputs form a segment of their own
    idx = np.arange(seq_len)
    position_ids = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    seq_idx = np.cumsum(starts) - 1
    loss_mask = (idx + 1 < real).astype(np.int64)
    if eod_mask_loss:
        loss_mask[first[1:]] = 0
    lang = langs[:seq_len].copy()
    lang[idx >= real] = UNKNOWN_LANG
    return {
        "input_ids": tokens[:-1], "labels": tokens[1:], "position_ids": position_ids,
        "seq_idx": seq_idx, "loss_mask": loss_mask, "lang": lang,
    }


def collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into LongTensors and add ``cu_seqlens`` over the flattened batch."""
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64)) for k in rows[0]}
    seq_len = batch["input_ids"].shape[1]
    bounds = [r * seq_len + np.flatnonzero(np.diff(row["seq_idx"], prepend=-1)) for r, row in enumerate(rows)]
    bounds.append(np.array([len(rows) * seq_len]))
    batch["cu_seqlens"] = torch.from_numpy(np.concatenate(bounds).astype(np.int64))
    return batch


class CPTBatches:
    """Endless, resumable CPT batches blended from several sources, phase after phase."""

    def __init__(
        self,
        sources: Sequence[Source | tuple[str, float] | str],
        seq_len: int,
        seed: int = 0,
        phases: Sequence[Phase] | None = None,
        shuffle: bool = True,
        eod_mask_loss: bool = False,
        shuffle_windows: bool = True,
    ):
        if seq_len < 1:
            raise UserError(f"seq_len must be positive, got {seq_len}")
        self.sources = [s if isinstance(s, Source) else Source(*s) if isinstance(s, tuple) else Source(s)
                        for s in sources]
        if not self.sources:
            raise UserError("CPT data needs at least one source")
        keys = [s.key for s in self.sources]
        if len(set(keys)) != len(keys):
            raise UserError(f"source names must be unique, got {keys}; set Source.name")
        self.seq_len, self.seed, self.eod_mask_loss = seq_len, seed, eod_mask_loss
        self.shuffle_windows = shuffle and shuffle_windows
        self.phases = list(phases) if phases else [Phase("main", None)]
        self._weights = [self._phase_weights(p) for p in self.phases]
        self._phase_samples = [None if p.tokens is None else math.ceil(p.tokens / seq_len) for p in self.phases]
        for p, n in zip(self.phases[:-1], self._phase_samples[:-1], strict=True):
            if n is None:
                raise UserError(f"phase {p.name!r}: only the last phase may have no token budget")
        self.streams = [TokenStream(s.prefix, seed, shuffle, salt=s.key) for s in self.sources]
        meta = read_meta(self.sources[0].prefix)
        self.pad_id = int(meta.get("pad_id") or 0)
        self._reset_state()

    def _phase_weights(self, phase: Phase) -> np.ndarray:
        if phase.weights is None:
            w = [s.weight for s in self.sources]
        else:
            unknown = set(phase.weights) - {s.key for s in self.sources}
            if unknown:
                raise UserError(f"phase {phase.name!r}: unknown source(s) {sorted(unknown)}; "
                                f"sources are {[s.key for s in self.sources]}")
            w = [float(phase.weights.get(s.key, 0.0)) for s in self.sources]
        w = np.asarray(w, dtype=np.float64)
        if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise UserError(f"phase {phase.name!r}: weights must be >= 0 with a positive sum, got {w.tolist()}")
        return w / w.sum()

    def _reset_state(self) -> None:
        self.phase = 0
        self.phase_samples = 0
        self.phase_counts = [0] * len(self.sources)
        self.cursors = [0] * len(self.sources)
        self.samples = 0
        self._settle_phase()

    @property
    def phase_name(self) -> str:
        """The phase the next sample belongs to."""
        return self.phases[self.phase].name

    @property
    def tokens_seen(self) -> int:
        """Input tokens handed out so far (``samples * seq_len``)."""
        return self.samples * self.seq_len

    def _settle_phase(self) -> None:
        """Move on past phases whose budget is spent, so ``phase`` names the next sample's.
        The last phase never ends: past its budget it keeps its weights."""
        while self.phase + 1 < len(self.phases):
            budget = self._phase_samples[self.phase]
            if budget is None or self.phase_samples < budget:
                break
            self.phase += 1
            self.phase_samples = 0
            self.phase_counts = [0] * len(self.sources)

    def _next_source(self) -> int:
        w = self._weights[self.phase]
        lag = w * (self.phase_samples + 1) - np.asarray(self.phase_counts)
        lag[w == 0] = -np.inf
        return int(np.argmax(lag))

    def _advance(self) -> tuple[int, int]:
        """Pick the next window's source, move the state past it; return (source, start)."""
        s = self._next_source()
        start = self.cursors[s]
        self.cursors[s] += self.seq_len
        self.phase_counts[s] += 1
        self.phase_samples += 1
        self.samples += 1
        self._settle_phase()
        return s, start

    def _window(self, s: int, start: int) -> dict[str, np.ndarray]:
        stream = self.streams[s]
        offset = stream.window_start(start // self.seq_len, self.seq_len) if self.shuffle_windows else start
        tokens, first, langs = stream.read(offset, self.seq_len + 1)
        return window_fields(tokens, first, langs, self.seq_len + 1, self.pad_id, self.eod_mask_loss)

    def next_batch(self, n_sequences: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """The next ``n_sequences`` rows of the global batch (the count may change from call
        to call); with ``world_size > 1`` only this data-parallel rank's contiguous share is
        read, and every rank's state advances identically."""
        if n_sequences < 1 or n_sequences % world_size or not 0 <= rank < world_size:
            raise ValueError(f"cannot split {n_sequences} sequences over {world_size} ranks (rank {rank})")
        picks = [self._advance() for _ in range(n_sequences)]
        per_rank = n_sequences // world_size
        return collate([self._window(s, start) for s, start in picks[rank * per_rank : (rank + 1) * per_rank]])

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON position: load it into a fresh instance to continue identically."""
        return {
            "version": STATE_VERSION, "seq_len": self.seq_len, "seed": self.seed,
            "shuffle_windows": self.shuffle_windows,
            "sources": [s.key for s in self.sources], "phases": [p.name for p in self.phases],
            "phase": self.phase, "phase_samples": self.phase_samples,
            "phase_counts": list(self.phase_counts), "cursors": list(self.cursors),
            "samples": self.samples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state from a different data setup."""
        mine = self.state_dict()
        for key in ("version", "seq_len", "seed", "shuffle_windows", "sources", "phases"):
            if state.get(key) != mine[key]:
                raise UserError(f"data state: {key} is {state.get(key)!r} in the checkpoint "
                                f"but {mine[key]!r} in this run")
        self.phase = int(state["phase"])
        self.phase_samples = int(state["phase_samples"])
        self.phase_counts = [int(c) for c in state["phase_counts"]]
        self.cursors = [int(c) for c in state["cursors"]]
        self.samples = int(state["samples"])


class ValidationBatches:
    """Fixed validation batches over one prefix: the same windows, in the same order, on
    every pass. Documents in file order, no wraparound; the last window is padded (loss 0)
    and the last batch may be smaller."""

    def __init__(self, prefix: str | Path, seq_len: int, batch_size: int,
                 max_batches: int | None = None, eod_mask_loss: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        self.stream = TokenStream(prefix, shuffle=False)
        self.seq_len, self.batch_size, self.eod_mask_loss = seq_len, batch_size, eod_mask_loss
        self.pad_id = int(read_meta(prefix).get("pad_id") or 0)
        n_windows = max(1, math.ceil((self.stream.total - 1) / seq_len))
        n_batches = math.ceil(n_windows / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
            n_windows = min(n_windows, n_batches * batch_size)
        self.n_windows, self.n_batches = n_windows, n_batches

    def __len__(self) -> int:
        return self.n_batches

    def _row(self, k: int) -> dict[str, np.ndarray]:
        start = k * self.seq_len
        real = min(self.seq_len + 1, self.stream.total - start)
        tokens = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        first = np.zeros(self.seq_len + 1, dtype=bool)
        langs = np.full(self.seq_len + 1, UNKNOWN_LANG, dtype=np.int64)
        tokens[:real], first[:real], langs[:real] = self.stream.read(start, real)
        return window_fields(tokens, first, langs, real, self.pad_id, self.eod_mask_loss)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(self.n_batches):
            rows = range(b * self.batch_size, min((b + 1) * self.batch_size, self.n_windows))
            yield collate([self._row(k) for k in rows])
