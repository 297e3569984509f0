"""CPT windows: document boundaries, blending, phases, resumption and validation batches.

Sources are real Megatron indexed datasets whose tokens encode where they come from:
token = base + 10 * doc + offset-in-doc (never 2), and each document ends with </s> = 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hebtron.data.cpt import CPTBatches, Phase, Source, ValidationBatches
from hebtron.lang import LANG_IDS, UNKNOWN_LANG
from hebtron.errors import UserError

EOS = 2
L = 16
SOURCES = {"a": (1000, "he"), "b": (2000, "en"), "c": (3000, "ar")}


def make_source(prefix: Path, base: int, lang: str, n_docs: int, seed: int) -> list[list[int]]:
    from hebtron.data.indexed import megatron_indexed

    IndexedDatasetBuilder = megatron_indexed().IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    docs = [[base + 10 * d + j for j in range(int(rng.integers(1, 10)))] + [EOS] for d in range(n_docs)]
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    np.save(f"{prefix}.lang.npy", np.full(n_docs, LANG_IDS[lang], dtype=np.int16))
    Path(f"{prefix}.meta.json").write_text(json.dumps({"pad_id": 3, "eos_id": EOS}))
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, tuple[str, list[list[int]]]]:
    d = tmp_path_factory.mktemp("cpt")
    out = {}
    for i, (name, (base, lang)) in enumerate(SOURCES.items()):
        out[name] = (str(d / name), make_source(d / name, base, lang, n_docs=12 + 3 * i, seed=i))
    return out


def sources(data, **weights) -> list[Source]:
    return [Source(data[n][0], w) for n, w in weights.items()]


def row_source(row: torch.Tensor) -> str:
    token = int(row[row != EOS][0])
    return "abc"[token // 1000 - 1]


def rows_of(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i] for k, v in batch.items() if k != "cu_seqlens"} for i in range(batch["input_ids"].shape[0])]


def check_row(row: dict[str, torch.Tensor]) -> None:
    ids, pos, seq = row["input_ids"], row["position_ids"], row["seq_idx"]
    after_eos = torch.cat([torch.tensor([True]), ids[:-1] == EOS])
    assert torch.equal(pos == 0, after_eos)  # restart exactly after </s> (and at the row start)
    assert torch.equal(seq, torch.cumsum(after_eos.long(), 0) - 1)
    assert torch.equal(row["labels"][:-1], ids[1:])
    assert bool((row["loss_mask"] == 1).all())
    # inside a document that starts in this row, the position is the offset in the document
    inside = (seq > 0) & (ids != EOS)
    assert torch.equal(pos[inside], ids[inside] % 10)
    base, lang = SOURCES[row_source(ids)]
    assert bool((row["lang"] == LANG_IDS[lang]).all())
    assert bool(((ids == EOS) | (ids // 1000 == base // 1000)).all())


def test_windows_restart_at_document_boundaries(data):
    batches = CPTBatches(sources(data, a=1, b=1, c=1), seq_len=L, seed=0)
    for _ in range(5):
        batch = batches.next_batch(7)
        assert all(v.dtype == torch.long for v in batch.values())
        assert batch["input_ids"].shape == (7, L)
        for row in rows_of(batch):
            check_row(row)
        flat = batch["seq_idx"] + torch.arange(7)[:, None] * (L + 1)  # segments never span rows
        starts = torch.nonzero(torch.diff(flat.flatten(), prepend=torch.tensor([-1]))).flatten()
        assert torch.equal(batch["cu_seqlens"], torch.cat([starts, torch.tensor([7 * L])]))


def test_one_source_stream_covers_every_document_once_per_epoch(data):
    prefix, docs = data["a"]
    total = sum(map(len, docs))
    batches = CPTBatches([prefix], seq_len=L, seed=5, shuffle_windows=False)
    n_rows = 2 * total // L + 2
    batch = batches.next_batch(n_rows)
    stream = torch.cat([batch["input_ids"][0, :1], batch["labels"].flatten()]).tolist()
    assert all(torch.equal(batch["labels"][i, -1], batch["input_ids"][i + 1, 0]) for i in range(n_rows - 1))

    def split(tokens):
        out, cur = [], []
        for t in tokens:
            cur.append(t)
            if t == EOS:
                out.append(cur)
                cur = []
        return out

    epoch0, epoch1 = split(stream[:total]), split(stream[total : 2 * total])
    assert sorted(epoch0) == sorted(docs) and sorted(epoch1) == sorted(docs)
    assert epoch0 != docs and epoch0 != epoch1  # reshuffled every epoch, from the seed
    again = CPTBatches([prefix], seq_len=L, seed=5, shuffle_windows=False).next_batch(n_rows)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    other = CPTBatches([prefix], seq_len=L, seed=6, shuffle_windows=False).next_batch(n_rows)
    assert not torch.equal(other["input_ids"], batch["input_ids"])


def test_shuffled_windows_are_a_permutation_of_the_contiguous_ones(data):
    prefix, docs = data["a"]
    block = sum(map(len, docs)) // L  # one shuffle block: about one epoch of windows
    n_rows = 3 * block
    contiguous = CPTBatches([prefix], seq_len=L, seed=5, shuffle_windows=False).next_batch(n_rows)
    shuffled = CPTBatches([prefix], seq_len=L, seed=5).next_batch(n_rows)

    def key(batch, i):
        return tuple(batch["input_ids"][i].tolist() + batch["labels"][i, -1:].tolist())

    where = {key(contiguous, i): i for i in range(n_rows)}
    assert len(where) == n_rows  # the synthetic windows are all distinct
    order = [where[key(shuffled, i)] for i in range(n_rows)]
    for b in range(3):  # each block reads exactly the same stretch of the stream, permuted
        assert sorted(order[b * block : (b + 1) * block]) == list(range(b * block, (b + 1) * block))
    neighbours = sum(order[i + 1] == order[i] + 1 for i in range(n_rows - 1))
    assert order != sorted(order) and neighbours < n_rows // 4  # batch neighbours rarely stream neighbours
    for row in rows_of(shuffled):
        check_row(row)
    with pytest.raises(UserError, match="shuffle_windows"):
        CPTBatches([prefix], seq_len=L, seed=5).load_state_dict(
            CPTBatches([prefix], seq_len=L, seed=5, shuffle_windows=False).state_dict())


def test_blend_follows_weights_at_every_prefix(data):
    weights = {"a": 5, "b": 3, "c": 2}
    batches = CPTBatches(sources(data, **weights), seq_len=L, seed=1)
    seen = [row_source(r) for r in batches.next_batch(200)["input_ids"]]
    for n in range(1, len(seen) + 1):
        for name, w in weights.items():
            assert abs(seen[:n].count(name) - n * w / 10) <= 1
    langs = batches.next_batch(100)["lang"]
    assert abs((langs == LANG_IDS["he"]).float().mean().item() - 0.5) < 0.02


def test_phases_run_in_order_and_cursors_carry_over(data):
    phases = [
        Phase("warmup", tokens=7 * L + 3, weights={"a": 1}),  # rounds up to 8 windows
        Phase("english", tokens=4 * L, weights={"b": 1}),
        Phase("back", tokens=None, weights={"a": 1, "c": 1}),
    ]
    batches = CPTBatches(sources(data, a=1, b=1, c=1), seq_len=L, seed=0, phases=phases)
    names, rows = [], []
    for size in (3, 6, 5, 2):
        for _ in range(size):
            names.append(batches.phase_name)
            rows.append(batches.next_batch(1)["input_ids"][0])
    labels_a = [r for r in rows if row_source(r) == "a"]
    assert names == ["warmup"] * 8 + ["english"] * 4 + ["back"] * 4
    assert [row_source(r) for r in rows] == ["a"] * 8 + ["b"] * 4 + ["a", "c", "a", "c"]
    # phase 3 continues source a where phase 1 left it: the streams are contiguous
    plain = CPTBatches([data["a"][0]], seq_len=L, seed=0).next_batch(10)["input_ids"]
    assert torch.equal(torch.stack(labels_a), plain)


def test_phase_errors_name_the_phase(data):
    with pytest.raises(UserError, match="phase 'p1': unknown source"):
        CPTBatches(sources(data, a=1), seq_len=L, phases=[Phase("p1", 10, {"zz": 1})])
    with pytest.raises(UserError, match="phase 'p1': only the last phase"):
        CPTBatches(sources(data, a=1), seq_len=L, phases=[Phase("p1"), Phase("p2")])
    with pytest.raises(UserError, match="positive sum"):
        CPTBatches(sources(data, a=1), seq_len=L, phases=[Phase("p1", None, {"a": 0})])


def test_resume_gives_identical_batches_for_any_batch_sizes(data):
    def make():
        phases = [Phase("one", 5 * L, {"a": 2, "b": 1}), Phase("two", None, {"b": 1, "c": 3})]
        return CPTBatches(sources(data, a=1, b=1, c=1), seq_len=L, seed=3, phases=phases)

    first = make()
    before = [first.next_batch(n) for n in (3, 5, 1)]
    state = json.loads(json.dumps(first.state_dict()))
    after = [first.next_batch(n) for n in (4, 2, 6)]

    resumed = make()
    resumed.load_state_dict(state)
    for ref, n in zip(after, (4, 2, 6), strict=True):
        got = resumed.next_batch(n)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    one_go = make().next_batch(21)
    for key in ("input_ids", "labels", "position_ids", "seq_idx", "lang"):
        assert torch.equal(one_go[key], torch.cat([b[key] for b in before + after]))
    assert resumed.state_dict() == first.state_dict()

    ranks = [make().next_batch(21, rank=r, world_size=3)["input_ids"] for r in range(3)]
    assert torch.equal(torch.cat(ranks), one_go["input_ids"])  # data-parallel shares tile the batch

    wrong = CPTBatches(sources(data, a=1, b=1, c=1), seq_len=L + 1, seed=3)
    with pytest.raises(UserError, match="seq_len"):
        wrong.load_state_dict(state)


def test_eod_mask_loss_masks_labels_that_open_a_document(data):
    batch = CPTBatches(sources(data, a=1), seq_len=L, eod_mask_loss=True).next_batch(8)
    assert torch.equal(batch["loss_mask"] == 0, batch["input_ids"] == EOS)


def test_validation_batches_are_fixed_and_cover_the_file_once(data):
    prefix, docs = data["b"]
    stream = [t for d in docs for t in d]
    val = ValidationBatches(prefix, seq_len=L, batch_size=3)
    first, second = list(val), list(val)
    assert len(first) == len(val)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second, strict=True))
    assert [b["input_ids"].shape[0] for b in first][:-1] == [3] * (len(first) - 1)
    rows = [r for b in first for r in rows_of(b)]
    got = [int(rows[0]["input_ids"][0])] + [int(t) for r in rows for t in r["labels"][r["loss_mask"] == 1]]
    assert got == stream  # every token once, in file order
    last = rows[-1]
    pad = last["loss_mask"] == 0
    assert pad.any() and bool((last["lang"][1:][pad[:-1]] == UNKNOWN_LANG).all())
    assert bool((last["labels"][pad] == 3).all()) and bool((torch.diff(last["seq_idx"]) >= 0).all())
    limited = ValidationBatches(prefix, seq_len=L, batch_size=2, max_batches=1)
    assert len(list(limited)) == 1 == len(limited)


def test_prepared_corpus_feeds_cpt_batches(tmp_path):
    from hebtron.data.indexed import prepare
    from hebtron.data.tokenizer import load_tokenizer, train_tokenizer

    texts = [("שלום עולם, זהו מסמך ראשון בעברית.", "he"), ("A second document, in English.", "en"),
             ("מסמך שלישי וקצר.", "he")]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t, "lang": g}, ensure_ascii=False) + "\n" for t, g in texts),
                   encoding="utf-8")
    train_tokenizer([src], vocab_size=300, out=tmp_path / "tok", min_frequency=1)
    prepare([src], str(tmp_path / "tok"), tmp_path / "c")
    ids = load_tokenizer(tmp_path / "tok").encode_batch([t for t, _ in texts])
    batch = ValidationBatches(tmp_path / "c", seq_len=8, batch_size=100).__iter__().__next__()
    mask = batch["loss_mask"] == 1
    labels = batch["labels"][mask].tolist()
    expected = [t for doc in ids for t in doc + [EOS]]
    assert [int(batch["input_ids"][0, 0])] + labels == expected
    want_lang = [LANG_IDS[g] for (_, g), doc in zip(texts, ids, strict=True) for _ in doc + [EOS]]
    assert batch["lang"][batch["input_ids"] != 3].tolist()[: len(expected) - 1] == want_lang[:-1]
