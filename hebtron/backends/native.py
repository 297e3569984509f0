"""The native backend: plain PyTorch on one process, or FSDP2 under torchrun.

The model is written for one device; this module applies data parallelism from outside
(activation checkpointing, then ``fully_shard`` per block and the root, with the mixed-precision
policy), and gives the loop what it needs from the process group: rank, world size, reductions,
gradient-sync control, the single-process state dict, and loading a full state dict into FSDP2
shards (a single-process checkpoint resumed on ranks). gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hebtron.backends.activation_checkpointing import apply_activation_checkpointing
from hebtron.errors import UserError
from hebtron.train.engine import ProcessGroupOps


class NativeBackend(ProcessGroupOps):
    def __init__(self, expected_dp: int = 1) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size != expected_dp:
            raise UserError(
                f"parallel.dp is {expected_dp} but {self.world_size} process(es) were started; "
                f"run with torchrun --nproc_per_node {expected_dp} (or set parallel.dp={self.world_size})"
            )
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.distributed = self.world_size > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.sharded = False
        self.sharded_accumulation = False

    def wrap(self, model: nn.Module, precision: str = "fp32", activation_checkpointing: str = "none",
             sharded_accumulation: bool = False) -> nn.Module:
        """Activation checkpointing per block, then FSDP2: shard each block, then the root
        (embeddings, final norm, head). With ``precision`` bf16 the shards stay in the master
        dtype while forward and backward see bf16 copies (all-gathered in bf16) and gradients are
        reduced in fp32: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``."""
        model.to(self.device)
        apply_activation_checkpointing(model, activation_checkpointing)
        if self.distributed:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy()
            if precision == "bf16":
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in model.backbone.layers:
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            self.sharded = True
            self.sharded_accumulation = sharded_accumulation
        return model

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, enabled: bool) -> Iterator[None]:
        """Skip the gradient reduce-scatter on all but the last micro-batch of a step, unless
        gradients accumulate sharded (a reduce-scatter after every micro-batch)."""
        if self.sharded:
            model.set_requires_gradient_sync(enabled or self.sharded_accumulation)
        yield

    @property
    def loss_scale(self) -> float:
        """FSDP averages gradients over ranks; scaling by the world size turns that into a sum."""
        return float(self.world_size)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ state dicts
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full state dict on CPU, for the single-process checkpoint format (FSDP2 ranks write
        their shards instead: :mod:`hebtron.backends.native_sharded`)."""
        if self.sharded:
            raise RuntimeError("model_state: FSDP2 ranks save sharded checkpoints (native_sharded.save_sharded)")
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not self.sharded:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
