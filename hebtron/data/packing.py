"""Pack encoded conversations into rows of ``seq_len`` tokens and collate rows into batches.

Packing is best-fit decreasing: examples sorted longest first (ties by input order), each
placed in the open row with the least room that still fits it, else in a new row. It is
deterministic, and :func:`pack_stream` packs a buffer of examples at a time so memory
stays bounded on large data sets; with buffers of thousands of conversations the rows are
nearly full. Rows never split a conversation.

:func:`collate` turns rows into what the loop and the model need: ``labels`` are the next
token where that token is the assistant's and in the same conversation, else -100;
``position_ids`` and ``seq_idx`` restart at every conversation (attention never crosses
one and Mamba conv/scan state is reset), ``cu_seqlens``/``max_seqlen`` describe the
segments, ``lang`` is each conversation's language id and ``loss_mask`` holds float
weights: 1 per loss token (``token`` averaging) or 1/(loss tokens of the conversation)
(``sample`` averaging), so the loop's global normalizer (the sum of ``loss_mask`` over the
step) is the count of loss tokens or of conversations.
"""

from __future__ import annotations

import bisect
import heapq
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hebtron.data.chat import REASONS, ChatStats, Encoded
from hebtron.lang import UNKNOWN_LANG
from hebtron.errors import UserError
from hebtron.jsonio import parse_json

LossAverage = Literal["token", "sample"]
DEFAULT_BUFFER = 20_000
PARQUET_KEY = b"hebtron.packed"
PACKED_VERSION = 1

# An example is anything with input_ids / assistant_mask arrays and a lang id.
Example = Encoded


@dataclass(frozen=True)
class PackedRow:
    """One row: conversations back to back, then padding to ``seq_len``."""

    input_ids: np.ndarray  # (seq_len,) int32
    assistant_mask: np.ndarray  # (seq_len,) bool: token carries loss
    doc_lens: np.ndarray  # (docs,) int32, padded to the packing multiple
    doc_langs: np.ndarray  # (docs,) int16

    @property
    def used(self) -> int:
        return int(self.doc_lens.sum())


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) for ``lengths`` within ``capacity``, best-fit decreasing.

    Open bins are kept by free space: a sorted list of the distinct free-space values and, for
    each value, a min-heap of bin numbers (the oldest bin wins a tie, so the result depends on
    nothing but the input). Full bins leave the structure.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    by_free: dict[int, list[int]] = {}
    for i in order:
        n = int(lengths[i])
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}; expected 1..{capacity}")
        k = bisect.bisect_left(free, n)
        if k == len(free):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = free[k]
            heap = by_free[room]
            b = heapq.heappop(heap)
            if not heap:
                del by_free[room]
                free.pop(k)
        bins[b].append(i)
        room -= n
        if room:
            if room in by_free:
                heapq.heappush(by_free[room], b)
            else:
                by_free[room] = [b]
                bisect.insort(free, room)
    return bins


@dataclass
class PackStats:
    """Counts of one packing pass (``fill`` = conversation tokens / row capacity)."""

    seq_len: int = 0
    examples: int = 0
    rows: int = 0
    tokens: int = 0  # conversation tokens, without any padding
    loss_tokens: int = 0
    seconds: float = 0.0

    @property
    def capacity(self) -> int:
        return self.rows * self.seq_len

    @property
    def fill(self) -> float:
        return self.tokens / self.capacity if self.capacity else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "examples": self.examples, "rows": self.rows, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "padding_tokens": self.capacity - self.tokens,
                "fill": round(self.fill, 6), "seconds": round(self.seconds, 3)}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _make_row(items: Sequence[Example], seq_len: int, pad_id: int, multiple: int) -> PackedRow:
    ids = np.full(seq_len, pad_id, dtype=np.int32)
    mask = np.zeros(seq_len, dtype=bool)
    lens = np.empty(len(items), dtype=np.int32)
    pos = 0
    for k, ex in enumerate(items):
        n = len(ex.input_ids)
        ids[pos : pos + n] = ex.input_ids
        mask[pos : pos + n] = ex.assistant_mask
        lens[k] = _round_up(n, multiple)
        pos += int(lens[k])
    return PackedRow(ids, mask, lens, np.array([ex.lang for ex in items], dtype=np.int16))


