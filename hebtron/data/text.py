"""Text hygiene shared by the corpus builders: normalization, dedup, seeded splits, JSONL.

Everything here is deterministic and order-preserving, so a corpus built twice from the
same packages is byte-identical (the demo relies on that for idempotence and for tests).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# C0/C1 control characters other than tab and newline carry no text and confuse tokenizers.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC-normalize, drop control characters, collapse runs of spaces, trim every line.

    Paragraph breaks (a blank line) survive; three or more newlines become two.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def dedup(items: Iterable[T], key: Callable[[T], Any] = lambda x: x) -> list[T]:
    """Keep the first occurrence of each key, in order."""
    seen: set[Any] = set()
    out: list[T] = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def chunk(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive groups of ``size`` items (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stable_key(seed: int, *parts: str) -> str:
    """A seeded hash that orders items reproducibly (independent of PYTHONHASHSEED)."""
    h = hashlib.sha256(str(seed).encode())
    for part in parts:
        h.update(b"\x00" + part.encode("utf-8"))
    return h.hexdigest()


def split_train_valid(
    texts: Sequence[str], valid_fraction: float, seed: int, salt: str = ""
) -> tuple[list[str], list[str]]:
    """Seeded split: the ``ceil(fraction * n)`` texts with the smallest hash go to valid.

    Both halves come back in hash order, which doubles as a seeded shuffle, so documents
    of one source are spread through the stream instead of sitting in one block. At least
    one text goes to valid whenever there are two or more.
    """
    order = sorted(texts, key=lambda t: stable_key(seed, salt, t))
    n_valid = math.ceil(valid_fraction * len(order)) if valid_fraction > 0 else 0
    if len(order) >= 2:
        n_valid = min(max(n_valid, 1), len(order) - 1)
    else:
        n_valid = 0
    return order[n_valid:], order[:n_valid]


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as UTF-8 JSON lines (Hebrew unescaped) atomically; return the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
