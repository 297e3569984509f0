"""hebtron data dedup: Hebrew-aware keys, planted duplicates found on 20k documents, every line
accounted for, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import random

import pytest

from hebtron.cli import main
from hebtron.data.dedup import DedupConfig, dedup_corpus, jaccard, lsh_bands, shingles
from hebtron.data.hebrew_text import normalize_for_hash, strip_marks, words
from tests.corpus_fixtures import add_marks, synthetic_corpus, write_corpus

GEN_1_1 = "בְּרֵאשִׁ֖ית בָּרָ֣א אֱלֹהִ֑ים אֵ֥ת הַשָּׁמַ֖יִם וְאֵ֥ת הָאָֽרֶץ׃"


def test_marks_stripped_final_letters_kept_punctuation_folded():
    assert strip_marks(GEN_1_1) == "בראשית ברא אלהים את השמים ואת הארץ׃"
    assert normalize_for_hash(GEN_1_1) == "בראשית ברא אלהים את השמים ואת הארץ"
    assert normalize_for_hash("שָׁלוֹם,   עוֹלָם!!") == normalize_for_hash("שלום עולם") == "שלום עולם"
    assert normalize_for_hash("שלום") != normalize_for_hash("שלומ")  # final mem is spelling
    assert words('ח"כ אורה נמיר (מערך) אמר לצה״ל') == ["חכ", "אורה", "נמיר", "מערך", "אמר", "לצהל"]
    assert strip_marks("\ufb2a") == "ש"  # presentation form shin with shin dot
    assert normalize_for_hash("Hello, WORLD") == "hello world"


def test_lsh_bands_reach_the_threshold():
    bands, rows = lsh_bands(0.8, 128)
    assert bands * rows <= 128 and (1 - 0.8**rows) ** bands <= 1e-4
    assert (1 - 0.8 ** (rows + 1)) ** (128 // (rows + 1)) > 1e-4  # the most rows that still reach it


@pytest.mark.slow
def test_planted_duplicates_found_on_20k_documents(tmp_path):
    records, planted = synthetic_corpus(20_000, seed=3)
    path = write_corpus(tmp_path / "corpus.jsonl", records)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")  # a blank line is accounted for too
    # the footer copies really are near duplicates, and hard negatives really are not
    for p in planted:
        a = shingles(normalize_for_hash(records[p.original]["text"]), "word", 3)
        b = shingles(normalize_for_hash(records[p.index]["text"]), "word", 3)
        assert (jaccard(a, b) == 1.0) if p.kind != "footer" else (0.8 <= jaccard(a, b) < 1.0)
    report = dedup_corpus([path], tmp_path / "out")
    assert report["accounted"] and report["input_lines"] == 20_001 and report["blank_lines"] == 1
    dups = [json.loads(line) for line in open(tmp_path / "out" / "duplicates.jsonl", encoding="utf-8")]
    expected = {f"{path}:{p.index + 1}": f"{path}:{p.original + 1}" for p in planted}
    assert {d["where"]: d["duplicate_of"] for d in dups} == expected
    kinds = {d["where"]: d["kind"] for d in dups}
    assert all(kinds[f"{path}:{p.index + 1}"] == ("near" if p.kind == "footer" else "exact") for p in planted)
    kept = open(tmp_path / "out" / "kept.jsonl", encoding="utf-8").read().splitlines()
    assert len(kept) == 20_000 - len(planted) == report["kept"]
    planted_lines = {p.index for p in planted}
    originals = [json.dumps(r, ensure_ascii=False) for i, r in enumerate(records) if i not in planted_lines]
    assert kept == originals  # every distinct document kept, byte for byte, in order
    saved = sum(s["bytes_saved"] for s in report["per_source"].values())
    assert saved == sum(len(records[p.index]["text"].encode()) for p in planted)
    assert report["largest_clusters"] and "report" in (tmp_path / "out" / "report.md").read_text()[:40].lower()


def test_deterministic_and_char_shingles(tmp_path):
    rng = random.Random(0)
    base = "הממשלה אישרה הבוקר את תקציב המדינה לשנה הבאה לאחר דיון ארוך בכנסת ובוועדות השונות"
    records = [{"text": base}, {"text": add_marks(base, rng)}, {"text": base + " עוד מילה"}, {"text": "משהו אחר לגמרי"}]
    path = write_corpus(tmp_path / "c.jsonl", records)
    a = dedup_corpus([path], tmp_path / "a", DedupConfig(shingle="char", ngram=5))
    b = dedup_corpus([path], tmp_path / "b", DedupConfig(shingle="char", ngram=5))
    assert (tmp_path / "a" / "duplicates.jsonl").read_bytes() == (tmp_path / "b" / "duplicates.jsonl").read_bytes()
    assert (a["kept"], a["exact_duplicates"], a["near_duplicates"]) == (b["kept"], 1, 1) == (2, 1, 1)


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "fine"}\n{"text": broken\n', "c.jsonl:2: broken JSON"),
    (b'{"text": "\xff\xfe"}\n', "c.jsonl:1: not valid UTF-8"),
    (b"", "no documents (empty corpus)"),
    (b'{"text": ""}\n', "c.jsonl:1: field 'text' is empty"),
    (b'{"body": "x"}\n', "c.jsonl:1: field 'text' is missing"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, content, expected):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    assert main(["data", "dedup", "--input", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "kept.jsonl").exists()  # nothing half-written


def test_cli_prints_the_counts(tmp_path, capsys):
    path = write_corpus(tmp_path / "c.jsonl", [{"text": "אחת שתיים"}, {"text": "אַחַת, שְׁתַּיִים"}, {"text": "", "source": "x"}])
    assert main(["data", "dedup", "--input", str(path), "--out", str(tmp_path / "o"), "--skip-empty"]) == 0
    out = capsys.readouterr().out
    assert "3 lines, 2 documents: kept 1, exact duplicates 1" in out
    dups = [json.loads(x) for x in (tmp_path / "o" / "duplicates.jsonl").read_text().splitlines()]
    assert [d["kind"] for d in dups] == ["exact", "empty"]
