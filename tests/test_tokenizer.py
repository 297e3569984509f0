"""Tokenizer training (byte-level BPE with Nemotron-style special ids) and the compression report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hebtron.cli import main
from hebtron.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from hebtron.errors import UserError

HEBREW = [
    "עשרות אנשים מגיעים מתאילנד לישראל כשהם נרשמים כמתנדבים, אך למעשה משמשים עובדים שכירים זולים.",
    "בראשית ברא אלהים את השמים ואת הארץ. והארץ היתה תהו ובהו וחשך על פני תהום.",
    "הממשלה החליטה היום על הקמת ועדה לבדיקת מחירי הדיור בשנת 2024.",
    "לוח בקרת Dask: הגדרות לתוסף, פתיחה, שמירה ויציאה.",
]
ENGLISH = ["IN THE beginning God created the heaven and the earth.", "Save the notebook before you quit."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    lines = [{"text": t, "lang": "he"} for t in HEBREW * 5] + [{"text": t, "lang": "en"} for t in ENGLISH * 5]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus], vocab_size=500, out=out)
    return out


def test_special_tokens_have_fixed_ids_and_roles(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.eos_token == "</s>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 5
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("text", HEBREW + ENGLISH + ["טקסט שלא נראה 🙂 ونص عربي", "a\n\nb  c\t3.14"])
def test_round_trip_including_unseen_characters(tokenizer_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 0 not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text


def test_special_tokens_in_text_stay_single_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.encode_batch(["<|im_start|>שלום</s>"])[0][0] == 4
    assert tok.encode_batch(["<|im_start|>שלום</s>"])[0][-1] == 2


def test_training_is_deterministic_and_learns_hebrew(corpus, tokenizer_dir, tmp_path):
    train_tokenizer([corpus], vocab_size=500, out=tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    ids = load_tokenizer(tokenizer_dir).encode_batch([HEBREW[0]])[0]
    assert len(ids) < len(HEBREW[0].encode("utf-8")) / 3  # merges, not raw bytes


def test_too_small_vocab_is_a_user_error(corpus, tmp_path):
    with pytest.raises(UserError, match="vocab-size"):
        train_tokenizer([corpus], vocab_size=100, out=tmp_path)


def test_report_json_counts(tokenizer_dir, corpus, capsys):
    assert main(["tokenizer", "report", "--text", str(corpus), str(tokenizer_dir), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    texts = HEBREW * 5 + ENGLISH * 5
    expected_tokens = sum(len(ids) for ids in load_tokenizer(tokenizer_dir).encode_batch(texts))
    assert row["docs"] == len(texts) and row["tokens"] == expected_tokens
    assert row["words"] == sum(len(t.split()) for t in texts)
    assert row["tokens_per_word"] == round(expected_tokens / row["words"], 3)
    assert row["chars_per_token"] == round(sum(map(len, texts)) / expected_tokens, 3)


def test_report_table_and_bad_tokenizer(tokenizer_dir, corpus, capsys, tmp_path):
    assert main(["tokenizer", "report", "--text", str(corpus), str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "tokens/word" in out and tokenizer_dir.name in out
    assert main(["tokenizer", "report", "--text", str(corpus), str(tmp_path / "nope")]) == 2
    assert "not a tokenizer directory" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None, reason="mistral-common not installed")
def test_tekken_from_mistral_common(tokenizer_dir, corpus, capsys):
    tekken = load_tokenizer("tekken")
    assert tekken.vocab_size == 131072 and tekken.token_id("</s>") == 2
    ids = tekken.encode_batch([HEBREW[0]])[0]
    assert 1 not in ids and 2 not in ids  # no BOS/EOS added when measuring
    assert main(["tokenizer", "report", "--text", str(corpus), str(tokenizer_dir), "tekken", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["tokenizer"].startswith("tekken") for r in rows] == [False, True]
    # ~2.5 tokens per Hebrew word for Tekken (DESIGN.md); a corpus-trained BPE beats it here
    assert 1.5 < rows[1]["tokens_per_word"] < 4 and rows[0]["tokens_per_word"] < rows[1]["tokens_per_word"]
