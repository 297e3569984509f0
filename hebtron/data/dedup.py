"""``hebtron data dedup``: exact and near-duplicate removal, streamed, first occurrence kept.

Each document, in input order:
1. exact: its :func:`~hebtron.data.hebrew_text.normalize_for_hash` key (niqqud, cantillation,
   case, punctuation and whitespace folded; final letters kept) is hashed (BLAKE2b, 128 bits);
   a hash seen before makes it an exact duplicate of the document that first had it;
2. near: a MinHash of its word (or character) n-gram shingles is looked up in an LSH index of
   the kept documents (datasketch). The bands are chosen so that a pair at the Jaccard threshold
   becomes a candidate with probability >= 1 - 1e-4 (:func:`lsh_bands`), and every candidate is
   then checked with the *exact* Jaccard of the two shingle sets, so the decision is not left to
   MinHash's estimation noise: a duplicate is a document whose shingles overlap a kept one's at
   >= the threshold;
3. otherwise it is kept and enters both indexes.

Memory is bounded by the number of kept documents (a 16-byte hash and the LSH band keys each),
never by their text: kept texts go to a SQLite file in a scratch directory, read back only to
verify candidates and to quote examples. The run is deterministic (fixed MinHash seed, input
order decides who is kept). Every input line ends up in exactly one place: ``kept.jsonl`` (the
records as read), ``duplicates.jsonl`` (each with the ``FILE:LINE`` of the kept document it
duplicates), or the report's blank/empty counts; the report checks that the counts add up.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from hebtron.data.hebrew_text import normalize_for_hash
from hebtron.data.records import Entry, iter_entries, record_line
from hebtron.errors import UserError

PREVIEW_CHARS = 160
MISS_PROBABILITY = 1e-4  # chance that a pair exactly at the threshold is never compared


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.8  # Jaccard of shingle sets at or above which a document is a near duplicate
    shingle: Literal["word", "char"] = "word"
    ngram: int = 3
    num_perm: int = 128
    seed: int = 1
    near: bool = True
    skip_empty: bool = False
    examples: int = 10  # duplicate clusters quoted in the report


def lsh_bands(threshold: float, num_perm: int, miss: float = MISS_PROBABILITY) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest false candidates) such that a pair at
    Jaccard ``threshold`` shares at least one band with probability >= 1 - ``miss``."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if (1 - threshold**rows) ** bands <= miss:
            return bands, rows
    raise UserError(f"--num-perm {num_perm} is too small for --threshold {threshold}; use more permutations")


def shingles(normalized: str, kind: str, n: int) -> set[str]:
    """Word or character n-grams of a normalized text; a text shorter than n is one shingle."""
    if kind == "word":
        tokens = normalized.split(" ")
        if len(tokens) <= n:
            return {normalized}
        return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}
    if len(normalized) <= n:
        return {normalized}
    return {normalized[i:i + n] for i in range(len(normalized) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class SourceBytes:
    documents: int = 0
    bytes_in: int = 0
    bytes_kept: int = 0
    exact_bytes: int = 0
    near_bytes: int = 0


@dataclass
class DedupStats:
    input_lines: int = 0
    blank_lines: int = 0
    empty_documents: int = 0
    documents: int = 0
    kept: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    candidates_checked: int = 0
    per_source: dict[str, SourceBytes] = field(default_factory=dict)

    def accounted(self) -> bool:
        return (self.input_lines == self.blank_lines + self.empty_documents + self.documents
                and self.documents == self.kept + self.exact_duplicates + self.near_duplicates)


class _KeptStore:
    """Kept documents on disk (SQLite in a scratch directory): where, source, normalized text."""

    def __init__(self, directory: Path):
        self.db = sqlite3.connect(directory / "kept.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE kept (id INTEGER PRIMARY KEY, location TEXT, source TEXT, norm TEXT, preview TEXT)")
        self.db.execute("CREATE TABLE dups (kept INTEGER, location TEXT, kind TEXT, jaccard REAL, preview TEXT)")
        self.db.execute("BEGIN")

    def add(self, doc_id: int, entry: Entry, norm: str) -> None:
        self.db.execute("INSERT INTO kept VALUES (?, ?, ?, ?, ?)",
                        (doc_id, entry.where, entry.source, norm, entry.text[:PREVIEW_CHARS]))

    def add_dup(self, kept: int, entry: Entry, kind: str, score: float) -> None:
        self.db.execute("INSERT INTO dups VALUES (?, ?, ?, ?, ?)",
                        (kept, entry.where, kind, score, entry.text[:PREVIEW_CHARS]))

    def norm(self, doc_id: int) -> str:
        return self.db.execute("SELECT norm FROM kept WHERE id = ?", (doc_id,)).fetchone()[0]

    def where(self, doc_id: int) -> str:
        return self.db.execute("SELECT location FROM kept WHERE id = ?", (doc_id,)).fetchone()[0]

    def clusters(self, limit: int, per_cluster: int = 3) -> list[dict[str, Any]]:
        """The largest duplicate clusters (kept document + its duplicates), ties by input order."""
        rows = self.db.execute(
            "SELECT kept, COUNT(*) AS n FROM dups GROUP BY kept ORDER BY n DESC, kept LIMIT ?", (limit,)).fetchall()
        out = []
        for kept, n in rows:
            location, source, preview = self.db.execute(
                "SELECT location, source, preview FROM kept WHERE id = ?", (kept,)).fetchone()
            dups = self.db.execute("SELECT location, kind, jaccard, preview FROM dups WHERE kept = ? ORDER BY rowid "
                                   "LIMIT ?", (kept, per_cluster)).fetchall()
            out.append({"kept": location, "source": source, "duplicates": n, "kept_preview": preview,
                        "examples": [{"where": w, "kind": k, "jaccard": round(j, 4), "preview": p} for w, k, j, p in dups]})
        return out

    def close(self) -> None:
        self.db.close()


class Deduplicator:
    """The two indexes and the decision for one document at a time (see the module docstring)."""

    def __init__(self, config: DedupConfig, scratch: Path):
        from datasketch import MinHash, MinHashLSH

        self.config = config
        self.exact: dict[bytes, int] = {}
        self.store = _KeptStore(scratch)
        self.bands = lsh_bands(config.threshold, config.num_perm)
        self.lsh = MinHashLSH(num_perm=config.num_perm, params=self.bands) if config.near else None
        # xxh32 (xxhash comes with datasets): same role as datasketch's default sha1, 4x cheaper
        import xxhash

        self._empty = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=xxhash.xxh32_intdigest)
        self.stats = DedupStats()
        self._next_id = 0

    def decide(self, entry: Entry) -> tuple[str, int | None, float]:
        """("kept" | "exact" | "near", id of the kept original, Jaccard) for one document."""
        from datasketch import LeanMinHash

        norm = normalize_for_hash(entry.text)
        key = hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()
        if (original := self.exact.get(key)) is not None:
            return "exact", original, 1.0
        mh = None
        if self.lsh is not None:
            grams = shingles(norm, self.config.shingle, self.config.ngram)
            mh = self._empty.copy()  # shares the permutations: no per-document setup
            mh.update_batch([g.encode("utf-8") for g in grams])
            best, best_j = None, -1.0
            for candidate in sorted(self.lsh.query(mh)):
                self.stats.candidates_checked += 1
                j = jaccard(grams, shingles(self.store.norm(candidate), self.config.shingle, self.config.ngram))
                if j >= self.config.threshold and j > best_j:
                    best, best_j = candidate, j
            if best is not None:
                return "near", best, best_j
        doc_id = self._next_id
        self._next_id += 1
        self.exact[key] = doc_id
        self.store.add(doc_id, entry, norm)
        if self.lsh is not None and mh is not None:
            self.lsh.insert(doc_id, LeanMinHash(mh), check_duplication=False)
        return "kept", doc_id, 1.0


def dedup_corpus(inputs: Sequence[str | Path], out: Path, config: DedupConfig = DedupConfig()) -> dict[str, Any]:
    """Deduplicate ``inputs`` into ``out/`` (kept.jsonl, duplicates.jsonl, report.json,
    report.md); returns the report. Outputs appear only when the whole run succeeded."""
    if not 0 < config.threshold <= 1:
        raise UserError(f"--threshold: expected a Jaccard similarity in (0, 1], got {config.threshold}")
    if config.ngram < 1:
        raise UserError(f"--ngram: expected a positive n-gram length, got {config.ngram}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = {name: out / f"{name}.tmp" for name in ("kept.jsonl", "duplicates.jsonl")}
    with tempfile.TemporaryDirectory(prefix="hebtron-dedup-") as scratch:
        dd = Deduplicator(config, Path(scratch))
        stats = dd.stats
        try:
            with open(files["kept.jsonl"], "w", encoding="utf-8") as kept_f, \
                 open(files["duplicates.jsonl"], "w", encoding="utf-8") as dup_f:
                for entry in iter_entries(inputs, skip_empty=config.skip_empty):
                    stats.input_lines += 1
                    if entry.kind == "blank":
                        stats.blank_lines += 1
                        continue
                    if entry.kind == "empty":
                        stats.empty_documents += 1
                        dup_f.write(json.dumps({"where": entry.where, "source": entry.source, "kind": "empty"},
                                               ensure_ascii=False) + "\n")
                        continue
                    stats.documents += 1
                    src = stats.per_source.setdefault(entry.source, SourceBytes())
                    src.documents += 1
                    src.bytes_in += entry.nbytes
                    kind, original, score = dd.decide(entry)
                    if kind == "kept":
                        stats.kept += 1
                        src.bytes_kept += entry.nbytes
                        kept_f.write(record_line(entry) + "\n")
                        continue
                    assert original is not None
                    if kind == "exact":
                        stats.exact_duplicates += 1
                        src.exact_bytes += entry.nbytes
                    else:
                        stats.near_duplicates += 1
                        src.near_bytes += entry.nbytes
                    dd.store.add_dup(original, entry, kind, score)
                    dup_f.write(json.dumps({"where": entry.where, "source": entry.source, "kind": kind,
                                            "duplicate_of": dd.store.where(original), "jaccard": round(score, 4)},
                                           ensure_ascii=False) + "\n")
            if stats.documents == 0:
                raise UserError(f"{', '.join(map(str, inputs))}: no documents (empty corpus)")
            report = _report(inputs, config, dd, time.perf_counter() - t0)
        except BaseException:
            for tmp in files.values():
                tmp.unlink(missing_ok=True)
            raise
        finally:
            dd.store.close()
    for name, tmp in files.items():
        os.replace(tmp, out / name)
    _write_atomic(out / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    _write_atomic(out / "report.md", report_markdown(report))
    return report


def _report(inputs: Sequence[str | Path], config: DedupConfig, dd: Deduplicator, seconds: float) -> dict[str, Any]:
    stats = dd.stats
    if not stats.accounted():
        raise AssertionError(f"dedup lost track of input lines: {stats}")
    return {
        "inputs": [str(p) for p in inputs],
        "config": asdict(config),
        "lsh": {"bands": dd.bands[0], "rows": dd.bands[1]},
        "input_lines": stats.input_lines,
        "blank_lines": stats.blank_lines,
        "empty_documents": stats.empty_documents,
        "documents": stats.documents,
        "kept": stats.kept,
        "exact_duplicates": stats.exact_duplicates,
        "near_duplicates": stats.near_duplicates,
        "candidates_checked": stats.candidates_checked,
        "accounted": stats.accounted(),
        "per_source": {name: asdict(s) | {"bytes_saved": s.exact_bytes + s.near_bytes}
                       for name, s in sorted(stats.per_source.items())},
        "largest_clusters": dd.store.clusters(config.examples),
        "seconds": round(seconds, 2),
    }


def _md(text: str) -> str:
    """One markdown table cell: HTML-escaped, no pipes or line breaks."""
    import html

    return html.escape(" ".join(str(text).split())).replace("|", "&#124;")


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Deduplication report", "",
        f"Inputs: {', '.join(_md(p) for p in report['inputs'])}", "",
        f"- input lines: {report['input_lines']:,} = {report['documents']:,} documents + "
        f"{report['blank_lines']:,} blank lines + {report['empty_documents']:,} empty documents",
        f"- kept: {report['kept']:,}; exact duplicates: {report['exact_duplicates']:,}; "
        f"near duplicates (Jaccard >= {report['config']['threshold']} on {report['config']['shingle']} "
        f"{report['config']['ngram']}-grams): {report['near_duplicates']:,}",
        f"- LSH: {report['lsh']['bands']} bands x {report['lsh']['rows']} rows; "
        f"{report['candidates_checked']:,} candidates checked by exact Jaccard", "",
        "| source | documents | bytes in | bytes kept | saved (exact) | saved (near) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["per_source"].items():
        lines.append(f"| {_md(name)} | {s['documents']:,} | {s['bytes_in']:,} | {s['bytes_kept']:,} | "
                     f"{s['exact_bytes']:,} | {s['near_bytes']:,} |")
    lines += ["", "## Largest duplicate clusters", ""]
    for c in report["largest_clusters"]:
        lines.append(f"- **{_md(c['kept'])}** ({_md(c['source'])}), {c['duplicates']} duplicates: "
                     f"<span dir=\"rtl\">{_md(c['kept_preview'])}</span>")
        for ex in c["examples"]:
            lines.append(f"  - {ex['kind']} (J={ex['jaccard']}) {_md(ex['where'])}: "
                         f"<span dir=\"rtl\">{_md(ex['preview'])}</span>")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def count_by_kind(duplicates: Path) -> Counter[str]:
    """Duplicates per kind in a ``duplicates.jsonl`` (for reports and tests)."""
    with open(duplicates, encoding="utf-8") as f:
        return Counter(json.loads(line)["kind"] for line in f)
