"""``load_recipe``: file -> inheritance -> overrides -> validated :class:`Recipe`.

Every problem on the way is a :class:`hebtron.errors.UserError` with one line:
``<file or override>: <field.path>: <what was expected, got what>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hebtron.errors import UserError
from hebtron.recipe.hints import one_line
from hebtron.recipe.layers import Layers, load_layers
from hebtron.recipe.messages import dotted, explain
from hebtron.recipe.overrides import apply_overrides
from hebtron.recipe.paths import anchor_paths
from hebtron.recipe.schema import Recipe


def load_recipe(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, check_paths: bool = True
) -> Recipe:
    """Load and validate the recipe at ``path`` with ``key=value`` ``overrides`` on top.

    ``check_paths=False`` skips checks that input files exist (data the demo has not built yet);
    paths are still resolved.
    """
    where = os.fspath(path)
    layers = load_layers(Path(where), where)
    apply_overrides(layers, overrides, Recipe)
    return validate(layers, Path(os.path.abspath(where)).parent, check_paths)


def validate(layers: Layers, base_dir: Path, check_paths: bool) -> Recipe:
    """Validate the merged tree; a failure names the file (or override) that set the field."""
    context = {"base_dir": base_dir, "check_paths": check_paths}
    tree = anchor_paths(layers.tree, Recipe, layers.base_dir)
    try:
        return Recipe.model_validate(tree, context=context)
    except ValidationError as err:
        loc, message = explain(err, Recipe)
    except RecursionError:
        raise UserError(f"{layers.top}: recipe nested too deeply") from None
    field = dotted(loc)
    if field and not message.startswith(field):
        message = f"{field}: {message}"
    raise UserError(one_line(f"{layers.origin(loc)}: {message}"))


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (paths absolute, token budgets as ints)."""
    return recipe.model_dump(mode="json")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML; loading it again gives the same recipe."""
    # libyaml's emitter where PyYAML has it: the same text, ~4x faster on recipes with tens of
    # thousands of keys (model.init may carry any Hugging Face config field)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(recipe_data(recipe), Dumper=dumper, sort_keys=False, allow_unicode=True)
