"""Best-fit-decreasing packing, the collator's fields, and packed rows on disk."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hebtron.data.chat import ChatStats, Encoded
from hebtron.data.packing import (
    PackedRows,
    PackingReport,
    PackStats,
    best_fit_decreasing,
    collate,
    pack,
    pack_stream,
    read_packed_parquet,
    write_packed_parquet,
)
from hebtron.errors import UserError


def _reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm, quadratic: scan every bin for the tightest fit."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_decreasing_matches_the_textbook_algorithm(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 100, 256])
    lengths = [rng.randint(1, capacity) if rng.random() < 0.2 else rng.randint(1, capacity // 3 + 1)
               for _ in range(rng.randint(1, 300))]
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == _reference_bfd(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each item exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert best_fit_decreasing(lengths, capacity) == bins  # deterministic


def test_best_fit_decreasing_refuses_items_that_cannot_fit():
    with pytest.raises(ValueError, match="expected 1..8"):
        best_fit_decreasing([3, 9], 8)


def _examples(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(10, 500, length).astype(np.int32)
        mask = np.zeros(length, dtype=bool)
        a = int(rng.integers(1, length))
        mask[a : a + int(rng.integers(1, length - a + 1))] = True  # one assistant span, never the first token
        out.append(Encoded(ids, mask, lang=k % 3))
    return out


def test_rows_hold_each_example_once_and_are_nearly_full():
    examples = _examples(2000, seed=1, lo=5, hi=300)
    stats = PackStats()
    rows = list(pack_stream(examples, 512, pad_id=3, buffer_size=500, stats=stats))
    seen = []
    for row in rows:
        pos = 0
        for n in row.doc_lens:
            seen.append(row.input_ids[pos : pos + n].tobytes())
            pos += int(n)
        assert (row.input_ids[pos:] == 3).all() and not row.assistant_mask[pos:].any()
    assert sorted(seen) == sorted(ex.input_ids.tobytes() for ex in examples)
    assert stats.examples == 2000 and stats.rows == len(rows)
    assert stats.tokens == sum(len(ex.input_ids) for ex in examples)
    assert stats.fill >= 0.98, stats.as_dict()
    lines = PackingReport("x", ChatStats(), stats).lines()
    assert f"fill {100 * stats.fill:.2f}%" in lines[0]


def test_streaming_buffers_bound_what_is_packed_together():
    examples = _examples(100, seed=2)
    rows = list(pack_stream(examples, 64, buffer_size=10))
    # no row mixes examples of two buffers: all of a row's examples come from one block of 10
    where = {ex.input_ids.tobytes(): i // 10 for i, ex in enumerate(examples)}
    for row in rows:
        starts = np.concatenate([[0], np.cumsum(row.doc_lens)[:-1]])
        blocks = {where[row.input_ids[s : s + n].tobytes()] for s, n in zip(starts, row.doc_lens, strict=True)}
        assert len(blocks) == 1
    again = pack_stream(examples, 64, buffer_size=10)
    assert [r.input_ids.tolist() for r in rows] == [r.input_ids.tolist() for r in again]


def _one_row() -> tuple[list[Encoded], dict[str, torch.Tensor]]:
    a = Encoded(np.array([11, 12, 13, 14, 15], np.int32), np.array([0, 0, 1, 1, 1], bool), lang=0)
    b = Encoded(np.array([21, 22, 23], np.int32), np.array([1, 1, 1], bool), lang=1)  # 21: never a target
    rows = pack([a, b], seq_len=10, pad_id=3)
    return [a, b], collate(rows)


def test_collate_fields_on_a_hand_checked_row():
    _, batch = _one_row()
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 21, 22, 23, 3, 3]]
    # next token where it is the assistant's and in the same conversation
    assert batch["labels"].tolist() == [[-100, 13, 14, 15, -100, 22, 23, -100, -100, -100]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 1, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 2]]
    assert batch["lang"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, -1, -1]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 10]
    assert int(batch["max_seqlen"]) == 5
    assert batch["loss_mask"].dtype == torch.float32
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids", "seq_idx", "lang"))


def test_sample_averaging_weighs_each_conversation_once():
    examples = _examples(50, seed=3)
    rows = pack(examples, 128)
    token = collate(rows, "token")
    sample = collate(rows, "sample")
    assert torch.equal(token["loss_mask"] > 0, sample["loss_mask"] > 0)
    assert float(token["loss_mask"].sum()) == sum(int(e.assistant_mask[1:].sum()) for e in examples)
    assert float(sample["loss_mask"].double().sum()) == pytest.approx(50, abs=1e-4)  # normalizer: conversations
    for r in range(len(rows)):  # within a conversation every loss token has the same weight 1/n
        seg, w = sample["seq_idx"][r], sample["loss_mask"][r]
        for d in seg.unique():
            ws = w[(seg == d) & (w > 0)]
            if ws.numel():
                assert torch.allclose(ws, torch.full_like(ws, 1.0 / ws.numel()))


def test_pad_to_multiple():
    examples, _ = _one_row()
    rows = pack(examples, seq_len=16, pad_id=3, multiple_of=4)
    batch = collate(rows)
    assert rows[0].doc_lens.tolist() == [8, 4]
    assert batch["cu_seqlens"].tolist() == [0, 8, 12, 16]
    assert batch["seq_idx"].tolist() == [[0] * 8 + [1] * 4 + [2] * 4]
    assert batch["labels"][0, 4:8].tolist() == [-100] * 4  # padding inside a conversation carries no loss
    with pytest.raises(ValueError, match="multiple"):
        pack(examples, seq_len=10, multiple_of=4)


def test_cu_seqlens_over_several_rows():
    rows = pack(_examples(30, seed=4, lo=10, hi=30), 64)
    batch = collate(rows[:3])
    cu = batch["cu_seqlens"]
    seq_idx = batch["seq_idx"].reshape(-1)
    starts = torch.nonzero(torch.diff(seq_idx, prepend=torch.tensor([-1])) != 0).flatten()
    row_starts = torch.arange(3) * 64
    assert cu.tolist() == sorted(set(starts.tolist()) | set(row_starts.tolist())) + [3 * 64]
    assert int(batch["max_seqlen"]) == int(torch.diff(cu).max())


def test_packed_parquet_round_trip(tmp_path):
    examples = _examples(300, seed=5)
    rows = pack(examples, 96)
    path = tmp_path / "packed.parquet"
    n = write_packed_parquet(iter(rows), path, 96, lambda: {"train_on": "all"}, row_group=16)
    assert n == len(rows) and not list(tmp_path.glob("*.tmp-*"))
    back = read_packed_parquet(path)
    assert back.meta["seq_len"] == 96 and back.meta["train_on"] == "all" and back.meta["rows"] == len(rows)
    mem = PackedRows.from_rows(rows, 96)
    assert len(back) == len(mem) and back.fingerprint() == mem.fingerprint()
    for i in (0, len(rows) // 2, len(rows) - 1):
        a, b = collate([back.row(i)], "sample"), collate([mem.row(i)], "sample")
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="not a packed file"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
        read_packed_parquet(tmp_path / "plain.parquet")
