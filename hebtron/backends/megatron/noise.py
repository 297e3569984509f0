"""Micro-batch gradient norms on the Megatron backend, for the noise-scale estimator.

Same measurement as :mod:`hebtron.backends.native_noise` on one process, read from Megatron's
DDP gradient buffers instead of ``param.grad``: the units are the micro-batches of every
data-parallel rank, and the gradient of micro-batch ``i`` is how much this rank's local (not
yet reduced) buffers moved during its backward. Megatron's no-pipelining schedule runs
micro-batch ``i``'s backward before micro-batch ``i + 1``'s forward, so the buffers are read
at the next forward, and for the last micro-batch just before ``finalize_model_grads``
reduces them over the data-parallel ranks. No extra backward pass; one copy of the buffers,
on measured steps only.

Only whole-model replicas can be measured this way: with tensor, pipeline, context or expert
parallelism a rank's buffers hold shards or partial sums of the gradient, so
:func:`unsupported_reason` names the plan's obstacle and the recipe is refused up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from hebtron.train.batch_size import NoiseMeasurement, combine_units

if TYPE_CHECKING:
    from hebtron.backends.megatron.config_map import ParallelPlan


def unsupported_reason(plan: ParallelPlan) -> str | None:
    """Why micro-batch gradient norms cannot be read under ``plan`` (None: they can)."""
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(plan, name) > 1:
            return (f"the megatron backend measures the gradient noise scale only on whole-model replicas "
                    f"(tp = pp = cp = ep = 1); this plan has {name} = {getattr(plan, name)}")
    return None


class MegatronNoiseProbe:
    """Reads ``buffers()`` (this rank's local gradient buffers) between micro-batches;
    ``dp_all_reduce_sum`` sums the units over the data-parallel ranks."""

    def __init__(self, buffers: Callable[[], list[torch.Tensor]],
                 dp_all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._buffers = buffers
        self._dp_all_reduce_sum = dp_all_reduce_sum
        self.active = False
        self._reset()

    def _reset(self) -> None:
        self._unit_sq: list[torch.Tensor] = []  # 0-dim, on the device: no host sync per micro-batch
        self._unit_tokens: list[float] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._next = 0
        self._tokens: list[float] = []

    def begin(self, unit_tokens: list[float]) -> None:
        """Measure the coming train step, whose micro-batches hold ``unit_tokens`` loss tokens."""
        self._reset()
        self.active = True
        self._tokens = list(unit_tokens)

    def _read_unit(self) -> None:
        """Record the gradient of the micro-batch whose backward has just finished."""
        buffers = self._buffers()
        if self._snapshot is None:
            sq = torch.stack([b.float().pow(2).sum() for b in buffers]).sum()
        else:
            sq = torch.stack([(b.float() - s).pow(2).sum() for b, s in zip(buffers, self._snapshot, strict=True)]).sum()
        self._unit_sq.append(sq)
        self._unit_tokens.append(self._tokens[len(self._unit_sq) - 1])
        self._snapshot = [b.detach().float().clone() for b in buffers] if self._next < len(self._tokens) else None

    def before_forward(self) -> None:
        """Called at every micro-batch's forward: the previous micro-batch's backward is done."""
        if not self.active:
            return
        if self._next > 0:
            self._read_unit()
        self._next += 1

    def before_finalize(self) -> None:
        """Called before the gradients are reduced over ranks: read the last micro-batch."""
        if self.active and self._next == len(self._tokens):
            self._read_unit()

    def measurement(self, global_tokens: float, grad_norm: float, loss_scale: float) -> NoiseMeasurement | None:
        """Combine this step's units over data-parallel ranks (collective); None if not measured."""
        if not self.active:
            return None
        self.active = False
        # buffers hold sum over the unit's tokens of per-token gradients x loss_scale -> mean gradient
        return combine_units(self._unit_sq, self._unit_tokens, 1.0 / loss_scale, global_tokens, grad_norm,
                             self._dp_all_reduce_sum)
