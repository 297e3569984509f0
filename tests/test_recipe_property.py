"""Property: whatever a recipe file or override holds, the loader returns a Recipe or raises a
UserError whose message is one line; no other exception, no multi-line text, no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hebtron.errors import UserError
from hebtron.recipe import Recipe, load_recipe
from hebtron.recipe.walk import is_model, strip
from tests.test_recipe_helpers import make_inputs, valid_tree


def _field_names(model: Any, seen: set[Any] | None = None) -> set[str]:
    """Every key the schema knows, so random documents hit real sections, not only typos."""
    seen = seen if seen is not None else set()
    names: set[str] = set()
    if model in seen:
        return names
    seen.add(model)
    for name, info in model.model_fields.items():
        names.add(name)
        inner = strip(info.annotation)
        for candidate in (inner, *getattr(inner, "__args__", ())):
            if is_model(strip(candidate)):
                names |= _field_names(strip(candidate), seen)
    return names


def _field_paths(model: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path of the schema (list items as index 0), e.g. ("data", "sources", 0, "path")."""
    paths = []
    for name, info in model.model_fields.items():
        here = (*prefix, name)
        paths.append(here)
        inner = strip(info.annotation)
        if is_model(inner):
            paths += _field_paths(inner, here)
        elif getattr(inner, "__origin__", None) is list and is_model(strip(inner.__args__[0])):
            paths += _field_paths(strip(inner.__args__[0]), (*here, 0))
    return paths


NAMES = sorted(_field_names(Recipe) | {"extends"})
PATHS = _field_paths(Recipe)
PLAUSIBLE = ["250B", "10M", "2k", "3e-4", "wsd", "cosine", "constant", "bf16", "data/he", "data/en.jsonl",
             "data/he.bin", "tok/tokenizer.json", "./x", "../x", "~", "/", "", ".", "recipe.yaml", "M*E", "he", "null",
             "0.5", "1", "0", "-1", "16", "[]", "{}", "true", "he_valid", "en"]
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.integers(-2, 64), st.floats(),
    st.floats(0, 1), st.text(max_size=12), st.sampled_from(PLAUSIBLE),
)
# A path into the schema, sometimes bent by a random key or index.
key_paths = st.one_of(
    st.sampled_from(PATHS).map(list),
    st.lists(st.one_of(st.sampled_from(NAMES), st.integers(0, 3), st.text(max_size=4)), min_size=1, max_size=4),
)
values = st.recursive(
    scalars, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=4)), max_leaves=16
)
overrides = st.lists(
    st.one_of(
        st.builds(
            lambda k, v: f"{'.'.join(map(str, k))}={v}",
            key_paths,
            st.one_of(st.sampled_from(PLAUSIBLE), st.text(max_size=10), scalars.map(lambda v: yaml.safe_dump(v).split("\n")[0])),
        ),
        st.text(max_size=20),
    ),
    max_size=3,
)


def check(path: Path, extra: list[str], check_paths: bool = True) -> None:
    try:
        result = load_recipe(path, extra, check_paths=check_paths)
    except UserError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert "Traceback" not in message and "validation error" not in message.lower(), message
    else:
        assert isinstance(result, Recipe)


def _edit(tree: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    """Set ``value`` at ``path``, creating mappings on the way, stopping where the path breaks."""
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not node:
                return tree
            part = int(part) % len(node) if isinstance(part, int) else 0
        elif isinstance(node, dict):
            part = str(part)
            if not last and not isinstance(node.get(part), dict | list):
                node[part] = {}
        else:
            return tree
        if last:
            node[part] = value
        else:
            node = node[part]
    return tree


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(document=st.one_of(values, st.dictionaries(keys, values, max_size=6)), extra=overrides)
def test_random_documents(tmp_path_factory: Any, document: Any, extra: list[str]) -> None:
    root = tmp_path_factory.getbasetemp() / "random-documents"
    make_inputs(root)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    check(path, extra)


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text(tmp_path_factory: Any, text: str) -> None:
    root = tmp_path_factory.getbasetemp() / "random-text"
    root.mkdir(exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    check(path, [])


@SETTINGS
@given(
    edits=st.lists(st.tuples(key_paths, st.one_of(scalars, values)), max_size=3),
    extra=overrides,
    check_paths=st.booleans(),
)
def test_random_edits_of_a_valid_recipe(
    tmp_path_factory: Any, edits: list[tuple[list[str | int], Any]], extra: list[str], check_paths: bool
) -> None:
    root = tmp_path_factory.getbasetemp() / "random-edits"
    make_inputs(root)
    tree = valid_tree()
    for where, value in edits:
        tree = _edit(tree, where, value)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    check(path, extra, check_paths)


def test_the_unedited_recipe_is_valid(tmp_path: Path) -> None:
    """Guards the property tests above: without edits they must reach a Recipe."""
    make_inputs(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(valid_tree()), encoding="utf-8")
    assert isinstance(load_recipe(path), Recipe)
