"""Whole records from JSONL / Parquet / saved HF datasets, each with where it came from.

:mod:`hebtron.data.documents` yields ``(text, lang)`` for tokenizing; corpus tools (dedup,
cluster) need more: the record itself (to write it back unchanged), its ``FILE:LINE`` (to account
for every input line) and its source. Checks and messages are the same as there: bytes that are
not UTF-8, a line that is not a JSON object, a missing or non-string ``text`` stop the run with one
line naming the file and line. Blank JSONL lines come back as :class:`Entry` of kind ``blank``
and empty texts as ``empty`` (when the caller skips them), so a report can count every line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hebtron.data.documents import SUPPORTED
from hebtron.errors import UserError
from hebtron.jsonio import object_line, utf8_lines


@dataclass(frozen=True)
class Entry:
    """One input line or row: a document, a blank line, or a document with an empty text."""

    kind: Literal["doc", "blank", "empty"]
    where: str  # FILE:LINE or FILE:row N
    source: str  # the record's 'source' field when it is a string, else the input file's stem
    text: str = ""
    record: dict[str, Any] | None = None
    line: str | None = None  # the JSONL line as read (kept documents are written back unchanged)
    nbytes: int = 0  # UTF-8 bytes of the text


def _check_text(rec: dict[str, Any], where: str, field: str) -> str:
    text = rec.get(field)
    if text is None:
        raise UserError(f"{where}: field {field!r} is missing")
    if not isinstance(text, str):
        raise UserError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    return text


def _entry(rec: dict[str, Any], where: str, default_source: str, field: str, skip_empty: bool,
           line: str | None) -> Entry:
    text = _check_text(rec, where, field)
    source = rec.get("source") if isinstance(rec.get("source"), str) and rec.get("source") else default_source
    if not text.strip():
        if not skip_empty:
            raise UserError(f"{where}: field {field!r} is empty (pass --skip-empty to list empty documents and go on)")
        return Entry("empty", where, source, text, rec, line)
    return Entry("doc", where, source, text, rec, line, len(text.encode("utf-8")))


def _jsonl(path: Path, field: str, skip_empty: bool) -> Iterator[Entry]:
    for where, line in utf8_lines(path):
        if not line.strip():
            yield Entry("blank", where, path.stem)
            continue
        rec = object_line(where, line, field)
        yield _entry(rec, where, path.stem, field, skip_empty, line.rstrip("\r\n"))


def _parquet(path: Path, field: str, skip_empty: bool) -> Iterator[Entry]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no {field!r} column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield _entry(rec, f"{path}:row {row}", path.stem, field, skip_empty, None)


def _hf_dir(path: Path, field: str, skip_empty: bool) -> Iterator[Entry]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{path}: holds several splits; pass one of them: {', '.join(f'{path}/{s}' for s in ds)}")
    if field not in ds.column_names:
        raise UserError(f"{path}: no {field!r} column (columns: {', '.join(ds.column_names)})")
    for row, rec in enumerate(ds, 1):
        yield _entry(dict(rec), f"{path}:row {row}", path.name, field, skip_empty, None)


def iter_entries(paths: Sequence[str | Path], field: str = "text", skip_empty: bool = False) -> Iterator[Entry]:
    """Every line / row of every input, in order, checked as it streams."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from _hf_dir(path, field, skip_empty)
        elif not path.exists():
            raise UserError(f"{path}: no such file or directory")
        elif path.suffix == ".jsonl":
            yield from _jsonl(path, field, skip_empty)
        elif path.suffix == ".parquet":
            yield from _parquet(path, field, skip_empty)
        else:
            raise UserError(f"{path}: unsupported input; expected {SUPPORTED}")


def record_line(entry: Entry) -> str:
    """The entry as one JSONL line: the line as read for JSONL inputs, else the row as JSON."""
    if entry.line is not None:
        return entry.line
    return json.dumps(entry.record, ensure_ascii=False, default=str)
