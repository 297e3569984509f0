"""What the training loop asks of an engine: the model work of one run, on one backend.

:class:`hebtron.train.loop.Trainer` owns what every run shares (schedule, data, guards,
batch-size control, metrics, signals, run state, checkpoint cadence). An engine owns the model
and everything that touches it: building or loading it, one optimizer step over this rank's
micro-batches, evaluation, and its checkpoints. Two engines implement :class:`TrainEngine`:
the native one (PyTorch, FSDP2; :mod:`hebtron.backends.native`) and the Megatron-Core one
(:mod:`hebtron.backends.megatron.train_engine`); :func:`hebtron.backends.engines.make_trainer` picks
by ``recipe.backend``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from hebtron.model.config import HybridConfig
from hebtron.train.batch_size import NoiseMeasurement

# The guard decides, before the optimizer steps, whether to skip: (global loss, grad norm) -> skip.
StepGuard = Callable[[float, float], bool]


class ProcessGroupOps:
    """What the run loop asks of any backend's process group: rank, reductions, barrier.
    Subclasses set ``rank``, ``world_size``, ``distributed`` and ``device``."""

    rank: int
    world_size: int
    distributed: bool
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@dataclass
class StepPlan:
    """One optimizer step as the trainer hands it to the engine."""

    micro_batches: list[dict[str, torch.Tensor]]  # this data-parallel rank's rows, split
    lr: float
    step: int  # the number this step will have once done (1 for the first)
    pad_id: int | None  # the data's padding token, for router statistics
    measure_noise: bool  # read the micro-batch gradient norms for the noise scale
    guard: StepGuard


@dataclass
class StepResult:
    """What one optimizer step produced, identical on every rank."""

    loss_sum: float  # summed over every loss token of the global batch
    loss_tokens: float  # global (float: SFT per-sample weights)
    grad_norm: float
    skipped: bool  # no update: the guard refused it (or fp16 found an overflow)
    noise: NoiseMeasurement | None = None
    figures: dict[str, Any] = field(default_factory=dict)  # MoE aux values, router figures ...
    messages: list[str] = field(default_factory=list)  # lines for the log (routing alarms)
    stop: str | None = None  # a monitor asked to abort the run, with this reason

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.loss_tokens, 1)


class TrainEngine(Protocol):
    """The model side of a run. Every method is collective unless it says otherwise."""

    ops: ProcessGroupOps
    config: HybridConfig
    dp_rank: int  # this rank's data-parallel coordinate: the rows it trains on
    dp_size: int

    def notes(self) -> list[str]:
        """Lines for the log at the start of a run (e.g. recipe settings this model ignores)."""

    def load_pretrained(self) -> None:
        """Fresh runs: the weights of ``model.hf_path`` (if any), before the first step."""

    def noise_usable(self, micro_batches_per_rank: int) -> bool:
        """Whether a step of this shape can be measured for the noise scale."""

    def train_step(self, plan: StepPlan) -> StepResult:
        """Accumulate over the micro-batches, clip, ask the guard, step (or skip)."""

    def evaluate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
        """(summed loss, loss tokens) over every row of ``batches`` (the same on every rank)."""

    def save(self, root: Path, step: int, extra: dict[str, Any], keep_last: int | None) -> Path | None:
        """Write a checkpoint with the trainer's ``extra``; its path on the main rank."""

    def load(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint this engine wrote; returns the trainer's ``extra`` (with ``step``)."""

    def close(self) -> None:
        """Release the process group and devices."""


MODEL_INPUTS = ("input_ids", "position_ids", "seq_idx")


def to_device(micro: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host micro-batch on ``device``, deciding on the host what would otherwise make the model
    wait for the device: rows that are all one document lose ``seq_idx`` / ``position_ids`` (the
    model then takes causal SDPA, its fastest path). On CUDA the copies are pinned and
    non-blocking, so the host queues the step without waiting for them."""
    host = dict(micro)
    seq_idx = host.get("seq_idx")
    if seq_idx is None and host.get("position_ids") is not None:
        seq_idx = (host["position_ids"] == 0).long().cumsum(dim=-1)
    if seq_idx is not None and bool((seq_idx == seq_idx[:, :1]).all()):
        host.pop("seq_idx", None)
        host.pop("position_ids", None)
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items()}
    return {k: v.to(device) for k, v in host.items()}


def split_rows(batch: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of every per-token field (``cu_seqlens`` / ``max_seqlen`` describe the
    whole batch and are rebuilt by consumers)."""
    return {k: v[start:stop] for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
