"""Hebrew-aware text keys for corpus tools (dedup, cluster): marks stripped, letters kept.

Two views of a text:
- :func:`strip_marks` drops niqqud (vowel points, dagesh, shin/sin dots) and cantillation
  (te'amim), so a pointed copy of a text reads like the plain one. Final letters (ך ם ן ף ץ) are
  kept as they are: they are spelling, not decoration, and folding them would merge real words.
- :func:`normalize_for_hash` then folds case, punctuation and whitespace, so copies that differ only
  in those compare equal; :func:`words` splits the same view into words, keeping acronyms with
  geresh/gershayim (צה"ל, ח"כ) as one word.
:func:`style_tokens` keeps punctuation as tokens: for content clusters, commas, quotes and
placeholders (``%1``) tell news from Bible from UI strings better than words alone do.
"""

from __future__ import annotations

import re
import unicodedata

# Hebrew combining marks: cantillation U+0591-U+05AF, points U+05B0-U+05BD, rafe U+05BF,
# shin/sin dots U+05C1-U+05C2, upper/lower dots U+05C4-U+05C5, qamats qatan U+05C7.
# Maqaf (U+05BE), paseq (U+05C0), sof pasuq (U+05C3) and nun hafukha (U+05C6) are punctuation.
_HEBREW_MARKS = re.compile("[\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7]")
# A quote mark between two letters is part of an acronym (צה"ל) or an abbreviation (ת'), not punctuation.
_INNER_QUOTE = re.compile("(?<=\\w)[\"'\u05f3\u05f4\u201c\u201d\u2019](?=\\w)")
_WORD = re.compile(r"\w+")
_STYLE_TOKEN = re.compile(r"\w+|[^\w\s]")


def strip_marks(text: str) -> str:
    """NFKD, drop Hebrew niqqud and cantillation, NFC again (presentation forms like U+FB2A
    decompose to letter + mark first, so they lose their marks too)."""
    return unicodedata.normalize("NFC", _HEBREW_MARKS.sub("", unicodedata.normalize("NFKD", text)))


def words(text: str) -> list[str]:
    """Lower-cased words of the mark-stripped text; punctuation and whitespace separate them."""
    return _WORD.findall(_INNER_QUOTE.sub("", strip_marks(text).casefold()))


def normalize_for_hash(text: str) -> str:
    """The exact-duplicate key: words joined by one space (marks, case, punctuation and
    whitespace folded; final letters kept)."""
    return " ".join(words(text))


def style_tokens(text: str) -> list[str]:
    """Words plus one token per punctuation character, on the mark-stripped, case-folded text."""
    return _STYLE_TOKEN.findall(_INNER_QUOTE.sub("", strip_marks(text).casefold()))


def for_clustering(text: str) -> str:
    """The text the character n-grams of :mod:`hebtron.data.cluster` see: marks stripped,
    case folded, punctuation kept, whitespace collapsed."""
    return " ".join(style_tokens(text))


_RTL = re.compile("[\u0590-\u05ff\ufb1d-\ufb4f]")
_LTR_OR_DIGIT = re.compile(r"[0-9A-Za-z\u00c0-\u024f]")


def visual_rtl(word: str) -> str:
    """A right-to-left word in visual order, for renderers without the bidi algorithm (matplotlib).

    Only single words: a Hebrew word without Latin letters or digits comes back reversed;
    anything else unchanged (mixed-direction strings would need the full Unicode bidi algorithm).
    """
    if _RTL.search(word) and not _LTR_OR_DIGIT.search(word):
        return word[::-1]
    return word
