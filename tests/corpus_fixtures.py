"""A synthetic Hebrew corpus with planted duplicates, for the dedup tests and bench/dedup_memory.py.

Distinct documents are random sequences over a vocabulary of pseudo-Hebrew words (final letters
at word ends, as in real spelling); some carry a shared boilerplate footer and some share half
their body with another document (hard negatives: both must be kept). Planted copies come after
their original in the stream:
- ``exact``: the same text with whitespace and punctuation changed;
- ``niqqud``: the text with niqqud and cantillation marks added to its letters;
- ``footer``: the text with its boilerplate footer swapped for another one (Jaccard >= 0.8 on word
  3-grams, checked by the tests).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LETTERS = "אבגדהוזחטיכלמנסעפצקרשת"
FINALS = {"כ": "ך", "מ": "ם", "נ": "ן", "פ": "ף", "צ": "ץ"}
NIQQUD = [chr(c) for c in range(0x05B0, 0x05BD)] + ["\u05c1", "\u05c2"]
CANTILLATION = [chr(c) for c in range(0x0591, 0x05AF)]
FOOTERS = [
    "כל הזכויות שמורות לאתר החדשות הישראלי בעמ ואין להעתיק ללא רשות בכתב",
    "לחצו כאן כדי להירשם לניוזלטר השבועי שלנו ולקבל עדכונים חמים ישירות למייל",
    "הכתבה פורסמה לראשונה במהדורה המודפסת של העיתון ועודכנה לאחר מכן באתר",
    "תגובות הגולשים אינן משקפות את עמדת המערכת והאחריות עליהן חלה על כותביהן",
    "שתפו את הכתבה עם חברים ברשתות החברתיות ועקבו אחרינו לעדכונים נוספים",
]


@dataclass(frozen=True)
class Planted:
    """A planted duplicate: its index in the stream, its kind, and its original's index."""

    index: int
    kind: str
    original: int


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    words = set()
    while len(words) < size:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7)))
        words.add(w[:-1] + FINALS.get(w[-1], w[-1]))
    return sorted(words)


def add_marks(text: str, rng: random.Random) -> str:
    """Niqqud after most Hebrew letters and a cantillation mark now and then."""
    out = []
    for ch in text:
        out.append(ch)
        if "\u05d0" <= ch <= "\u05ea":
            if rng.random() < 0.8:
                out.append(rng.choice(NIQQUD))
            if rng.random() < 0.15:
                out.append(rng.choice(CANTILLATION))
    return "".join(out)


def _reformat(text: str, rng: random.Random) -> str:
    """Same words, other whitespace and punctuation (the exact key folds both)."""
    words = text.split()
    glue = [rng.choice([" ", "  ", ", ", " - ", "\n", ". ", " "]) for _ in words[1:]]
    return words[0] + "".join(g + w for g, w in zip(glue, words[1:])) + rng.choice(["", ".", "!", " ..."])


def synthetic_corpus(n_docs: int, seed: int = 0, dup_fraction: float = 0.2, body_words: tuple[int, int] = (100, 160),
                     ) -> tuple[list[dict[str, str]], list[Planted]]:
    """``n_docs`` records ``{"text", "source"}`` and the planted duplicates among them."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng, 8000)
    n_planted = int(n_docs * dup_fraction)
    n_distinct = n_docs - n_planted
    distinct: list[tuple[str, int | None]] = []  # (body, footer index)
    for i in range(n_distinct):
        if i and rng.random() < 0.05:  # hard negative: half the body of an earlier document
            other = distinct[rng.randrange(len(distinct))][0].split()
            half = other[: len(other) // 2]
            body = " ".join(half + [rng.choice(vocab) for _ in range(len(other) - len(half))])
        else:
            body = " ".join(rng.choice(vocab) for _ in range(rng.randint(*body_words)))
        distinct.append((body, rng.randrange(len(FOOTERS)) if rng.random() < 0.6 else None))

    def text_of(body: str, footer: int | None) -> str:
        return body if footer is None else f"{body}\n{FOOTERS[footer]}"

    # (time, kind, original distinct index); copies come after their original
    times = [rng.random() for _ in range(n_distinct)]
    events: list[tuple[float, str, int]] = [(t, "distinct", i) for i, t in enumerate(times)]
    with_footer = [i for i, (_, f) in enumerate(distinct) if f is not None]
    for j in range(n_planted):
        kind = ("exact", "niqqud", "footer")[j % 3]
        original = rng.choice(with_footer) if kind == "footer" else rng.randrange(n_distinct)
        events.append((rng.uniform(times[original], 1.0), kind, original))
    events.sort()
    records: list[dict[str, str]] = []
    planted: list[Planted] = []
    position: dict[int, int] = {}
    sources = ("crawl-a", "crawl-b", "news-wire", "forum")
    for _, kind, i in events:
        body, footer = distinct[i]
        if kind == "distinct":
            position[i] = len(records)
            text = text_of(body, footer)
        elif kind == "exact":
            text = _reformat(text_of(body, footer), rng)
        elif kind == "niqqud":
            text = add_marks(text_of(body, footer), rng)
        else:
            assert footer is not None
            text = text_of(body, (footer + rng.randint(1, len(FOOTERS) - 1)) % len(FOOTERS))
        if kind != "distinct":
            planted.append(Planted(len(records), kind, position[i]))
        records.append({"text": text, "source": rng.choice(sources)})
    return records, planted


def write_corpus(path: Path, records: list[dict[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