def pack_stream(
    examples: Iterable[Example], seq_len: int, pad_id: int = 0, multiple_of: int = 1,
    buffer_size: int | None = DEFAULT_BUFFER, stats: PackStats | None = None,
) -> Iterator[PackedRow]:
    """Rows from ``examples``, best-fit decreasing within each buffer of ``buffer_size``
    examples (``None``: all at once). Each conversation is padded to ``multiple_of`` tokens
    (tensor or context parallelism need segment lengths divisible by it); a conversation
    longer than ``seq_len`` is an error (the reader's over-long policy runs before)."""
    if seq_len < 1 or multiple_of < 1 or seq_len % multiple_of:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of multiple_of {multiple_of}")
    stats = stats if stats is not None else PackStats()
    stats.seq_len = seq_len
    buffer: list[Example] = []

    def flush() -> Iterator[PackedRow]:
        t0 = time.perf_counter()
        lengths = [_round_up(len(ex.input_ids), multiple_of) for ex in buffer]
        too_long = [i for i, n in enumerate(lengths) if n > seq_len]
        if too_long:
            raise ValueError(f"example of {lengths[too_long[0]]} tokens does not fit seq_len {seq_len}")
        rows = [_make_row([buffer[i] for i in b], seq_len, pad_id, multiple_of)
                for b in best_fit_decreasing(lengths, seq_len)]
        stats.rows += len(rows)
        stats.examples += len(buffer)
        stats.tokens += sum(len(ex.input_ids) for ex in buffer)
        stats.loss_tokens += sum(int(ex.assistant_mask.sum()) for ex in buffer)
        stats.seconds += time.perf_counter() - t0
        buffer.clear()
        yield from rows

    for ex in examples:
        buffer.append(ex)
        if buffer_size is not None and len(buffer) >= buffer_size:
            yield from flush()
    if buffer:
        yield from flush()


def pack(examples: Iterable[Example], seq_len: int, pad_id: int = 0, multiple_of: int = 1,
         buffer_size: int | None = None) -> list[PackedRow]:
    """All rows at once (one buffer unless ``buffer_size`` is given)."""
    return list(pack_stream(examples, seq_len, pad_id, multiple_of, buffer_size))


# --------------------------------------------------------------------------- collate
def row_fields(row: PackedRow, loss_average: LossAverage = "token") -> dict[str, np.ndarray]:
    """Per-token fields of one row (see the module docstring)."""
    seq_len = row.input_ids.size
    used = row.used
    n_docs = row.doc_lens.size
    seg = np.full(seq_len, n_docs, dtype=np.int64)  # trailing padding: a segment of its own
    seg[:used] = np.repeat(np.arange(n_docs), row.doc_lens)
    starts = np.concatenate([[0], np.cumsum(row.doc_lens)]).astype(np.int64)
    seg_start = np.append(starts[:n_docs], used)[seg] if used < seq_len else starts[seg]
    position_ids = np.arange(seq_len) - seg_start
    ids = row.input_ids.astype(np.int64)
    target = np.zeros(seq_len, dtype=bool)
    target[:-1] = row.assistant_mask[1:] & (seg[1:] == seg[:-1])
    labels = np.where(target, np.roll(ids, -1), -100)
    if loss_average == "token":
        weights = target.astype(np.float32)
    elif loss_average == "sample":
        counts = np.bincount(seg[target], minlength=n_docs + 1).astype(np.float64)
        weights = np.where(target, 1.0 / np.maximum(counts, 1)[seg], 0.0).astype(np.float32)
    else:
        raise ValueError(f"loss_average: expected 'token' or 'sample', got {loss_average!r}")
    lang = np.full(seq_len, UNKNOWN_LANG, dtype=np.int64)
    lang[:used] = np.repeat(row.doc_langs.astype(np.int64), row.doc_lens)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "seq_idx": seg,
            "loss_mask": weights, "lang": lang}


