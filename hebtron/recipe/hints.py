"""Text for one-line error messages: "did you mean" hints and short previews of bad values."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``did you mean 'lr'?`` for a near miss, else the list of valid choices."""
    options = sorted(choices)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "expected one of: " + ", ".join(options) if options else "no keys are allowed here"


def one_line(text: str) -> str:
    """Squash whitespace runs (newlines included) so a message stays on one line."""
    return " ".join(text.split())


def preview(value: Any, limit: int = 60) -> str:
    """``repr`` of a value, cut to ``limit`` characters (repr already escapes newlines)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<recursive {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind(value: Any) -> str:
    """A YAML-ish name for a value's type: mapping, list, string, number, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
