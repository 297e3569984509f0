"""Small-batch gradient norms for the noise-scale estimator, without an extra backward pass.

The "big" batch is the whole optimizer step (its gradient norm is already computed for
clipping). The "small" batches are the units the step is already split into:

- one process: each micro-batch. Its gradient is the difference of the accumulated gradient
  before and after its backward (one snapshot copy of the gradients, on measuring steps only).
- FSDP2 ranks: each rank's accumulated gradient, read from the input of the gradient
  reduce-scatter through FSDP's public ``set_custom_reduce_scatter`` hook. With sharded
  accumulation the reduce-scatter runs after every micro-batch, so each rank's micro-batch is
  a unit, as on one process.

Either way the same global batch split into the same units gives the same estimate, whatever
the number of ranks. Units are converted to mean gradients over their own loss tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from hebtron.backends.native import NativeBackend
from hebtron.errors import UserError
from hebtron.train.batch_size import NoiseMeasurement, combine_units


class _RecordingReduceScatter:
    """FSDP reduce-scatter that first adds the squared norm of its (local, unreduced) input."""

    def __init__(self, probe: GradientNoiseProbe) -> None:
        self.probe = probe

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        if self.probe.recording:
            self.probe.local_sq += torch.linalg.vector_norm(input_tensor.detach(), dtype=torch.float32).square()
        return dist.reduce_scatter_single(output=output_tensor, input=input_tensor, group=group, op=op,
                                          async_op=async_op)


class GradientNoiseProbe:
    def __init__(self, model: nn.Module, backend: NativeBackend, required: bool = False) -> None:
        """``required``: the batch-size policy needs the measurement (refuse what cannot give it)."""
        self.model = model
        self.backend = backend
        self.supported = True
        self.recording = False
        self.local_sq = torch.zeros((), dtype=torch.float32, device=backend.device)
        if backend.sharded:
            from torch.distributed.fsdp import FSDPModule

            self.supported = hasattr(FSDPModule, "set_custom_reduce_scatter")  # torch >= 2.9
            if not self.supported and required:
                raise UserError(f"batch_size: measuring the noise scale on FSDP2 ranks needs torch >= 2.9 "
                                f"(FSDPModule.set_custom_reduce_scatter); this torch is {torch.__version__}: "
                                "use batch_size.policy fixed or steps, or a newer torch")
            from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

            comm_cls = type("HebtronRecordingReduceScatter", (_RecordingReduceScatter, ReduceScatter), {})
            for module in model.modules() if self.supported else ():
                if isinstance(module, FSDPModule):
                    module.set_custom_reduce_scatter(comm_cls(self))
        self._reset()

    def _reset(self) -> None:
        self.active = False
        self._unit_sq: list[torch.Tensor] = []  # 0-dim, on the device: no host sync per micro-batch
        self._unit_tokens: list[float] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._rank_tokens = 0.0
        self.local_sq.zero_()

    def usable(self, micro_batches_per_rank: int) -> bool:
        """Two or more units are needed for two batch sizes."""
        return self.supported and (self.backend.world_size > 1 or micro_batches_per_rank > 1)

    def begin_step(self, measure: bool) -> None:
        self._reset()
        self.active = measure

    def before_backward(self, index: int, count: int) -> None:
        """Sharded: record the reduce-scatter input, which flows on the last micro-batch only
        (or on every one, with sharded accumulation)."""
        per_micro = self.backend.sharded_accumulation
        self.recording = self.active and self.backend.sharded and (per_micro or index == count - 1)

    def after_backward(self, index: int, count: int, micro_tokens: float) -> None:
        if not self.active:
            return
        if self.backend.sharded:
            self._rank_tokens += micro_tokens
            if index == count - 1 or self.backend.sharded_accumulation:
                self._unit_sq.append(self.local_sq.clone())
                self._unit_tokens.append(self._rank_tokens)
                self.local_sq.zero_()
                self._rank_tokens = 0.0
                self.recording = False
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self._snapshot is None:
            unit = grads
        else:
            unit = torch._foreach_sub(grads, self._snapshot)
        self._unit_sq.append(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in unit]).square().sum())
        self._unit_tokens.append(micro_tokens)
        if index < count - 1:
            self._snapshot = [g.detach().clone() for g in grads]
        else:
            self._snapshot = None

    def measurement(self, global_tokens: float, grad_norm: float) -> NoiseMeasurement | None:
        """Combine the units of this step (all ranks); None when the step was not measured."""
        if not self.active or not self._unit_sq:
            return None
        # raw unit gradient = sum of token gradients * loss_scale / global_tokens -> mean over the unit's tokens
        return combine_units(self._unit_sq, self._unit_tokens, global_tokens / self.backend.loss_scale, global_tokens,
                             grad_norm, self.backend.all_reduce_sum)
