"""``hebtron data prepare``: JSONL / Parquet / HF datasets -> Megatron indexed datasets + language ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hebtron.cli import main
from hebtron.data.indexed import open_indexed, prepare, read_meta
from hebtron.lang import LANG_IDS, UNKNOWN_LANG, lang_id
from hebtron.data.tokenizer import load_tokenizer, train_tokenizer
from hebtron.errors import UserError

DOCS = [
    ("עשרות אנשים מגיעים מתאילנד לישראל כשהם נרשמים כמתנדבים.", "he"),
    ("IN THE beginning God created the heaven and the earth.", "en"),
    ("בראשית ברא אלהים את השמים ואת הארץ.", "he"),
    ("Это русский текст.", "ru"),
    ("Texte sans langue connue.", "xx"),
    ("מסמך בלי שדה שפה", None),
]


def write_jsonl(path: Path, docs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text, lang in docs:
            rec = {"text": text} if lang is None else {"text": text, "lang": lang}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    corpus = write_jsonl(d / "c.jsonl", DOCS * 3)
    out = d / "tok"
    train_tokenizer([corpus], vocab_size=400, out=out)
    return out


def megatron_docs(prefix: Path) -> list[list[int]]:
    from hebtron.data.indexed import megatron_indexed

    IndexedDataset = megatron_indexed().IndexedDataset  # megatron's own reader

    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(len(ds) + 1))  # one sequence per document
    docs = [ds[i].tolist() for i in range(len(ds))]
    ours = open_indexed(prefix)  # hebtron's reader, used by the data loaders, sees the same
    assert ours.dtype == ds.index.dtype and len(ours) == len(ds)
    assert ours.document_indices.tolist() == ds.document_indices.tolist()
    assert [ours.get(i).tolist() for i in range(len(ours))] == docs
    assert all(ours.get(i, 1, 2).tolist() == ds.get(i, offset=1, length=2).tolist() for i in range(len(ds)))
    return docs


def test_damaged_index_files_get_one_line(tmp_path, tok_dir):
    prefix = tmp_path / "out" / "train"
    prepare([write_jsonl(tmp_path / "in.jsonl", DOCS)], str(tok_dir), prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()
    cases = [
        (idx, b"NOTANIDX" + good_idx[8:], "train.idx: not a Megatron indexed dataset index (bad header)"),
        (idx, good_idx[:40], "train.idx: truncated (40 bytes, the header promises"),
        (idx, good_idx[:9] + b"\x02" + good_idx[10:], "train.idx: unsupported index (version 2, dtype code 8"),
        (bin_, good_bin[:-2], f"train.bin: truncated ({len(good_bin) - 2} bytes, the index points to {len(good_bin)})"),
    ]
    for path, data, message in cases:
        path.write_bytes(data)
        with pytest.raises(UserError) as err:
            open_indexed(prefix)
        assert message in str(err.value) and "\n" not in str(err.value)
        idx.write_bytes(good_idx), bin_.write_bytes(good_bin)
    bin_.unlink()
    with pytest.raises(UserError, match=r"train: no indexed dataset \(.*train.bin and .*train.idx expected\)"):
        open_indexed(prefix)


def expected_ids(tok_dir: Path, texts: list[str], eos: bool = True) -> list[list[int]]:
    return [ids + [2] * eos for ids in load_tokenizer(tok_dir).encode_batch(texts)]


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_round_trip_through_megatron(tmp_path, tok_dir, workers):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    meta = prepare([src], str(tok_dir), tmp_path / "out" / "train", workers=workers)
    docs = megatron_docs(tmp_path / "out" / "train")
    assert docs == expected_ids(tok_dir, [t for t, _ in DOCS])
    assert all(d[-1] == 2 for d in docs)
    langs = np.load(tmp_path / "out" / "train.lang.npy")
    assert langs.tolist() == [0, 1, 0, LANG_IDS["ru"], UNKNOWN_LANG, UNKNOWN_LANG]
    assert meta == read_meta(tmp_path / "out" / "train")
    assert meta["tokens"] == sum(map(len, docs)) and meta["documents"] == 6
    assert meta["eos_id"] == 2 and meta["pad_id"] == 3 and meta["dtype"] == "uint16"
    assert meta["unknown_lang"] == {"xx": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["train.bin", "train.idx", "train.lang.npy", "train.meta.json"]  # no temp files left


def test_parquet_hf_dir_and_jsonl_concatenate_in_order(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [DOCS[0][0], DOCS[1][0]], "lang": ["he", "en"]}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": [DOCS[2][0]]}).save_to_disk(str(tmp_path / "hf"))
    write_jsonl(tmp_path / "c.jsonl", [DOCS[3]])
    meta = prepare([tmp_path / "a.parquet", tmp_path / "hf", tmp_path / "c.jsonl"], str(tok_dir),
                   tmp_path / "mix", default_lang="he", append_eos=False)
    assert megatron_docs(tmp_path / "mix") == expected_ids(tok_dir, [t for t, _ in DOCS[:4]], eos=False)
    assert np.load(tmp_path / "mix.lang.npy").tolist() == [0, 1, 0, LANG_IDS["ru"]]  # hf row took --lang he
    assert meta["append_eos"] is False


def test_skip_empty_counts(tmp_path, tok_dir):
    src = tmp_path / "e.jsonl"
    src.write_text('{"text": "שלום"}\n\n{"text": "  "}\n{"text": "עולם", "lang": "he"}\n', encoding="utf-8")
    meta = prepare([src], str(tok_dir), tmp_path / "e", skip_empty=True)
    assert meta["documents"] == 2 and meta["skipped_empty"] == 1
    with pytest.raises(UserError, match=r"e\.jsonl:3: field 'text' is empty"):
        prepare([src], str(tok_dir), tmp_path / "e2")
    assert not (tmp_path / "e2.bin").exists()


@pytest.mark.parametrize("content, message", [
    ('{"text": "x"}\n["text"]\n', "2: expected a JSON object"),
    ('{"body": "x"}\n', "1: field 'text' is missing"),
    ('{"text": 5}\n', "1: field 'text' must be a string"),
    ('{"text": "x", "lang": 1}\n', "1: field 'lang' must be a language code"),
])
def test_malformed_records_name_the_line(tmp_path, tok_dir, content, message):
    src = tmp_path / "m.jsonl"
    src.write_text(content)
    with pytest.raises(UserError, match=f"m.jsonl:{message}"):
        prepare([src], str(tok_dir), tmp_path / "m")


def test_parquet_null_text_and_dataset_dict(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"n\.parquet:row 2: field 'text' is missing"):
        prepare([tmp_path / "n.parquet"], str(tok_dir), tmp_path / "n")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="several splits"):
        prepare([tmp_path / "dd"], str(tok_dir), tmp_path / "dd_out")


def test_lang_ids_are_fixed():
    assert (lang_id("he"), lang_id("EN"), lang_id(None), lang_id("xx")) == (0, 1, -1, -1)


BAD_INPUTS = {
    "non-utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not valid UTF-8"),
    "empty-doc": (b'{"text": "ok"}\n{"text": "ok too"}\n{"text": ""}\n', ":3: field 'text' is empty"),
    "broken-json": (b'{"text": "ok"}\n{"text": "unterminated\n', ":2: broken JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_data_is_one_line_exit_2(tmp_path, tok_dir, case, capsys):
    content, message = BAD_INPUTS[case]
    src = tmp_path / f"{case}.jsonl"
    src.write_bytes(content)
    # in this process through the CLI's entry point: an exception escaping main() fails the test
    code = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"error: {src}{message}"), lines[0]
    assert not list(tmp_path.glob("out*"))
