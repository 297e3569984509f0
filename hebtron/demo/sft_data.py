"""Demo SFT data: English -> Hebrew UI-string translation as chat conversations.

Built from ``ui_pairs.jsonl`` (the gettext catalogs of ``jupyterlab-language-pack-he-il``,
written by :mod:`hebtron.demo.corpus`). Pairs that share an English or a Hebrew string are kept
together (union-find), then the groups are split by a seeded hash into train, validation
and a held-out test set, so no test translation is seen in training, not even under
another English wording. Outputs, next to the pairs:

- ``sft_train.jsonl`` / ``sft_valid.jsonl``: ``{"messages": [...], "lang": "he"}``, one to
  three translation requests per conversation (varied instructions, some with a system
  prompt), so multi-turn masking is exercised;
- ``translation_test.jsonl``: ``{"en", "he", "source"}`` pairs for a chrF evaluation; prompt
  the model with :func:`translation_messages` (the first training instruction).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from hebtron.data.text import write_jsonl
from hebtron.demo.files import read_jsonl, require, write_manifest

SYSTEM_PROMPT = "You translate software user-interface strings from English to Hebrew."
INSTRUCTIONS = (
    "Translate this user-interface string from English to Hebrew. Reply with the translation only.\n\n{en}",
    "Hebrew translation of this UI text:\n{en}",
    "How does this software label read in Hebrew?\n{en}",
    "תרגם לעברית את המחרוזת: {en}",
)
FOLLOW_UPS = ("And this one: {en}", "Next string:\n{en}", "Now translate: {en}")
FILES = ("sft_train.jsonl", "sft_valid.jsonl", "translation_test.jsonl")
VERSION = 1


def translation_messages(en: str) -> list[dict[str, str]]:
    """The prompt an evaluation sends for one English string (a generation prompt follows)."""
    return [{"role": "user", "content": INSTRUCTIONS[0].format(en=en)}]


def _groups(pairs: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of pairs connected by a shared English (case-folded) or Hebrew string."""
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, p in enumerate(pairs):
        for key in (("en", p["en"].strip().casefold()), ("he", p["he"].strip())):
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pairs)):
        groups[find(i)].append(i)
    return list(groups.values())


def _split(group: list[int], pairs: list[dict[str, Any]], seed: int, test: float, valid: float) -> str:
    key = min(pairs[i]["en"] for i in group)
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test else "valid" if u < test + valid else "train"


def _conversations(pairs: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Consecutive pairs of one source become conversations of 1-3 requests."""
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in pairs:
        by_source[p.get("source", "")].append(p)
    out = []
    for source in sorted(by_source):
        items = by_source[source]
        i = 0
        while i < len(items):
            turns = rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0]
            chunk, i = items[i : i + turns], i + turns
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
            for k, p in enumerate(chunk):
                ask = rng.choice(INSTRUCTIONS) if k == 0 else rng.choice(FOLLOW_UPS)
                messages += [{"role": "user", "content": ask.format(en=p["en"])},
                             {"role": "assistant", "content": p["he"]}]
            out.append({"messages": messages, "lang": "he", "source": source})
    rng.shuffle(out)
    return out


def build_sft_demo(data_dir: str | Path, seed: int = 0, test_fraction: float = 0.1, valid_fraction: float = 0.05,
                   force: bool = False) -> dict[str, Any]:
    """Write the three files under ``data_dir`` (skipped when built from the same pairs and
    settings); returns the manifest (counts per file)."""
    data_dir = Path(data_dir)
    source = require(data_dir / "ui_pairs.jsonl")
    settings = {"version": VERSION, "seed": seed, "test": test_fraction, "valid": valid_fraction,
                "pairs_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    manifest_path = data_dir / "sft_manifest.json"
    if not force and manifest_path.is_file() and all((data_dir / f).is_file() for f in FILES):
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("settings") == settings:
            return {**manifest, "skipped": True}
    pairs = [r for r in read_jsonl(source) if isinstance(r.get("en"), str) and isinstance(r.get("he"), str)
             and r["en"].strip() and r["he"].strip()]
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "valid": [], "test": []}
    for group in _groups(pairs):
        splits[_split(group, pairs, seed, test_fraction, valid_fraction)].extend(pairs[i] for i in sorted(group))
    for v in splits.values():
        v.sort(key=lambda p: (p.get("source", ""), p["en"], p["he"]))
    rng = random.Random(seed)
    train, valid = _conversations(splits["train"], rng), _conversations(splits["valid"], rng)
    test = [{"en": p["en"], "he": p["he"], "source": p.get("source", "")} for p in splits["test"]]
    for name, rows in zip(FILES, (train, valid, test), strict=True):
        write_jsonl(data_dir / name, rows)
    manifest = {
        "settings": settings,
        "files": {
            FILES[0]: {"conversations": len(train), "pairs": len(splits["train"])},
            FILES[1]: {"conversations": len(valid), "pairs": len(splits["valid"])},
            FILES[2]: {"pairs": len(test)},
        },
        "prompt": INSTRUCTIONS[0],
        "license_note": "UI strings: jupyterlab-language-pack-he-il, BSD-3-Clause",
    }
    write_manifest(manifest_path, manifest)
    return {**manifest, "skipped": False}
