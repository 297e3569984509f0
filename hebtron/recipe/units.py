"""Token counts written the way people say them: ``250B``, ``10M``, ``2k``, ``1.5e9``.

Budgets in recipes span nine orders of magnitude; writing ``250000000000`` invites a wrong
zero. These parsers are pydantic ``BeforeValidator`` functions, so a bad value becomes an
ordinary field error (``ValueError``) with the recipe field path attached by the loader.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_SUFFIX: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_TOKEN_RE = re.compile(r"^([0-9][0-9_,]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?|\.[0-9]+)\s*([kmbgt]?)$", re.IGNORECASE)
# Far above any real budget, far below a number whose int() would eat memory.
_MAX_TOKENS = 10**18
_TOKEN_PATTERN = r"^\s*[0-9][0-9_,.eE+-]*\s*[kKmMbBgGtT]?\s*$"


def parse_token_count(value: Any) -> int:
    """An int >= 0 from an int, an integral float, or a string like ``"250B"`` / ``"2.5M"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a token count like 1000000 or '1M', got {value!r}")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite token count, got {value!r}")
        number = Decimal(repr(value))
    elif isinstance(value, str):
        match = _TOKEN_RE.match(value.strip())
        if not match:
            raise ValueError(f"expected a token count like 1000000, '2k', '10M' or '250B', got {value!r}")
        digits, suffix = match.groups()
        try:
            number = Decimal(digits.replace("_", "").replace(",", "")) * _SUFFIX[suffix.lower()]
        except InvalidOperation:
            raise ValueError(f"expected a token count like '10M', got {value!r}") from None
    else:
        raise ValueError(f"expected a token count like 1000000 or '10M', got {type(value).__name__}")
    if number < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    if number > _MAX_TOKENS:
        raise ValueError(f"must be at most 1e18 tokens, got {value!r}")
    if number != number.to_integral_value():
        raise ValueError(f"expected a whole number of tokens, got {value!r}")
    return int(number)


def parse_decay(value: Any) -> float | int:
    """A WSD decay length: a float in (0, 1] is a fraction of the run, anything else tokens."""
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected a fraction of the run in (0, 1] or a token count like '50B', got {value!r}")
    return parse_token_count(value)


_TOKEN_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _TOKEN_PATTERN}],
    "description": "tokens: an integer or a string with a k/M/B/T suffix, e.g. '250B'",
}
_DECAY_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": _TOKEN_PATTERN},
    ],
    "description": "a fraction of the run in (0, 1] (e.g. 0.2) or a token count (e.g. '50B')",
}

TokenCount = Annotated[int, BeforeValidator(parse_token_count), WithJsonSchema(_TOKEN_SCHEMA)]
DecayLength = Annotated[float | int, BeforeValidator(parse_decay), WithJsonSchema(_DECAY_SCHEMA)]


def format_tokens(n: int) -> str:
    """``12_500_000`` -> ``'12.5M'``, for messages."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:.4g}{suffix}"
    return str(n)


def parse_ramp(spec: str) -> list[tuple[int, int]]:
    """Megatron-style ``"0:768 250B:1536"`` -> [(tokens, global_batch), ...], sorted by tokens."""
    steps = []
    for item in spec.split():
        at, _, size = item.partition(":")
        if not size:
            raise ValueError(f"batch ramp item {item!r}: expected TOKENS:GLOBAL_BATCH, e.g. 250B:1536")
        try:
            count = int(size)
        except ValueError:
            raise ValueError(f"batch ramp item {item!r}: expected a whole number of sequences after ':', got {size[:40]!r}") from None
        if count <= 0:
            raise ValueError(f"batch ramp item {item!r}: the global batch must be > 0, got {count}")
        steps.append((parse_token_count(at), count))
    steps.sort()
    if not steps or steps[0][0] != 0:
        raise ValueError(f"batch ramp {spec!r}: the first item must start at 0 tokens")
    return steps
