"""Recipe inheritance: ``extends: base.yaml`` chains, deep-merged child over parent.

Mappings merge key by key; anything else (lists included) is replaced whole, so a child never
gets half of its parent's source list. In a child (or a command-line override) ``key: null``
removes the key, so the schema default applies again. Every leaf remembers which file or
override set it, so an error points at the file the user must edit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hebtron.errors import UserError
from hebtron.recipe.hints import kind, preview
from hebtron.recipe.paths import safely
from hebtron.recipe.yamlio import read_yaml_file

Loc = tuple[str | int, ...]


@dataclass
class Layers:
    """The merged recipe tree plus, for each key path, the file or override that set it."""

    tree: dict[str, Any]
    top: str  # the recipe named on the command line, as the user wrote it
    origins: dict[Loc, str] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)  # file label -> its directory

    def base_dir(self, loc: Loc) -> Path | None:
        """The directory relative paths at ``loc`` are resolved against (None: the cwd)."""
        return self.dirs.get(self.origin(loc))

    def origin(self, loc: Loc) -> str:
        """Who set ``loc`` (or its nearest set ancestor); the top file if nobody did."""
        for end in range(len(loc), 0, -1):
            found = self.origins.get(tuple(loc[:end]))
            if found is not None:
                return found
        return self.top

    def forget(self, loc: Loc) -> None:
        """Drop the origins of ``loc`` and everything under it."""
        n = len(loc)
        for key in [k for k in self.origins if k[:n] == loc]:
            del self.origins[key]

    def record(self, value: Any, label: str, loc: Loc) -> None:
        """``label`` set ``value`` at ``loc``: remember it for each leaf under ``loc``."""
        self.forget(loc)
        self.origins[loc] = label
        if isinstance(value, dict):
            for key, item in value.items():
                self.record(item, label, (*loc, key))


def merge(layers: Layers, base: dict[str, Any], child: dict[str, Any], label: str, loc: Loc = ()) -> dict[str, Any]:
    """``child`` deep-merged over ``base`` (neither is modified)."""
    out = dict(base)
    for key, value in child.items():
        here = (*loc, key)
        if value is None:
            out.pop(key, None)
            layers.forget(here)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(layers, out[key], value, label, here)
        else:
            out[key] = value
            layers.record(value, label, here)
    return out


def _chain(path: Path, where: str) -> list[tuple[str, Path, dict[str, Any]]]:
    """(label, file, tree) from ``path`` up its ``extends`` chain, child first, ``extends`` removed."""
    chain: list[tuple[str, Path, dict[str, Any]]] = []
    visited: list[Path] = []
    while True:
        try:
            real = path.resolve()
        except (OSError, ValueError, RuntimeError):
            raise UserError(f"{where}: not a usable file name") from None
        if real in visited:
            cycle = " -> ".join([name for name, _, _ in chain] + [where])
            raise UserError(f"{chain[-1][0]}: extends: cycle {cycle}")
        visited.append(real)
        tree = read_yaml_file(path, where)
        parent = tree.pop("extends", None)
        chain.append((where, path, tree))
        if parent is None:
            return chain
        if not isinstance(parent, str) or not parent.strip():
            raise UserError(f"{where}: extends: expected a recipe file name, got {kind(parent)} {preview(parent)}")
        parent = os.path.expanduser(parent)
        next_path = path.parent / parent
        if not safely(Path.is_file, next_path):
            raise UserError(f"{where}: extends: no such recipe file {parent!r} (looked for {next_path})")
        path, where = next_path, os.path.normpath(os.path.join(os.path.dirname(where), parent))


def load_layers(path: Path, where: str) -> Layers:
    """Read ``path`` and its ancestors and merge them, root ancestor first."""
    chain = _chain(path, where)
    layers = Layers(tree={}, top=where)
    for name, file, _ in chain:
        layers.dirs[name] = Path(os.path.abspath(file)).parent
    root_name, _, root_tree = chain[-1]
    layers.tree = dict(root_tree)
    for key, value in root_tree.items():
        layers.record(value, root_name, (key,))
    for name, _, tree in reversed(chain[:-1]):
        layers.tree = merge(layers, layers.tree, tree, name)
    return layers
