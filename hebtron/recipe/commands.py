"""``hebtron recipe show|schema``: see what a recipe resolves to, and give editors its schema."""

from __future__ import annotations

import argparse
import json
import sys


def _show(args: argparse.Namespace) -> int:
    from hebtron.recipe.loader import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_paths=not args.no_check_paths)
    sys.stdout.write(dump_recipe(recipe))
    return 0


def _schema(args: argparse.Namespace) -> int:
    from hebtron.recipe.schema import recipe_json_schema

    sys.stdout.write(json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``recipe show`` and ``recipe schema``."""
    parser = subparsers.add_parser(
        "recipe", help="inspect recipes", description="See what a recipe resolves to; give editors its schema."
    )
    sub = parser.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)

    show = sub.add_parser("show", help="print the resolved recipe (inheritance and overrides applied) as YAML")
    show.add_argument("recipe", help="recipe YAML file")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.lr=3e-4")
    show.add_argument(
        "--no-check-paths", action="store_true", help="do not require input files (data, tokenizer) to exist yet"
    )
    show.set_defaults(func=_show)

    schema = sub.add_parser("schema", help="print the recipe JSON schema (for editor completion)")
    schema.set_defaults(func=_schema)