def collate(rows: Sequence[PackedRow], loss_average: LossAverage = "token") -> dict[str, torch.Tensor]:
    """A batch from packed rows: LongTensors ``input_ids``, ``labels`` (-100: no loss),
    ``position_ids``, ``seq_idx``, ``lang``; float32 ``loss_mask``; ``cu_seqlens`` (segment
    boundaries over the flattened batch, trailing padding of a row a segment of its own);
    ``max_seqlen`` (0-d, the longest segment)."""
    if not rows:
        raise ValueError("collate needs at least one row")
    fields = [row_fields(r, loss_average) for r in rows]
    batch = {k: torch.from_numpy(np.stack([f[k] for f in fields])) for k in fields[0]}
    seq_len = batch["input_ids"].shape[1]
    bounds = [r * seq_len + np.flatnonzero(np.diff(f["seq_idx"], prepend=-1)) for r, f in enumerate(fields)]
    cu = np.concatenate([*bounds, [len(rows) * seq_len]]).astype(np.int64)
    max_seqlen = int(np.diff(cu).max())
    batch["cu_seqlens"] = torch.from_numpy(cu)
    batch["max_seqlen"] = torch.tensor(max_seqlen, dtype=torch.long)
    return batch


# ----------------------------------------------------------------------- packed rows store
@dataclass
class PackedRows:
    """Rows kept as arrays (what :class:`hebtron.data.sft.SFTBatches` draws from), in memory
    or read from a Parquet file written by :func:`write_packed_parquet`."""

    input_ids: np.ndarray  # (n, seq_len) int32
    assistant_mask: np.ndarray  # (n, seq_len) bool
    doc_offsets: np.ndarray  # (n + 1,) int64 into doc_lens / doc_langs
    doc_lens: np.ndarray  # int32
    doc_langs: np.ndarray  # int16
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def row(self, i: int) -> PackedRow:
        a, b = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        return PackedRow(self.input_ids[i], self.assistant_mask[i], self.doc_lens[a:b], self.doc_langs[a:b])

    def fingerprint(self) -> int:
        """A cheap checksum of the row layout, to refuse resuming on different data."""
        import zlib

        return zlib.crc32(self.doc_lens.tobytes(), zlib.crc32(self.input_ids[:, :8].tobytes()))

    @classmethod
    def from_rows(cls, rows: Sequence[PackedRow], seq_len: int, meta: dict[str, Any] | None = None) -> PackedRows:
        n = len(rows)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([r.doc_lens.size for r in rows], out=offsets[1:])
        return cls(
            np.stack([r.input_ids for r in rows]) if n else np.zeros((0, seq_len), np.int32),
            np.stack([r.assistant_mask for r in rows]) if n else np.zeros((0, seq_len), bool),
            offsets,
            np.concatenate([r.doc_lens for r in rows]) if n else np.zeros(0, np.int32),
            np.concatenate([r.doc_langs for r in rows]) if n else np.zeros(0, np.int16),
            dict(meta or {}),
        )


def _arrow_schema(seq_len: int):
    import pyarrow as pa

    return pa.schema(
        [("input_ids", pa.list_(pa.int32(), seq_len)), ("assistant_mask", pa.list_(pa.uint8(), seq_len)),
         ("doc_lens", pa.list_(pa.int32())), ("doc_langs", pa.list_(pa.int16()))]
    )


