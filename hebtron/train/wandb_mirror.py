"""Mirror ``metrics.jsonl`` records to Weights & Biases (recipe ``logging.wandb``).

Teams look at W&B, so the loss, router figures, noise scale, batch size and the eval curves go
there too; ``metrics.jsonl`` stays the record. ``wandb`` is an optional extra, imported only
when a recipe asks for it; missing, it is one clear line before any work.

One run directory gives two W&B runs in one group (the run directory's name): ``train``, written
by the trainer, and ``eval-<suite>``, written by ``hebtron eval watch`` from another process (W&B
runs take one writer). Their ids are derived from the run directory, so a resumed training or a
restarted watcher continues its run. Records are logged against their own ``step`` (a W&B step
metric), not W&B's internal counter, so the steps a resumed run replays after its checkpoint do
not break the curve's x-axis.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hebtron.errors import UserError

WANDB_DIR = "wandb"  # RUN_DIR/wandb/: offline runs, for `wandb sync`
STEP_METRIC = "step"


def import_wandb(where: str = "logging.wandb") -> Any:
    """The ``wandb`` module, or one line saying how to get it."""
    try:
        import wandb
    except ImportError:
        raise UserError(f"{where}: the wandb package is not installed; pip install 'hebtron[wandb]' "
                        "or remove logging.wandb from the recipe") from None
    return wandb


def run_id(run_dir: Path, kind: str) -> str:
    """A W&B run id stable for one run directory and kind (``train``, ``eval-<suite>``)."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(run_dir).name).strip("_")[:32] or "run"
    return f"{name}-{re.sub(r'[^A-Za-z0-9_-]+', '_', kind)[:16]}-{digest}"


def flat_scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a record, nested dicts joined with ``/`` (as TensorBoard's tags); lists and
    text left out (W&B charts scalars), ``None`` (a non-finite value) left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, bool):
            out[tag] = float(value)
        elif isinstance(value, int | float):
            out[tag] = value
        elif isinstance(value, Mapping):
            out.update(flat_scalars(value, f"{tag}/"))
    return out


class WandbMirror:
    """One W&B run that receives the records of one writer (the trainer, or one suite's watcher)."""

    def __init__(self, settings: Any, run_dir: str | Path, kind: str) -> None:
        wandb = import_wandb()
        self.run_dir = Path(run_dir)
        (self.run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, mode=settings.mode, dir=str(self.run_dir),
            id=run_id(self.run_dir, kind), name=f"{self.run_dir.name}/{kind}", group=self.run_dir.name,
            job_type=kind.split("-")[0], resume="allow", reinit="create_new",
        )
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, record: Mapping[str, Any]) -> None:
        scalars = flat_scalars(record)
        if STEP_METRIC in scalars:
            self.run.log(scalars)

    def close(self) -> None:
        """Finish the run and stop wandb's service process: only then is an offline run's
        transaction log complete on disk (``finish`` alone can return before it is)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
            import_wandb().teardown()


def wandb_settings_of_run(run_dir: Path) -> Any | None:
    """``logging.wandb`` of the resolved recipe the trainer wrote to ``RUN_DIR/recipe.yaml``
    (None when the run has none, or no recipe there yet); a bad section is one line."""
    from pydantic import ValidationError

    from hebtron.recipe.schema import WandbSection
    from hebtron.recipe.yamlio import parse_yaml

    path = run_dir / "recipe.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    data = parse_yaml(text, str(path))
    section = ((data or {}).get("logging") or {}).get("wandb") if isinstance(data, dict) else None
    if section is None:
        return None
    try:
        return WandbSection.model_validate(section)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: logging.wandb{'.' + where if where else ''}: {first['msg']}") from None
