"""Read one recipe file into plain dicts, turning every YAML problem into a one-line UserError.

Beyond ``yaml.safe_load``: duplicate keys are errors (YAML silently keeps the last one, which
hides a mistake), keys must be strings (YAML 1.1 reads a bare ``on:`` or ``1:`` as a bool or an
int), and the result is a fresh tree: no alias cycles, no containers shared between two keys,
so an override of one key never changes another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hebtron.errors import UserError
from hebtron.jsonio import read_user_text
from hebtron.recipe.hints import kind, one_line, preview


class _NoDuplicates:
    """A safe loader mixin that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            try:
                key = self.construct_object(key_node, deep=deep)
                fresh = key not in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            if not fresh:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {preview(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


class _Loader(_NoDuplicates, yaml.SafeLoader):
    """Pure-Python SafeLoader: its error messages name the line and the problem best."""


# libyaml's parser where PyYAML was built with it (the wheels are): ~10x faster than the pure
# Python one, which took seconds on a recipe with tens of thousands of keys. Same safe constructor;
# on an error the text is parsed again with :class:`_Loader` for its clearer message.
_FastLoader: type = type("_FastLoader", (_NoDuplicates, yaml.CSafeLoader), {}) if hasattr(yaml, "CSafeLoader") else _Loader


def parse_yaml(text: str, where: str) -> Any:
    """``yaml`` text -> Python data; errors name ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, RecursionError, ValueError):
        pass
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        syntax = isinstance(err, yaml.scanner.ScannerError | yaml.parser.ParserError | yaml.composer.ComposerError)
        label = "YAML syntax error" if syntax else "YAML error"
        at = f":{mark.line + 1}" if mark is not None else ""
        col = f" (column {mark.column + 1})" if mark is not None else ""
        raise UserError(one_line(f"{where}{at}: {label}: {problem}{col}")) from None
    except yaml.YAMLError as err:
        raise UserError(one_line(f"{where}: YAML error: {err}")) from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply") from None
    except ValueError as err:  # e.g. an integer past the 4,300-digit conversion limit
        raise UserError(one_line(f"{where}: YAML value out of range: {str(err).split(';')[0]}")) from None


# Aliases make a tree a graph; copying expands shared nodes, so bound the work (billion laughs).
MAX_NODES = 1_000_000
MAX_DEPTH = 100


def fresh_tree(value: Any, where: str) -> Any:
    """A copy of parsed YAML with no shared or cyclic containers and only string keys."""
    budget = [MAX_NODES]

    def copy(node: Any, path: str, stack: tuple[int, ...]) -> Any:
        if isinstance(node, str):
            return _valid_text(node, where, path)
        if not isinstance(node, dict | list):
            return node
        at = path or "top level"
        if id(node) in stack:
            raise UserError(f"{where}: {at}: a YAML alias refers to itself")
        if len(stack) >= MAX_DEPTH:
            raise UserError(f"{where}: {at}: nested more than {MAX_DEPTH} levels deep")
        budget[0] -= len(node) + 1
        if budget[0] < 0:
            raise UserError(f"{where}: more than {MAX_NODES} values after expanding YAML aliases")
        inner = (*stack, id(node))
        if isinstance(node, list):
            return [copy(item, f"{path}[{i}]", inner) for i, item in enumerate(node)]
        out: dict[str, Any] = {}
        for key, item in node.items():
            if not isinstance(key, str):
                prefix = f"{path}: " if path else ""
                raise UserError(f"{where}: {prefix}keys must be strings, got {kind(key)} {preview(key)}; quote it")
            _valid_text(key, where, path)
            out[key] = copy(item, f"{path}.{key}" if path else key, inner)
        return out

    return copy(value, "", ())


def _valid_text(text: str, where: str, path: str) -> str:
    """``text`` unless it holds a lone surrogate (YAML's ``"\ud800"``), which no file or terminal
    can take as UTF-8: refused here, where the recipe and field are known."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        at = f"{path}: " if path else ""
        raise UserError(f"{where}: {at}string holds a lone surrogate ({text[err.start]!r}); expected valid Unicode") from None
    return text


def read_yaml_file(path: Path, where: str) -> dict[str, Any]:
    """A recipe file as a dict (an empty file is an empty dict)."""
    text = read_user_text(path, "YAML recipe file", where, missing="no such recipe file")
    data = parse_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of sections at the top level, got {kind(data)}")
    return fresh_tree(data, where)
