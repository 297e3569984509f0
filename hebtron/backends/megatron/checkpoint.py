"""Training checkpoints of the Megatron backend, in hebtron's run layout.

    latest                         names the newest complete step (as for the native backend)
    step_00001000/
        megatron/                  Megatron distributed checkpoint: model + optimizer, every rank's
                                   shards; reloads at any tp / ep / pp / dp
        config.json                the model's HF config (``hebtron convert megatron-to-hf`` needs it)
        hebtron_config.json        the same, where ``checkpoint_io`` looks for it
        trainer_state.json         {"format", "step", "extra": {tokens, data, schedule, guards, rng, ...}}
        COMPLETE                   manifest of every file (relative paths and sizes), written last

Every rank writes its shards into ``step_N.tmp-<host>-<pid>`` of rank 0; rank 0 then writes the
state and publishes the directory (:func:`hebtron.train.checkpoint.save_collectively`, which the
native FSDP2 saver uses too: stale scratch entries of this host, manifest, rename, ``latest``). A crash at any point leaves the previous checkpoint as the newest complete one
(:func:`hebtron.checkpoints.find_latest` checks the manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hebtron.checkpoints import STATE_FILE, checkpoint_problem
from hebtron.errors import CheckpointError
from hebtron.train.checkpoint import save_collectively
from hebtron.train.dcp_safe import check_pickled_files

MEGATRON_DIR = "megatron"


def save(engine: Any, root: str | Path, step: int, extra: dict[str, Any], config_json: str,
         keep_last: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    return save_collectively(root, step, engine.rank, lambda tmp: engine.save_checkpoint(tmp / MEGATRON_DIR), extra,
                             {"config.json": config_json, "hebtron_config.json": config_json}, keep_last)


def load(engine: Any, path: str | Path, with_optimizer: bool = True) -> dict[str, Any]:
    """Collective. Loads weights (and optimizer state) into ``engine``; returns ``extra`` with ``step``."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    if not (path / MEGATRON_DIR).is_dir():
        raise CheckpointError(f"{path}: not a Megatron-backend checkpoint (no {MEGATRON_DIR}/); "
                              "start from it with model.hf_path instead of --resume")
    check_pickled_files(path / MEGATRON_DIR)  # megatron-core unpickles .metadata itself: hebtron's own only
    engine.load_checkpoint(path / MEGATRON_DIR, with_optimizer=with_optimizer)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        extra = dict(state["extra"])
        extra["step"] = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state ({exc})") from exc
    return extra
