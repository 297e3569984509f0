"""Read documents (``text`` + optional ``lang``) from JSONL, Parquet or a saved HF dataset.

Each input is checked as it streams, and the first bad record stops the run with one line
``FILE:LINE: what is wrong`` (a :class:`UserError`): bytes that are not UTF-8, a line that
is not a JSON object, a missing or non-string ``text``, an empty document. Empty documents
are an error unless the caller asks to skip (and count) them, because a silently shrinking
corpus hides broken upstream exports.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hebtron.jsonio import object_line, utf8_lines
from hebtron.lang import lang_id
from hebtron.errors import UserError

SUPPORTED = ".jsonl (one JSON object per line), .parquet, or a directory written by datasets' save_to_disk"


@dataclass
class ReadStats:
    """What reading skipped or could not place, reported back to the user."""

    documents: int = 0
    skipped_empty: int = 0
    unknown_lang: dict[str, int] = field(default_factory=dict)


def _check_record(text: Any, lang: Any, where: str, skip_empty: bool, stats: ReadStats,
                  default_lang: str | None) -> tuple[str, int] | None:
    if text is None:
        raise UserError(f"{where}: field 'text' is missing")
    if not isinstance(text, str):
        raise UserError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        if skip_empty:
            stats.skipped_empty += 1
            return None
        raise UserError(f"{where}: field 'text' is empty (pass --skip-empty to drop empty documents)")
    if lang is None:
        lang = default_lang
    elif not isinstance(lang, str):
        raise UserError(f"{where}: field 'lang' must be a language code string like \"he\", got {type(lang).__name__}")
    lid = lang_id(lang)
    if lid < 0 and lang:
        stats.unknown_lang[lang] = stats.unknown_lang.get(lang, 0) + 1
    stats.documents += 1
    return text, lid


def _iter_jsonl(path: Path) -> Iterator[tuple[Any, Any, str]]:
    for where, line in utf8_lines(path):
        if not line.strip():
            continue  # blank lines (a trailing newline, say) are not documents
        rec = object_line(where, line, "text")
        yield rec.get("text"), rec.get("lang"), where


def _iter_parquet(path: Path) -> Iterator[tuple[Any, Any, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(names)})")
    columns = ["text"] + (["lang"] if "lang" in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        texts = batch.column("text").to_pylist()
        langs = batch.column("lang").to_pylist() if "lang" in columns else [None] * len(texts)
        for text, lang in zip(texts, langs, strict=True):
            row += 1
            yield text, lang, f"{path}:row {row}"


def _iter_hf_dir(path: Path) -> Iterator[tuple[Any, Any, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(f"{path}/{s}" for s in ds)
        raise UserError(f"{path}: holds several splits; pass one of them: {splits}")
    if "text" not in ds.column_names:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(ds.column_names)})")
    columns = ["text"] + (["lang"] if "lang" in ds.column_names else [])
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=4096):
        langs = batch.get("lang") or [None] * len(batch["text"])
        for text, lang in zip(batch["text"], langs, strict=True):
            row += 1
            yield text, lang, f"{path}:row {row}"


def iter_documents(
    path: str | Path, stats: ReadStats, skip_empty: bool = False, default_lang: str | None = None
) -> Iterator[tuple[str, int]]:
    """Yield ``(text, lang_id)`` for each document of one input, validating as it goes."""
    path = Path(path)
    if path.is_dir():
        records = _iter_hf_dir(path)
    elif not path.exists():
        raise UserError(f"{path}: no such file or directory")
    elif path.suffix == ".jsonl":
        records = _iter_jsonl(path)
    elif path.suffix == ".parquet":
        records = _iter_parquet(path)
    else:
        raise UserError(f"{path}: unsupported input; expected {SUPPORTED}")
    for text, lang, where in records:
        doc = _check_record(text, lang, where, skip_empty, stats, default_lang)
        if doc is not None:
            yield doc
