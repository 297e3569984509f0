"""JSON from files a user hands over, with every way they can be wrong turned into one line.

``json.loads`` raises more than ``JSONDecodeError`` on hostile input: ``ValueError`` for integers
over Python's 4,300-digit limit, ``RecursionError`` for deep nesting (100k ``[``), and the file
itself may be a directory, unreadable, or not UTF-8. Strings may hold lone surrogates
(``"\\ud800"``), which are valid JSON but cannot be written back as UTF-8, so they are refused
here, where the file is named, rather than later, where a write fails far from the cause.
Torch-free and stdlib-only, so every layer may use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hebtron.errors import UserError

MAX_DEPTH = 200  # deeper than any config, state or manifest hebtron reads; far from the C stack


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0][:300]


def plain_problem(value: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``value`` is not plain data (nested over ``max_depth`` deep, or a string holding a lone
    surrogate), as ``"<path>: <what>"``; None when it is plain."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            if (problem := _text_problem(node, path)) is not None:
                return problem
        elif isinstance(node, dict | list):
            if depth >= max_depth:
                return f"{path or 'top level'}: nested more than {max_depth} levels deep"
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, item in items:
                if isinstance(key, str) and (problem := _text_problem(key, path)) is not None:
                    return problem
                stack.append((item, _child(path, key, isinstance(node, list)), depth + 1))
    return None


def check_plain(value: Any, where: str, max_depth: int = MAX_DEPTH, error: type[UserError] = UserError) -> Any:
    """``value`` if it is nested at most ``max_depth`` deep and its strings are valid Unicode
    (no lone surrogates); else a one-line UserError naming ``where`` and the offending path."""
    problem = plain_problem(value, max_depth)
    if problem is not None:
        raise error(f"{where}: {problem}")
    return value


class BadJSONLine(ValueError):
    """One line of a JSONL input that is not usable JSON; the message is the reason alone (the
    caller adds ``FILE:LINE``)."""


def utf8_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(where, text)`` for each line of ``path`` (``where`` is ``FILE:LINE``), read as bytes so
    that a bad byte stops the read with one line naming its line and column, not the whole file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                yield where, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{where}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                                f"{err.start + 1})") from None


def loads_line(line: str) -> Any:
    """``json.loads`` for one line of a JSONL input, every failure a :class:`BadJSONLine`: broken
    JSON, nesting deep enough to exhaust the stack, integers over 4,300 digits, lone surrogates."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadJSONLine(f"broken JSON: {err.msg.removesuffix(' at')} (column {err.colno})") from None
    except RecursionError:
        raise BadJSONLine("broken JSON: nested too deeply") from None
    except ValueError as err:  # e.g. an integer beyond the 4,300-digit conversion limit
        raise BadJSONLine(f"unreadable JSON ({_first_line(str(err))})") from None
    problem = plain_problem(value)
    if problem is not None:
        raise BadJSONLine(problem.removeprefix("top level: "))
    return value


def object_line(where: str, line: str, field: str) -> dict[str, Any]:
    """One JSONL line that should be an object with ``field``: the object, or a one-line
    :class:`UserError` naming ``where`` (``FILE:LINE``)."""
    try:
        rec = loads_line(line)
    except BadJSONLine as err:
        raise UserError(f"{where}: {err}") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with a {field!r} field, got {type(rec).__name__}")
    return rec


def _child(path: str, key: Any, in_list: bool) -> str:
    if in_list:
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _text_problem(text: str, path: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        at = f"{path}: " if path else ""
        return f"{at}string holds a lone surrogate ({text[err.start]!r}); expected valid Unicode"
    return None


def parse_json(text: str | bytes, where: str, error: type[UserError] = UserError) -> Any:
    """JSON text -> Python data; any problem is a one-line UserError naming ``where``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (bad byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer beyond the 4,300-digit conversion limit
        raise error(f"{where}: unreadable JSON ({_first_line(str(err))})") from None
    return check_plain(value, where, error=error)


def read_user_text(path: str | os.PathLike[str], what: str, where: str | None = None,
                   error: type[UserError] = UserError, missing: str | None = None) -> str:
    """The UTF-8 text of a file a user named: missing, a directory, unreadable or not UTF-8 is one
    line naming ``where`` (default: the path) and ``what`` was expected (``missing``: the words
    for a file that does not exist)."""
    path = Path(path)
    where = str(path) if where is None else where
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{where}: {missing or f'no such file (expected a {what})'}") from None
    except IsADirectoryError:
        raise error(f"{where}: is a directory, expected a {what}") from None
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (bad byte at offset {err.start})") from None
    except (OSError, ValueError) as err:  # ValueError: a path with a NUL byte
        raise error(_first_line(f"{where}: cannot read ({getattr(err, 'strerror', None) or err})")) from None


def read_json(path: str | os.PathLike[str], what: str = "JSON file", error: type[UserError] = UserError) -> Any:
    """The JSON in file ``path``; missing, a directory, unreadable or malformed: one line."""
    return parse_json(read_user_text(path, what, error=error, missing=f"not found (expected a {what})"), str(path), error)


def read_json_object(path: str | os.PathLike[str], what: str = "JSON file",
                     error: type[UserError] = UserError) -> dict[str, Any]:
    """:func:`read_json` that must give a JSON object."""
    value = read_json(path, what, error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
