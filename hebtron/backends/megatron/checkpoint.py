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
state and hands the directory to :func:`hebtron.train.checkpoint.publish_checkpoint` (removes
this host's stale scratch entries, manifest, rename, ``latest``), the native saver's own last
step. A crash at any point leaves the previous checkpoint as the newest complete one
(:func:`hebtron.checkpoints.find_latest` checks the manifest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hebtron.checkpoints import (
    FORMAT_VERSION,
    STATE_FILE,
    checkpoint_name,
    checkpoint_problem,
    scratch_path,
    scratch_tag,
    write_text_synced,
)
from hebtron.errors import CheckpointError
from hebtron.train.checkpoint import publish_checkpoint

MEGATRON_DIR = "megatron"


def save(engine: Any, root: str | Path, step: int, extra: dict[str, Any], config_json: str,
         keep_last: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    name = checkpoint_name(step)
    tag = [scratch_tag()]  # rank 0's host and pid: ranks on other nodes must use the same name
    dist.broadcast_object_list(tag, src=0)
    tmp = scratch_path(root, name, "tmp", tag[0])
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(tmp / MEGATRON_DIR)
    final = root / name
    if engine.rank == 0:
        write_text_synced(tmp / STATE_FILE, json.dumps({"format": FORMAT_VERSION, "step": step, "extra": extra}))
        write_text_synced(tmp / "config.json", config_json)
        write_text_synced(tmp / "hebtron_config.json", config_json)
        publish_checkpoint(tmp, root, step, keep_last)
    dist.barrier()
    return final


def load(engine: Any, path: str | Path, with_optimizer: bool = True) -> dict[str, Any]:
    """Collective. Loads weights (and optimizer state) into ``engine``; returns ``extra`` with ``step``."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    if not (path / MEGATRON_DIR).is_dir():
        raise CheckpointError(f"{path}: not a Megatron-backend checkpoint (no {MEGATRON_DIR}/); "
                              "start from it with model.hf_path instead of --resume")
    engine.load_checkpoint(path / MEGATRON_DIR, with_optimizer=with_optimizer)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        extra = dict(state["extra"])
        extra["step"] = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state ({exc})") from exc
    return extra
