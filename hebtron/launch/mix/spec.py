"""The mix-search YAML: what to mix, what to aim at, and which recipe sizes the proxies.

Example (``recipes/demo/mix_search.yaml`` is written by ``bench/mix_search.py``)::

    proxy:
      recipe: mix_proxy.yaml        # model size, seq_len, batch, lr and train.total_tokens (the budget)
      overrides: []                 # key=value on top, as on the hebtron train command line
    sources:                        # the candidates (indexed datasets), with optional bounds
      - {name: he_news, path: data/he_news, lang: he, min: 0.05, max: 0.8}
    targets:                        # validation sets; the objective is their weighted mean loss
      - {name: he_news_valid, path: data/he_news_valid, lang: he, weight: 1.0}
    search: {runs: 16, alpha: 1.0, seed: 0, model: auto}
    fragment: {extends: null}       # the recipe the proposal's fragment extends, if any

Relative paths are looked up next to this file, then in the working directory (as in recipes).
Errors are one line naming the file and the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hebtron.errors import UserError
from hebtron.recipe.hints import one_line
from hebtron.recipe.messages import dotted, explain
from hebtron.recipe.paths import indexed_exists, resolve, where_looked
from hebtron.recipe.schema import FieldProblem, Lang, Name
from hebtron.recipe.yamlio import read_yaml_file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Proxy(_Section):
    recipe: str = Field(description="the proxies' recipe: model size, batch, lr, total_tokens (equal for all)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides on top of it")


class Candidate(_Section):
    name: Name
    path: str = Field(description="indexed dataset prefix (hebtron data prepare, or data cluster --tokenizer)")
    lang: Lang | None = None
    min: float = Field(0.0, ge=0, le=1, description="smallest weight the proposal may give it")
    max: float = Field(1.0, ge=0, le=1, description="largest weight the proposal may give it")


class Target(_Section):
    name: Name
    path: str = Field(description="indexed dataset prefix of a validation set")
    lang: Lang | None = None
    weight: float = Field(1.0, gt=0, description="its share of the objective")


class Search(_Section):
    runs: int = Field(16, ge=4, description="proxy runs (each a Dirichlet-drawn mixture)")
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration (1: uniform over the simplex)")
    seed: int = Field(0, ge=0)
    model: Literal["auto", "linear", "quadratic"] = Field(
        "auto", description="ridge on the weights, ridge on weights and their products, or the one that ranks "
                           "held-out runs better")
    propose: Literal["top_k_mean", "argmin"] = Field(
        "top_k_mean", description="top_k_mean (RegMix): the mean of the top_k best-predicted of many mixtures drawn "
                                  "from the proxies' prior; argmin: the fit's minimum (a corner of the bounds for a "
                                  "linear fit, far from every proxy)")
    top_k: int = Field(100, ge=1, description="top_k_mean: mixtures averaged (of 100,000 drawn)")


class Fragment(_Section):
    extends: str | None = Field(None, description="the recipe the written fragment extends (optional)")


class MixSpec(_Section):
    proxy: Proxy
    sources: list[Candidate] = Field(min_length=2)
    targets: list[Target] = Field(min_length=1)
    search: Search = Field(default_factory=Search)
    fragment: Fragment = Field(default_factory=Fragment)

    @model_validator(mode="after")
    def _consistent(self) -> MixSpec:
        for what in ("sources", "targets"):
            seen: dict[str, int] = {}
            for i, item in enumerate(getattr(self, what)):
                if item.name in seen:
                    raise FieldProblem((what, i, "name"), f"duplicate name {item.name!r}")
                seen[item.name] = i
        for i, s in enumerate(self.sources):
            if s.min > s.max:
                raise FieldProblem(("sources", i, "min"), f"must be <= max ({s.max}), got {s.min}")
        if sum(s.min for s in self.sources) > 1:
            raise FieldProblem(("sources",), "the minimum weights add up to more than 1")
        if sum(s.max for s in self.sources) < 1:
            raise FieldProblem(("sources",), "the maximum weights add up to less than 1")
        return self

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


def load_spec(path: str | os.PathLike[str]) -> MixSpec:
    """Read and validate a mix-search YAML; paths come back absolute and checked."""
    where = os.fspath(path)
    file = Path(where)
    if not file.is_file():
        raise UserError(f"{where}: no such mix-search file")
    tree: Any = read_yaml_file(file, where)
    try:
        spec = MixSpec.model_validate(tree)
    except ValidationError as err:
        loc, message = explain(err, MixSpec)
        field = dotted(loc)
        raise UserError(one_line(f"{where}: {field + ': ' if field else ''}{message}")) from None
    base = file.resolve().parent
    recipe = resolve(spec.proxy.recipe, base, Path.is_file)
    if not recipe.is_file():
        raise UserError(f"{where}: proxy.recipe: no such recipe {spec.proxy.recipe!r} ({where_looked(spec.proxy.recipe, base)})")
    spec.proxy.recipe = str(recipe)
    for what in ("sources", "targets"):
        for i, item in enumerate(getattr(spec, what)):
            found = resolve(item.path, base, indexed_exists)
            if not indexed_exists(found):
                raise UserError(f"{where}: {what}.{i}.path: no indexed dataset (.bin + .idx) {item.path!r} "
                                f"({where_looked(item.path, base)}); make it with hebtron data prepare")
            item.path = str(found)
    if spec.fragment.extends is not None:
        spec.fragment.extends = str(resolve(spec.fragment.extends, base, Path.is_file))
    return spec
