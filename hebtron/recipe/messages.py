"""Turn a pydantic ``ValidationError`` into ``field.path: what was expected, got what``.

Pydantic's own text is written for developers ("Input should be greater than 0"); recipe users
get the field path they can search their YAML for, the rule, the offending value, and for an
unknown key the nearest valid one.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from hebtron.recipe.hints import did_you_mean, kind, preview
from hebtron.recipe.paths import MissingPath
from hebtron.recipe.schema import FieldProblem
from hebtron.recipe.walk import model_keys

Loc = tuple[str | int, ...]
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

_EXPECTED: dict[str, str] = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing_size": "an integer of sensible size",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "path_type": "a path",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
}
_COMPARE: dict[str, str] = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def dotted(loc: Loc) -> str:
    """``('data', 'sources', 0, 'path')`` -> ``data.sources[0].path``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _got(value: Any) -> str:
    """The offending value as the user wrote it in YAML (null, true) or its kind if large."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return preview(value) if not isinstance(value, dict | list) else kind(value)


def _explain(error: dict[str, Any], loc: Loc, root: type[BaseModel]) -> str:
    kind_, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind_ == "value_error" and isinstance(ctx.get("error"), Exception):
        return str(ctx["error"])
    if kind_ == "missing":
        return "required, but missing"
    if kind_ == "extra_forbidden":
        keys = model_keys(root, loc[:-1]) or []
        return f"unknown key; {did_you_mean(str(loc[-1]), keys)}"
    if kind_ in _COMPARE:
        bound = next(iter(ctx.values()), "?")
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {_COMPARE[kind_]} {bound}, got {_got(value)}"
    if kind_ == "literal_error":
        return f"expected {ctx.get('expected', 'one of the allowed values')}, got {_got(value)}"
    if kind_ == "too_short":
        return f"expected at least {ctx.get('min_length', 1)} item(s), got {ctx.get('actual_length', 0)}"
    if kind_ in _EXPECTED:
        return f"expected {_EXPECTED[kind_]}, got {_got(value)}"
    return f"{error.get('msg', 'invalid value')}, got {_got(value)}"


def explain(err: ValidationError, root: type[BaseModel]) -> tuple[Loc, str]:
    """The field path and the message of the most telling problem, plus a count of the others."""
    errors = err.errors(include_url=False)
    # A missing input file is often just data not prepared yet: show a typo first.
    first = min(errors, key=lambda e: isinstance((e.get("ctx") or {}).get("error"), MissingPath))
    loc: Loc = tuple(first["loc"])
    problem = (first.get("ctx") or {}).get("error")
    if isinstance(problem, FieldProblem):
        loc = (*loc, *problem.loc)
    message = _explain(first, loc, root)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return loc, message
