"""Process groups for Megatron-Core: the torch.distributed group, then Megatron's parallel state.

gloo on CPU (preflight and tests, after :func:`hebtron.backends.megatron.compat.apply`), nccl on
GPU. A world size that does not fit the parallel plan gets one line naming the degrees.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from hebtron.backends.megatron.config_map import ParallelPlan
from hebtron.errors import UserError


def check_world(plan: ParallelPlan, world_size: int, where: str = "parallel") -> None:
    """tp x pp x cp x dp must equal the ranks started; ep x etp must fit in the data-parallel x
    context x tensor ranks of one pipeline stage (Megatron's expert grid)."""
    model = plan.tp * plan.pp * plan.cp
    if world_size % model:
        raise UserError(
            f"{where}: tp x pp x cp = {plan.tp} x {plan.pp} x {plan.cp} = {model} does not divide the "
            f"{world_size} ranks available"
        )
    if plan.dp * model != world_size:
        raise UserError(
            f"{where}: dp x tp x pp x cp = {plan.dp} x {plan.tp} x {plan.pp} x {plan.cp} = {plan.dp * model} "
            f"ranks, but {world_size} were started (set parallel.dp={world_size // model})"
        )
    stage = plan.dp * plan.cp * plan.tp
    if stage % (plan.ep * plan.expert_tp):
        raise UserError(
            f"{where}: ep x expert-tp = {plan.ep} x {plan.expert_tp} does not fit the {stage} ranks of a pipeline "
            f"stage (dp x cp x tp = {plan.dp} x {plan.cp} x {plan.tp}); ep must divide it"
        )


def init_distributed(timeout_minutes: int = 10) -> tuple[int, int]:
    """torch.distributed from torchrun's environment (a 1-rank group without it); returns (rank, world)."""
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        from datetime import timedelta

        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(plan: ParallelPlan, seed: int = 1234) -> None:
    """Megatron's parallel state (tp-cp-ep-dp-pp order) and its RNG trackers."""
    from megatron.core import parallel_state

    _, world = init_distributed()
    check_world(plan, world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=plan.tp,
        pipeline_model_parallel_size=plan.pp,
        virtual_pipeline_model_parallel_size=plan.vpp,
        context_parallel_size=plan.cp,
        expert_model_parallel_size=plan.ep,
        expert_tensor_parallel_size=plan.expert_tp,
        create_gloo_process_groups=not torch.cuda.is_available(),
    )
    seed_model_parallel(seed)


def seed_model_parallel(seed: int) -> None:
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def pg_collection() -> Any:
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()
