"""Walk the recipe schema by key path: which keys a section allows, what type sits at a path.

The walk reads the pydantic classes themselves, so a section added later gets unknown-key hints
and override checks for free.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

# A schema position that has no further structure we know of (free-form dict value, scalar).
UNKNOWN = object()


def strip(tp: Any) -> Any:
    """Peel ``Annotated`` and ``X | None`` off a type, keeping the structured member of a union."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [m for m in get_args(tp) if m is not type(None)]
            structured = [m for m in members if is_model(strip(m)) or get_origin(strip(m)) in (list, dict)]
            tp = (structured or members)[0]
        else:
            return tp


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def field_type(tp: Any, part: str | int) -> Any:
    """The type found at key or index ``part`` inside ``tp``; ``None`` if ``part`` is not allowed
    there, ``UNKNOWN`` past the end of what the schema describes."""
    tp = strip(tp)
    if tp is Any or tp is UNKNOWN:
        return UNKNOWN
    if is_model(tp):
        fields = tp.model_fields
        return fields[part].annotation if isinstance(part, str) and part in fields else None
    origin = get_origin(tp)
    if origin is list:
        return get_args(tp)[0] if isinstance(part, int) else None
    if origin is dict:
        return get_args(tp)[1] if isinstance(part, str) else None
    return None


def model_keys(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[str] | None:
    """The field names of the section at ``loc`` (``()`` is the root), if it is a section."""
    tp: Any = root
    for part in loc:
        tp = field_type(tp, part)
        if tp is None or tp is UNKNOWN:
            return None
    tp = strip(tp)
    return list(tp.model_fields) if is_model(tp) else None
