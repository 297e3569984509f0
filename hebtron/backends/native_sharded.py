"""FSDP2 checkpoints of the native backend: every rank writes only its own shards.

    latest
    step_00001000/
        dcp/                 torch.distributed.checkpoint of {"model", "optim"}: each rank's
                             shards (``__<rank>_0.distcp``) and the ``.metadata`` index
        config.json          the model's HF config
        trainer_state.json   {"format", "step", "extra": {tokens, data, schedule, rng, moe, ...}}
        COMPLETE             manifest of every file, written last

Nothing is gathered to rank 0 (a 30B model's weights and Adam state are hundreds of GB): the
save is :func:`hebtron.train.checkpoint.save_collectively`, so publishing, ``latest`` and crash
safety are the single-process format's. A load reshards to the loading run's ranks, whatever
the dp it was saved at, one process included (no process group needed). HF consumers (export,
eval, the probe, SFT's ``model.hf_path``) read it through one cached conversion
(:func:`cached_hf_dir`) that loads the model entries only: the gather happens when exporting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hebtron.checkpoints import SHARDED_DIR, CheckpointRef, checkpoint_problem, fsync_file, read_trainer_state
from hebtron.errors import CheckpointError
from hebtron.train.checkpoint import save_collectively
from hebtron.train.dcp_safe import SafeLoadPlanner, safe_reader
from hebtron.train.hf_cache import cached_conversion

CONVERTER = "native-dcp-1"


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, root: str | Path, step: int, rank: int,
                 extra: dict[str, Any], config_json: str, keep_last: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)

    def write(tmp: Path) -> None:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))

    return save_collectively(root, step, rank, write, extra, {"config.json": config_json}, keep_last)


def _load(state: dict[str, Any], directory: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process: "torch.distributed is disabled ... single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        try:
            dcp.load(state, storage_reader=safe_reader(directory), planner=SafeLoadPlanner())
        except (RuntimeError, ValueError, KeyError) as err:  # DCP wraps per-rank failures in CheckpointException
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{directory}: cannot load this sharded checkpoint into the model ({first[:300]})") \
                from None


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """Collective where a process group runs. Loads the model and optimizer state, resharded to
    this run's ranks; returns the trainer's ``extra`` with ``step``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    model_state, optim_state = get_state_dict(model, optimizer)
    _load({"model": model_state, "optim": optim_state}, path / SHARDED_DIR)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    step, extra = read_trainer_state(path)
    extra["step"] = step
    return extra


def write_hf_weights(step_dir: Path, out: Path) -> None:
    """The HF weights and config of sharded checkpoint ``step_dir`` into ``out`` (one process,
    the whole model in memory once; optimizer state is never read)."""
    from hebtron.model.config import HybridConfig
    from hebtron.model.decoder import HybridModel
    from hebtron.model.hf import save_hf

    config = HybridConfig.from_json_file(step_dir / "config.json")
    model = HybridModel(config)
    _load({"model": model.state_dict()}, step_dir / SHARDED_DIR)  # in place, into the parameters
    save_hf(model, out)
    for f in out.iterdir():
        if f.is_file():
            fsync_file(f)


def cached_hf_dir(ref: CheckpointRef) -> Path:
    """``step_N/hf``: the HF conversion of sharded checkpoint ``ref``, made on first use."""
    return cached_conversion(ref, CONVERTER, "sharded FSDP2", lambda tmp: write_hf_weights(ref.path, tmp))


def config_json(config: Any) -> str:
    return json.dumps(config.to_hf_dict(), indent=2, sort_keys=True)
