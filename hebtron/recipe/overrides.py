"""Command-line overrides ``key.sub=value``, applied after inheritance.

The value is YAML (``train.lr=3e-4``, ``data.sources=[{name: a, path: x}]``); ``key=null``
removes the key so its default applies. A numeric part indexes a list
(``data.sources.0.weight=2``). The key is checked against the schema before anything is set, so
a typo fails with a hint even where the recipe relies on a default. Checking the value is left
to the schema, with the error pointing back at the override.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_origin

from pydantic import BaseModel

from hebtron.errors import UserError
from hebtron.recipe.hints import did_you_mean, kind, preview
from hebtron.recipe.layers import Layers, Loc
from hebtron.recipe.walk import UNKNOWN, field_type, is_model, strip
from hebtron.recipe.yamlio import fresh_tree, parse_yaml


def _dotted(parts: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in parts)


def parse_override(text: Any) -> tuple[list[str], Any, str]:
    """``"a.b=v"`` -> (``["a", "b"]``, parsed ``v``, label for messages)."""
    if not isinstance(text, str):
        raise UserError(f"override {text!r}: expected a string key=value")
    label = f"override {preview(text, 100)}"
    if "=" not in text:
        raise UserError(f"{label}: expected key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p.strip() or p != p.strip() for p in parts):
        raise UserError(f"{label}: bad key {key!r}; expected dotted names like train.lr")
    value = fresh_tree(parse_yaml(raw, label), label)
    return parts, value, label


def _schema_loc(root: type[BaseModel], parts: list[str], label: str) -> Loc:
    """Check ``parts`` against the schema; list indices become ints."""
    loc: list[str | int] = []
    tp: Any = root
    for part in parts:
        here = strip(tp) if tp is not UNKNOWN else UNKNOWN
        step: str | int = part
        if here is not UNKNOWN and get_origin(here) is list:
            if not part.isdigit():
                raise UserError(f"{label}: {_dotted(loc)} is a list; index it like {_dotted(loc)}.0")
            step = int(part)
        nxt = field_type(here, step) if here is not UNKNOWN else UNKNOWN
        if nxt is None:
            where = _dotted(loc) or "the recipe"
            if is_model(here):
                raise UserError(f"{label}: unknown key {part!r} in {where}; {did_you_mean(part, here.model_fields)}")
            raise UserError(f"{label}: {where} is a value, it has no key {part!r}")
        loc.append(step)
        tp = nxt
    return tuple(loc)


def _set(tree: dict[str, Any], loc: Loc, value: Any, label: str) -> None:
    node: Any = tree
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        here = _dotted(loc[:i]) or "the recipe"
        if isinstance(node, list):
            if isinstance(part, str) and part.isdigit():  # free-form part of the tree (model.init)
                part = int(part)
            if not isinstance(part, int):
                raise UserError(f"{label}: {here} is a list, not a section")
            if not 0 <= part < len(node):
                raise UserError(f"{label}: {here} has {len(node)} items, no index {part}")
            if last and value is None:
                raise UserError(f"{label}: cannot remove one list item; set the whole list {here}=[...]")
        elif isinstance(node, dict):
            part = str(part)
            if last and value is None:
                node.pop(part, None)
                return
            if not last and node.get(part) is None:
                if isinstance(loc[i + 1], int):
                    raise UserError(f"{label}: {_dotted(loc[: i + 1])} is not set; set the whole list")
                node[part] = {}
        else:
            raise UserError(f"{label}: {here} is {kind(node)}, not a section")
        if last:
            node[part] = value
        else:
            node = node[part]


def apply_overrides(layers: Layers, overrides: Sequence[str], root: type[BaseModel]) -> None:
    """Apply each override in order to ``layers.tree`` (later ones win)."""
    if isinstance(overrides, str):  # a lone string would be split into characters
        overrides = [overrides]
    for text in overrides:
        parts, value, label = parse_override(text)
        loc = _schema_loc(root, parts, label)
        _set(layers.tree, loc, value, label)
        if value is None:
            layers.forget(loc)
        else:
            layers.record(value, label, loc)
