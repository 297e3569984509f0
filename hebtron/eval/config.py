"""Suite and gate-policy YAML files, validated by pydantic with one-line errors.

A *suite* (``eval/suites/NAME.yaml``) says which lm-eval tasks to run and how; a *policy*
(``eval/suites/NAME.gate.yaml``) says which metrics decide whether a checkpoint is kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hebtron.errors import UserError
from hebtron.eval.arena_gate import ArenaRule
from hebtron.recipe.messages import dotted, explain

SUITES_DIR = Path(__file__).resolve().parents[2] / "eval" / "suites"
M = TypeVar("M", bound=BaseModel)


class Suite(BaseModel):
    """Which tasks to evaluate and with which lm-eval settings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    tasks: list[str] = Field(min_length=1)
    include: list[str] = Field(default_factory=list, description="task dirs, relative to the suite file")
    workdir_include: list[str] = Field(
        default_factory=list, description="task dirs built at run time, relative to the working directory")
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=8, ge=1)
    limit: float | None = Field(default=None, gt=0, description="examples per task (testing only)")
    bootstrap_iters: int = Field(default=1000, ge=0)
    apply_chat_template: bool = False
    gen_kwargs: dict[str, Any] | None = None
    offline: bool = Field(default=False, description="local data only: set HF_DATASETS_OFFLINE")
    builtin_tasks: bool = Field(default=False, description="index lm-eval's own tasks too (slow: ~15 s)")
    model_args: dict[str, Any] = Field(default_factory=dict, description="extra model arguments")

    @field_validator("model_args")
    @classmethod
    def _no_remote_code(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A suite file is data: it cannot make the model directory's own code run."""
        if "trust_remote_code" in value:
            raise ValueError("trust_remote_code cannot be set in a suite file (a model directory's code would run); "
                             "pass --trust-remote-code on the command line if you trust it")
        return value


class TaskRule(BaseModel):
    """One gated metric: how far it may fall from the baseline."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="lm-eval metric, e.g. acc or 'exact_match,strict-match'")
    max_drop: float | None = Field(default=None, ge=0, description="allowed drop in metric units")
    max_drop_stderr: float | None = Field(default=None, ge=0, description="allowed drop in standard errors")
    higher_is_better: bool | None = None
    scale: float = Field(default=1.0, gt=0, description="multiplies the metric in the aggregate")

    @model_validator(mode="after")
    def _some_tolerance(self) -> TaskRule:
        if self.max_drop is None and self.max_drop_stderr is None:
            raise ValueError("give max_drop, max_drop_stderr or both")
        return self

    @property
    def key(self) -> str:
        """The results key: ``acc`` means ``acc,none`` (lm-eval's unfiltered value)."""
        return self.metric if "," in self.metric else f"{self.metric},none"

    @property
    def stderr_key(self) -> str:
        name, _, filt = self.key.partition(",")
        return f"{name}_stderr,{filt}"


class Aggregate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_gain: float = Field(description="mean over gated tasks of scale * (candidate - baseline), oriented so up is good")

    @field_validator("min_gain")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class SelectRule(BaseModel):
    """How ``hebtron eval select`` picks the checkpoint to keep among a run's evaluated ones."""

    model_config = ConfigDict(extra="forbid")

    baseline: str | None = Field(
        default=None, description="results JSON every checkpoint is gated against (relative: to the policy "
                                  "file); default: the run's first evaluated checkpoint")
    tie_margin: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                              description="aggregates within this of the best count as tied; the latest step wins")
    plateau_window: int = Field(default=3, ge=1, description="plateau: no task improved beyond its stderr "
                                                             "over the last K evaluations")


class Policy(BaseModel):
    """Per-task tolerances plus an optional floor on the aggregate gain."""

    model_config = ConfigDict(extra="forbid")

    suite: str | None = None
    description: str = ""
    tasks: dict[str, TaskRule] = Field(min_length=1)
    aggregate: Aggregate | None = None
    arena: ArenaRule | None = Field(default=None, description="head-to-head votes (hebtron arena) the candidate must win")
    select: SelectRule = Field(default_factory=SelectRule)


def load_yaml_model(path: str | Path, cls: type[M]) -> M:
    """A suite or policy file as ``cls``. Every way the file can be wrong is one line naming it:
    missing, a directory, not UTF-8, not YAML, nested too deeply, an alias bomb, huge integers,
    duplicate keys (the recipe reader's checks, :mod:`hebtron.recipe.yamlio`), wrong fields."""
    from hebtron.jsonio import read_user_text
    from hebtron.recipe.yamlio import fresh_tree, parse_yaml

    path = Path(path)
    raw = parse_yaml(read_user_text(path, "YAML file"), str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of {cls.__name__.lower()} fields")
    raw = fresh_tree(raw, str(path))
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        loc, message = explain(err, cls)
        raise UserError(f"{path}: {dotted(loc) or '(top level)'}: {message}") from None


def find_suite(name_or_path: str | Path) -> Path:
    """A suite file path, or a bare name looked up as ``eval/suites/NAME.yaml``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: no such suite file")
        return path
    for base in (Path("eval") / "suites", SUITES_DIR):
        candidate = base / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(f"suite {name_or_path!r}: not a file and not in {SUITES_DIR}")


def load_suite(name_or_path: str | Path) -> tuple[Suite, Path]:
    path = find_suite(name_or_path)
    return load_yaml_model(path, Suite), path


def task_dirs(suite: Suite, suite_file: Path, workdir: list[str | Path] = ()) -> list[Path]:
    """Existing task directories for lm-eval's ``include_path``; a missing one is an error.

    ``workdir`` replaces the suite's ``workdir_include`` (tasks built somewhere else).
    """
    dirs = [(suite_file.parent / d).resolve() for d in suite.include]
    dirs += [Path(d).resolve() for d in (workdir or suite.workdir_include)]
    for d in dirs:
        if not d.is_dir():
            hint = " (build it with `hebtron data demo`)" if "demo" in str(d) else ""
            raise UserError(f"{suite_file}: task directory {d} does not exist{hint}")
    return dirs
