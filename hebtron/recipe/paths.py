"""Where a relative path in a recipe points, and whether the thing it names is there.

Rule: ``~`` is expanded and absolute paths are kept. A relative path that starts with ``./`` or
``../`` is relative to the directory of the recipe file that wrote it (a parent's paths to the
parent's directory). Any other relative path is looked up first there and then in the current
working directory; if it exists in neither (an output directory, data the demo has not built
yet) it is taken relative to the cwd. So ``runs/demo/data/he_train`` in ``recipes/demo/cpt.yaml``
means ``./runs/...`` when run from the repository root, and a ``data.jsonl`` lying next to the
recipe is found from anywhere. Paths in command-line overrides are relative to the cwd. Results
are absolute, so later stages ignore the cwd.

The loader marks each path string with the directory it is relative to (:class:`Anchored`) and
passes ``{"base_dir": ..., "check_paths": ...}`` as pydantic validation context; with neither
(plain ``Recipe.model_validate(d)``) paths are taken relative to the cwd, unchecked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationInfo

from hebtron.recipe.walk import UNKNOWN, field_type, strip

Exists = Callable[[Path], bool]
Loc = tuple[str | int, ...]


class Anchored(str):
    """A path string that remembers the directory it is relative to (``None``: the cwd)."""

    base_dir: Path | None

    def __new__(cls, text: str, base_dir: Path | None) -> Anchored:
        obj = super().__new__(cls, text)
        obj.base_dir = base_dir
        return obj


def anchor_paths(node: Any, tp: Any, anchor: Callable[[Loc], Path | None], loc: Loc = ()) -> Any:
    """A copy of ``node`` with every string the schema types as a path made :class:`Anchored`."""
    if tp is None or tp is UNKNOWN:
        return node
    if strip(tp) is Path and isinstance(node, str):
        return Anchored(node, anchor(loc))
    if isinstance(node, dict):
        return {k: anchor_paths(v, field_type(tp, k), anchor, (*loc, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [anchor_paths(v, field_type(tp, i), anchor, (*loc, i)) for i, v in enumerate(node)]
    return node


class MissingPath(ValueError):
    """An input path that does not exist; reported after other problems, which it often
    merely follows from (data not prepared yet)."""


def _context(info: ValidationInfo | None) -> tuple[Path | None, bool]:
    ctx = info.context if info is not None and isinstance(info.context, dict) else {}
    base = ctx.get("base_dir")
    return (Path(base) if base is not None else None), bool(ctx.get("check_paths", False))


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(path))


def candidates(raw: str, base_dir: Path | None) -> list[Path]:
    """The places ``raw`` may point to, in lookup order; the last one is the fallback."""
    raw = os.path.expanduser(raw)
    if os.path.isabs(raw):
        return [_absolute(raw)]
    in_cwd = _absolute(raw)
    if base_dir is None:
        return [in_cwd]
    beside = _absolute(base_dir / raw)
    if raw in (".", "..") or raw.startswith(("./", "../")):
        return [beside]
    return [beside] if beside == in_cwd else [beside, in_cwd]


def safely(exists: Exists, path: Path) -> bool:
    """``exists(path)``, with unusable paths (too long, bad bytes) counting as absent."""
    try:
        return exists(path)
    except (OSError, ValueError):
        return False


def resolve(raw: str, base_dir: Path | None, exists: Exists = Path.exists) -> Path:
    """The first candidate that ``exists``, else the fallback."""
    options = candidates(raw, base_dir)
    return next((p for p in options if safely(exists, p)), options[-1])


def where_looked(raw: str, base_dir: Path | None) -> str:
    return "looked for " + " and ".join(str(p) for p in candidates(raw, base_dir))


def indexed_exists(prefix: Path) -> bool:
    """A prepared indexed dataset is a ``.bin`` + ``.idx`` pair sharing a prefix."""
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def resolve_field(value: Any, info: ValidationInfo, what: str, exists: Exists | None) -> Any:
    """Resolve a raw path value; if ``exists`` is given and paths are checked, require it.

    Non-strings are passed through unchanged so pydantic reports the type error itself.
    """
    if isinstance(value, Path):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value
    if not value.strip():
        raise ValueError(f"expected a non-empty {what}")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    base, check_paths = _context(info)
    if isinstance(value, Anchored):
        base = value.base_dir
    resolved = resolve(value, base, exists or Path.exists)
    if exists is not None and check_paths and not safely(exists, resolved):
        raise MissingPath(f"{what} {value!r} not found ({where_looked(value, base)})")
    return resolved


def _input(value: Any, info: ValidationInfo) -> Any:
    return resolve_field(value, info, "path", Path.exists)


def _output(value: Any, info: ValidationInfo) -> Any:
    resolved = resolve_field(value, info, "path", None)
    if isinstance(resolved, Path):
        blocker = file_in_the_way(resolved)
        if blocker is not None:
            what = "is a file" if blocker == resolved else f"lies under the file {blocker}"
            raise ValueError(f"output directory {str(resolved)!r} {what}; expected a directory (or a new path)")
    return resolved


def file_in_the_way(directory: Path) -> Path | None:
    """The existing non-directory at ``directory`` or above it, which makes it impossible to
    create: found when the recipe is read, not after hours of training at the first save."""
    for path in (directory, *directory.parents):
        if safely(Path.is_dir, path):
            return None
        if safely(Path.exists, path) or safely(Path.is_symlink, path):
            return path
    return None


# A file or directory the run reads (tokenizer, checkpoint): must exist when paths are checked.
InputPath = Annotated[Path, BeforeValidator(_input)]
# A directory the run writes (run dir, checkpoints): resolved, never required to exist.
OutputPath = Annotated[Path, BeforeValidator(_output)]
