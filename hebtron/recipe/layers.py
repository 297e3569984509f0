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
    # loc -> the locs one level below it that hold origins (or lead to some): forget() walks only
    # the subtree it drops, so recording a section of 30,000 keys stays linear, not quadratic
    _below: dict[Loc, set[Loc]] = field(default_factory=dict, repr=False)

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
        stack = [tuple(loc)]
        while stack:
            here = stack.pop()
            self.origins.pop(here, None)
            stack.extend(self._below.pop(here, ()))
        if loc:
            siblings = self._below.get(tuple(loc[:-1]))
            if siblings is not None:
                siblings.discard(tuple(loc))

    def record(self, value: Any, label: str, loc: Loc) -> None:
        """``label`` set ``value`` at ``loc``: remember it for each leaf under ``loc``."""
        loc = tuple(loc)
        self.forget(loc)
        for end in range(len(loc), 0, -1):  # link loc under each ancestor (stop where linked already)
            parent, child = loc[: end - 1], loc[:end]
            linked = self._below.setdefault(parent, set())
            if child in linked:
                break
            linked.add(child)
        self._record_fresh(value, label, loc)

    def _record_fresh(self, value: Any, label: str, loc: Loc) -> None:
        """:meth:`record` below a ``loc`` that was just forgotten (nothing under it to drop)."""
        stack = [(value, loc)]
        while stack:
            node, here = stack.pop()
            self.origins[here] = label
            if isinstance(node, dict):
                children = self._below.setdefault(here, set())
                for key, item in node.items():
                    child = (*here, key)
                    children.add(child)
                    stack.append((item, child))


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