def write_packed_parquet(rows: Iterable[PackedRow], path: str | Path, seq_len: int,
                         meta_fn: Any = None, row_group: int = 1024) -> int:
    """Stream rows into a Parquet file atomically (temporary file, fsync, rename); returns the
    row count. ``meta_fn()`` is called after the last row (reading and packing counts are
    known only then) and its dict goes into the file's key-value metadata, with ``seq_len``,
    the format version and the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    chunks: list[PackedRow] = []
    count = 0

    def batch_of(chunk: list[PackedRow]) -> pa.RecordBatch:
        ids = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([r.input_ids for r in chunk])), seq_len)
        mask = pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([r.assistant_mask for r in chunk]).astype(np.uint8)), seq_len)
        lens = pa.array([r.doc_lens.tolist() for r in chunk], type=pa.list_(pa.int32()))
        langs = pa.array([r.doc_langs.tolist() for r in chunk], type=pa.list_(pa.int16()))
        return pa.RecordBatch.from_arrays([ids, mask, lens, langs], schema=_arrow_schema(seq_len))

    try:
        with pq.ParquetWriter(tmp, _arrow_schema(seq_len)) as writer:
            for row in rows:
                if row.input_ids.size != seq_len:
                    raise ValueError(f"row of {row.input_ids.size} tokens in a file of seq_len {seq_len}")
                chunks.append(row)
                count += 1
                if len(chunks) == row_group:
                    writer.write_batch(batch_of(chunks))
                    chunks = []
            if chunks:
                writer.write_batch(batch_of(chunks))
            meta = {**(meta_fn() if meta_fn else {}), "seq_len": seq_len, "version": PACKED_VERSION, "rows": count}
            writer.add_key_value_metadata({PARQUET_KEY.decode(): json.dumps(meta)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def packed_meta(path: str | Path) -> dict[str, Any] | None:
    """The hebtron packing metadata of a Parquet file, or ``None`` for any other Parquet."""
    import pyarrow.parquet as pq

    try:
        kv = pq.read_metadata(path).metadata or {}
    except Exception as err:  # damaged or not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    raw = kv.get(PARQUET_KEY)
    if not raw:
        return None
    meta = parse_json(raw, f"{path}: Parquet metadata {PARQUET_KEY.decode()}")
    if not isinstance(meta, dict):
        raise UserError(f"{path}: Parquet metadata {PARQUET_KEY.decode()}: expected a JSON object, got {type(meta).__name__}")
    return meta


def read_packed_parquet(path: str | Path) -> PackedRows:
    """Rows written by ``hebtron data pack`` (all loaded into memory)."""
    import pyarrow.parquet as pq

    meta = packed_meta(path)
    if meta is None:
        raise UserError(f"{path}: not a packed file (no {PARQUET_KEY.decode()} metadata; "
                        "write it with hebtron data pack)")
    if meta.get("version") != PACKED_VERSION:
        raise UserError(f"{path}: packed format version {meta.get('version')!r}, expected {PACKED_VERSION}")
    seq_len = int(meta["seq_len"])
    table = pq.read_table(path)
    n = table.num_rows

    def fixed(name: str, dtype: Any) -> np.ndarray:
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return values.astype(dtype).reshape(n, seq_len)

    def ragged(name: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        col = table.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).astype(dtype), col.offsets.to_numpy().astype(np.int64)

    lens, offsets = ragged("doc_lens", np.int32)
    langs, _ = ragged("doc_langs", np.int16)
    rows = PackedRows(fixed("input_ids", np.int32), fixed("assistant_mask", bool), offsets, lens, langs, meta)
    if len(rows) and (np.add.reduceat(lens, offsets[:-1]) > seq_len).any():
        raise UserError(f"{path}: a row's documents are longer than seq_len {seq_len}")
    return rows


# --------------------------------------------------------------------------- report
@dataclass
class PackingReport:
    """Reading + packing counts for one data set, printed at the start of an SFT run."""

    name: str
    chat: ChatStats
    pack: PackStats

    def lines(self) -> list[str]:
        c, p = self.chat, self.pack
        out = [f"{self.name}: {p.examples:,} conversations -> {p.rows:,} rows of {p.seq_len:,} tokens, "
               f"fill {100 * p.fill:.2f}% ({p.capacity - p.tokens:,} padding tokens), "
               f"{100 * p.loss_tokens / max(p.tokens, 1):.1f}% of tokens carry loss"]
        if c.read:
            dropped = sum(c.dropped.values())
            why = ", ".join(f"{REASONS[k]} {v:,}" for k, v in sorted(c.dropped.items()))
            out.append(f"  read {c.read:,}, kept {c.kept:,}, truncated {c.truncated:,}, dropped {dropped:,}"
                       + (f": {why}" if dropped else ""))
            for reason, where in sorted(c.first.items()):
                out.append(f"  first {REASONS[reason]}: {where}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chat": self.chat.as_dict(), "pack": self.pack.as_dict()}
