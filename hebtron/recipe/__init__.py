"""Recipes: YAML run descriptions, validated, inherited (``extends``) and overridden (``k=v``).

    recipe = load_recipe("recipes/demo/cpt.yaml", ["train.lr=3e-4"])

Relative paths: ``./x`` and ``../x`` are relative to the directory of the recipe file that
wrote them (a parent's to the parent's); any other relative path is looked up there, then in
the current working directory, and if it is in neither (outputs, data not built yet) it means
the cwd. Run from the repository root and ``runs/demo/...`` means ``./runs/demo/...``. Paths in
overrides are relative to the cwd. Paths in a loaded recipe are absolute.

Every problem raises :class:`hebtron.errors.UserError` with one line naming the file (or the
override), the field path and what was expected.
"""

from hebtron.recipe.loader import dump_recipe, load_recipe, recipe_data
from hebtron.recipe.schema import (
    CheckpointSection,
    DataSection,
    DataSource,
    EarlyKill,
    LoggingSection,
    ModelSection,
    ParallelSection,
    Phase,
    Recipe,
    Section,
    TokenizerSection,
    TrainSection,
    recipe_json_schema,
)
from hebtron.recipe.units import parse_token_count

__all__ = [
    "CheckpointSection",
    "DataSection",
    "DataSource",
    "EarlyKill",
    "LoggingSection",
    "ModelSection",
    "ParallelSection",
    "Phase",
    "Recipe",
    "Section",
    "TokenizerSection",
    "TrainSection",
    "dump_recipe",
    "load_recipe",
    "parse_token_count",
    "recipe_data",
    "recipe_json_schema",
]
