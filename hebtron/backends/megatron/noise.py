"""Micro-batch gradient norms on the Megatron backend, for the noise-scale estimator.

Same measurement as :mod:`hebtron.train.noise_probe` on one process, read from Megatron's
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

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hebtron.train.noise_probe import NoiseMeasurement

if TYPE_CHECKING:
    from hebtron.backends.megatron.config_map import ParallelPlan
    from hebtron.backends.megatron.step import MegatronEngine


def unsupported_reason(plan: ParallelPlan) -> str | None:
    """Why micro-batch gradient norms cannot be read under ``plan`` (None: they can)."""
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(plan, name) > 1:
            return (f"the megatron backend measures the gradient noise scale only on whole-model replicas "
                    f"(tp = pp = cp = ep = 1); this plan has {name} = {getattr(plan, name)}")
    return None


class MegatronNoiseProbe:
    def __init__(self, engine: MegatronEngine) -> None:
        self.engine = engine
        self.active = False
        self._reset()

    def _reset(self) -> None:
        self._unit_sq: list[torch.Tensor] = []  # 0-dim, on the device: no host sync per micro-batch
        self._unit_tokens: list[float] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._next = 0
        self._tokens: list[float] = []

    def _buffers(self) -> list[torch.Tensor]:
        return [buffer.grad_data for chunk in self.engine.chunks
                for buffer in chunk.buffers + chunk.expert_parallel_buffers]

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
        from megatron.core import parallel_state as ps

        self.active = False
        # buffers hold sum over the unit's tokens of per-token gradients x loss_scale -> mean gradient
        weights = torch.tensor([1.0 / (loss_scale * max(tok, 1e-9)) ** 2 for tok in self._unit_tokens],
                               dtype=torch.float64, device=self.engine.device)
        totals = torch.stack([
            (torch.stack(self._unit_sq).double() * weights).sum(),
            weights.new_tensor(float(len(self._unit_sq))),
            weights.new_tensor(sum(self._unit_tokens)),
        ])
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        units = float(totals[1])
        if units < 2:
            return None
        return NoiseMeasurement(float(totals[0]) / units, grad_norm**2, float(totals[2]) / units, global_tokens)
