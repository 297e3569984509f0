"""Where a run's checkpoints and their benchmark results live, for watch, select and table.

A run directory holds ``metrics.jsonl``, ``recipe.yaml`` (the resolved recipe, written when
training starts) and usually the checkpoint directory; each checkpoint ``step_N`` holds its
results as ``step_N/eval/<suite tag>.json``, the file ``hebtron eval run`` writes. The suite tag
is the suite file's name without ``.yaml`` (``hebrew-mini``), the same tag ``hebtron submit``
uses, so results of the watcher and of the chained end-of-run evaluation land in one place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hebtron.checkpoints import EVAL_DIR, LATEST_FILE, STATE_FILE, list_checkpoints, step_of
from hebtron.errors import UserError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def suite_tag(suite: str | Path) -> str:
    """File-name-safe name of a suite given by name or path: ``eval/suites/x.yaml`` -> ``x``."""
    stem = Path(str(suite)).name.removesuffix(".yaml").removesuffix(".yml")
    return _UNSAFE.sub("_", stem).strip("._-")[:64] or "suite"


ARCHIVE_DIR = "eval-watch"  # CKPT_DIR/eval-watch/<tag>/step_N.json: results that outlive pruning


def results_path(checkpoint: Path, tag: str) -> Path:
    return checkpoint / EVAL_DIR / f"{tag}.json"


def archive_path(ckpt_dir: Path, tag: str, step: int) -> Path:
    """The run-level copy of a checkpoint's results: ``keep_last`` prunes the checkpoint (and
    ``step_N/eval/`` with it) once it is evaluated, but the curve over the run needs every point."""
    from hebtron.checkpoints import checkpoint_name

    return ckpt_dir / ARCHIVE_DIR / tag / f"{checkpoint_name(step)}.json"


@dataclass(frozen=True)
class RunDirs:
    """A run's directory (None when only a checkpoint directory was given) and its checkpoints."""

    run_dir: Path | None
    ckpt_dir: Path


def _looks_like_checkpoints(path: Path) -> bool:
    return (path / LATEST_FILE).exists() or any(step_of(p) is not None for p in path.glob("step_*"))


def _recipe_checkpoint_dir(run_dir: Path) -> Path | None:
    """``checkpoint.dir`` of the run's resolved recipe (a plain read: no validation, no paths checked)."""
    recipe = run_dir / "recipe.yaml"
    try:
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return None
    value = raw.get("checkpoint", {}).get("dir") if isinstance(raw, dict) and isinstance(raw.get("checkpoint"), dict) else None
    return Path(value) if isinstance(value, str) and value else None


def locate_run(path: str | Path, checkpoints: str | Path | None = None, must_exist: bool = True) -> RunDirs | None:
    """Resolve RUN_DIR (a run directory or a checkpoint directory) and its checkpoint directory.

    ``checkpoints`` names the checkpoint directory outright. Without it: ``path`` itself when it
    holds ``latest`` or ``step_*``, else the recipe's ``checkpoint.dir``, else ``path/checkpoints``.
    Returns None when nothing is there yet and ``must_exist`` is off (a watcher started before
    training); raises UserError otherwise."""
    path = Path(path)
    if checkpoints is not None:
        return RunDirs(path, Path(checkpoints))
    if path.is_dir() and _looks_like_checkpoints(path):
        parent = path.parent
        return RunDirs(parent if (parent / "metrics.jsonl").exists() else None, path)
    from_recipe = _recipe_checkpoint_dir(path)
    for candidate in (from_recipe, path / "checkpoints"):
        if candidate is not None and candidate.is_dir():
            return RunDirs(path, candidate)
    if not must_exist:  # training has started (its recipe is there) but not saved yet
        return RunDirs(path, from_recipe) if from_recipe is not None else None
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    raise UserError(f"{path}: no checkpoints found (no latest or step_* here, no checkpoint.dir in its recipe.yaml, "
                    "no checkpoints/); give the checkpoint directory with --checkpoints DIR")


def checkpoint_tokens(checkpoint: Path) -> int | None:
    """Tokens trained at this checkpoint (its trainer state), or None when not recorded."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    tokens = (state.get("extra") or {}).get("tokens") if isinstance(state, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def is_final_checkpoint(checkpoint: Path) -> bool:
    """Whether the trainer marked this checkpoint as its run's last (``extra.final``)."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(state, dict) and (state.get("extra") or {}).get("final") is True


@dataclass
class Evaluated:
    """One checkpoint's results file for a suite: its data, or why it cannot be used."""

    step: int
    checkpoint: Path
    path: Path
    tokens: int | None
    data: dict[str, Any] | None
    problem: str | None


def evaluated_checkpoints(ckpt_dir: Path, tag: str) -> list[Evaluated]:
    """Every checkpoint of the run with results for ``tag``, by step: those beside a complete
    checkpoint, and the archived results of checkpoints pruned since (``checkpoint`` is then
    a path that no longer exists)."""
    from hebtron.checkpoints import checkpoint_name
    from hebtron.eval.gate import read_results

    steps = {step: path for step, path in list_checkpoints(ckpt_dir)}
    found: dict[int, Path] = {}
    for path in sorted((ckpt_dir / ARCHIVE_DIR / tag).glob("step_*.json")):
        step = step_of(path.with_suffix(""))
        if step is not None:
            found[step] = path
    for path in sorted(ckpt_dir.glob(f"step_*/{EVAL_DIR}/{tag}.json")):
        step = step_of(path.parent.parent)
        if step is not None and steps.get(step) == path.parent.parent:  # not a scratch or trash directory
            found[step] = path
    evaluated = []
    for step, path in sorted(found.items()):
        checkpoint = steps.get(step, ckpt_dir / checkpoint_name(step))
        data, problem = read_results(path)
        tokens = checkpoint_tokens(checkpoint)
        if tokens is None and data is not None:
            recorded = (data.get("hebtron") or {}).get("tokens")
            tokens = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None
        evaluated.append(Evaluated(step, checkpoint, path, tokens, data, problem))
    return evaluated
