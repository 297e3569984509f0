"""One Megatron-Core training engine: model chunks, DDP, optimizer, forward-backward, checkpoints.

This is what the training loop drives when a recipe says ``backend: megatron``. Everything that
moves tensors is Megatron's own: ``DistributedDataParallel`` (gradient buffers), the
(distributed) optimizer with gradient clipping, ``get_forward_backward_func`` (no pipelining,
1F1B or interleaved, by the parallel state) and ``finalize_model_grads`` (DP / TP / expert
reductions, expert-bias update, division by the global count of loss tokens, hebtron's loss
rule). hebtron supplies the batches, the loss over ``loss_mask`` and the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hebtron.backends.megatron import runtime
from hebtron.backends.megatron.batches import MegatronInputs, to_megatron
from hebtron.backends.megatron.config_map import (
    MoEBalance,
    ParallelPlan,
    Precision,
    SpeedSettings,
    dataclass_fields,
    ddp_kwargs,
    resolve_speed,
    transformer_config,
)
from hebtron.backends.megatron.convert import gather_from_model, load_into_model
from hebtron.backends.megatron.model import build_model
from hebtron.backends.megatron.noise import MegatronNoiseProbe
from hebtron.backends.megatron.specs import choose_layer_spec, dt_clamp_problem, probe_gpu_stack
from hebtron.errors import CheckpointError
from hebtron.model.config import HybridConfig
from hebtron.train.engine import StepGuard, StepResult


ROW_KEYS = ("input_ids", "labels", "loss_mask", "seq_idx", "position_ids", "lang")  # per-token fields used


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    distributed_optimizer: bool = True


class MegatronEngine:
    """Megatron model + optimizer for one HybridConfig on the current process group."""

    def __init__(
        self,
        cfg: HybridConfig,
        plan: ParallelPlan = ParallelPlan(),
        precision: Precision = Precision(),
        balance: MoEBalance = MoEBalance(),
        optim: OptimSettings = OptimSettings(),
        seed: int = 1234,
        use_te: bool | None = None,
        with_optimizer: bool = True,
        speed: SpeedSettings = SpeedSettings(),
        local_spec: bool = False,
        reshardable: bool = False,
    ) -> None:
        """``use_te`` None: :func:`.specs.choose_layer_spec` decides (on CUDA, missing Transformer
        Engine / mamba-ssm kernels stop the run unless ``local_spec``); ``speed``: the recipe's GPU
        speed settings, reduced to what runs here (:attr:`notes` says what was turned off);
        ``reshardable``: optimizer state saved fully reshardable (see :meth:`sharded_state_dict`)."""
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.plan = plan
        self.optim_settings = optim
        self.reshardable = reshardable
        cuda = torch.cuda.is_available()
        mamba = "M" in cfg.hybrid_override_pattern
        if use_te is None:  # decided before any process group exists: a missing kernel costs no rendezvous
            use_te = choose_layer_spec(probe_gpu_stack(), local_spec, mamba)
        self.use_te = use_te
        self.speed, notes = resolve_speed(speed, cuda=cuda, te=use_te, moe="E" in cfg.hybrid_override_pattern,
                                          distributed_optimizer=optim.distributed_optimizer)
        clamp = dt_clamp_problem() if use_te and mamba else None
        self.notes: tuple[str, ...] = notes + ((f"Mamba dt is not clamped at time_step_min on this GPU path: {clamp}",)
                                               if clamp else ())
        # micro-batch gradient norms are read before the data-parallel reduction, which an
        # overlapped reduction starts during backward
        self.noise_blocked: str | None = (
            "megatron.overlap_grad_reduce reduces gradients during backward, before the noise probe reads them"
            if self.speed.overlap_grad_reduce else None
        )
        runtime.init_model_parallel(plan, seed)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.config = transformer_config(cfg, plan, precision, balance, te=self.use_te, speed=self.speed)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.chunks = self._build_chunks(with_optimizer)
        self.noise_probe = MegatronNoiseProbe(self._grad_buffers, self._dp_all_reduce_sum)
        self.optimizer = self._build_optimizer() if with_optimizer else None

    # ------------------------------------------------------------------ building
    def _build_chunks(self, wrap_ddp: bool) -> list[torch.nn.Module]:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        vpp = self.plan.vpp if self.plan.vpp and self.plan.vpp > 1 else None
        chunks = []
        for stage in range(vpp or 1):
            kwargs = {"vp_stage": stage} if vpp else {}
            pre = ps.is_pipeline_first_stage(ignore_virtual=False, **kwargs)
            post = ps.is_pipeline_last_stage(ignore_virtual=False, **kwargs)
            model = build_model(self.cfg, self.config, pre_process=pre, post_process=post, use_te=self.use_te)
            model.to(self.device)
            if self.config.bf16:  # bf16 compute copy; the optimizer keeps fp32 main parameters
                from megatron.core.transformer.module import Float16Module

                model = Float16Module(self.config, model)
            chunks.append(model)
        if not wrap_ddp:
            return chunks
        # fp32 gradient reduction; overlaps as the recipe asks where they run (resolve_speed),
        # under the field names of the installed megatron-core
        ddp_config = DistributedDataParallelConfig(**ddp_kwargs(
            self.speed, self.optim_settings.distributed_optimizer, dataclass_fields(DistributedDataParallelConfig)))
        wrapped = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        for chunk in wrapped:
            chunk.broadcast_params()
        return wrapped

    def _build_optimizer(self):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.optim_settings
        config = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.grad_clip,
            bf16=self.config.bf16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=o.distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(config, self.chunks, use_gloo_process_groups=not torch.cuda.is_available())

        def finalize(*args: Any, **kwargs: Any) -> None:
            self.noise_probe.before_finalize()  # the last micro-batch's local gradient, before reduction
            finalize_model_grads(*args, **kwargs)

        self.config.finalize_model_grads_func = finalize
        self.config.grad_scale_func = optimizer.scale_loss
        self.config.no_sync_func = [chunk.no_sync for chunk in self.chunks]
        if len(self.chunks) == 1:
            self.config.no_sync_func = self.config.no_sync_func[0]
        return optimizer

    def _grad_buffers(self) -> list[torch.Tensor]:
        """This rank's local gradient buffers (dense and expert), for the noise probe."""
        return [buffer.grad_data for chunk in self.chunks for buffer in chunk.buffers + chunk.expert_parallel_buffers]

    def _dp_all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        dist.all_reduce(tensor, group=ps.get_data_parallel_group())
        return tensor

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The bare Megatron models (no DDP wrapper), one per virtual pipeline stage."""
        out = []
        for chunk in self.chunks:
            while hasattr(chunk, "module"):  # DDP, then Float16Module
                chunk = chunk.module
            out.append(chunk)
        return out

    # ------------------------------------------------------------------ data
    def rank_rows(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This data-parallel rank's rows of a global batch (tensor/pipeline peers get the same)."""
        rows = batch["input_ids"].shape[0]
        per = rows // self.dp_size
        start = self.dp_rank * per
        return {k: batch[k][start : start + per] for k in ROW_KEYS if k in batch}

    def micro_inputs(self, rows: Mapping[str, torch.Tensor], micro_batch: int) -> list[MegatronInputs]:
        """Split this rank's rows into micro-batches in Megatron's layout (see :meth:`inputs_for`)."""
        total = rows["input_ids"].shape[0]
        return self.inputs_for([{k: rows[k][s : s + micro_batch] for k in ROW_KEYS if k in rows}
                                for s in range(0, total, micro_batch)])

    def inputs_for(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> list[MegatronInputs]:
        """hebtron micro-batches in Megatron's layout, on the device; all THD if any is packed."""
        micros = [{k: m[k] for k in ROW_KEYS if k in m} for m in micro_batches]
        converted = [to_megatron(m) for m in micros]
        if any(c.packed for c in converted) and not all(c.packed for c in converted):
            converted = [to_megatron(m, force_packed=True) for m in micros]
        return [
            MegatronInputs(*(t.to(self.device) if torch.is_tensor(t) else t for t in (c.tokens, c.labels, c.loss_mask)),
                           _params_to(c.packed_seq_params, self.device), c.rows)
            for c in converted
        ]

    # ------------------------------------------------------------------ compute
    def _forward_step(self, data_iterator: Iterator[MegatronInputs], model: torch.nn.Module):
        self.noise_probe.before_forward()
        inputs = next(data_iterator)
        labels = inputs.labels.clamp(min=0)  # masked positions may hold -100; their loss is masked out
        output = model(inputs.tokens, None, None, labels=labels, packed_seq_params=inputs.packed_seq_params)
        return output, partial(_masked_loss_sum, inputs.loss_mask)

    def forward_backward(self, micros: Sequence[MegatronInputs], forward_only: bool = False) -> tuple[float, int]:
        """Megatron's schedule over the micro-batches; returns the global (all DP ranks) loss sum and tokens."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        first = micros[0]
        seq_length, mbs = first.tokens.shape[1], first.tokens.shape[0]
        iterators: Any = iter(micros)
        if len(self.chunks) > 1:
            iterators = [iter(micros) for _ in self.chunks]
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators,
            model=self.chunks,
            num_microbatches=len(micros),
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for item in losses:
                totals[0] += item["loss_sum"].double()
                totals[1] += item["tokens"].double()
        # last pipeline stage holds the losses; sum over pipeline and data-parallel ranks
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        return float(totals[0]), int(totals[1])

    def train_step(self, micros: Sequence[MegatronInputs], lr: float, measure_noise: bool = False,
                   guard: StepGuard | None = None) -> StepResult:
        """One optimizer step; ``measure_noise`` also reads each micro-batch's gradient norm
        (see :mod:`.noise`; the plan must allow it). ``guard(loss, grad_norm)`` decides before
        the update: True skips it on every rank (both numbers are global, so all ranks agree)."""
        assert self.optimizer is not None, "built without an optimizer"
        if measure_noise:
            self.noise_probe.begin([float(m.loss_mask.double().sum()) for m in micros])
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        for chunk in self.chunks:
            chunk.train()
        for group in self.optimizer.param_groups:  # what Megatron's param scheduler would set
            group["lr"] = lr * group.get("lr_mult", 1.0)
            # wd_mult is 0 for biases and 1-D parameters (norms, A_log, D, dt_bias), as natively
            group["weight_decay"] = self.optim_settings.weight_decay * group.get("wd_mult", 1.0)
        loss_sum, tokens = self.forward_backward(micros)
        updated, norm = self._guarded_update(loss_sum / max(tokens, 1), guard)
        noise = self.noise_probe.measurement(tokens, norm, float(self.optimizer.get_loss_scale()))
        return StepResult(loss_sum, tokens, norm, not updated, noise if updated else None)

    @torch.no_grad()
    def _guarded_update(self, loss: float, guard: StepGuard | None) -> tuple[bool, float]:
        """Megatron's ``optimizer.step()`` with the guard between the norm and the update:
        gradients to main gradients (fp16 overflow check), global norm, guard, clip, step."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        optimizer = self.optimizer
        if optimizer.prepare_grads():  # fp16 loss scaling found inf/nan: Megatron skips too
            return False, float("nan")
        norm = float(optimizer.get_grad_norm())
        if guard is not None and guard(loss, norm):
            return False, norm
        clip = self.optim_settings.grad_clip
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = sub.get_parameters() if not getattr(sub, "is_stub_optimizer", False) else []
            if clip > 0 and params:
                clip_grad_by_total_norm_fp32(params, clip, norm,
                                             sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        return bool(optimizer.step_with_ready_grads()), norm

    @torch.no_grad()
    def evaluate(self, micros: Sequence[MegatronInputs]) -> tuple[float, int]:
        for chunk in self.chunks:
            chunk.eval()
        return self.forward_backward(micros, forward_only=True)

    @torch.no_grad()
    def logits(self, inputs: MegatronInputs) -> torch.Tensor:
        """Full-vocabulary logits (pp=1), gathered across tensor-parallel ranks: (b, T, vocab)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        model = self.modules[0]
        model.eval()
        out = model(inputs.tokens, None, None, packed_seq_params=inputs.packed_seq_params)
        return gather_from_tensor_model_parallel_region(out).float()

    # ------------------------------------------------------------------ weights
    def load_weights(self, canon: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]) -> None:
        """Fill this rank's shards from whole canonical tensors (see :mod:`.convert`)."""
        for module in self.modules:
            load_into_model(module, canon)
        if self.optimizer is not None:
            self.optimizer.reload_model_params()

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """Whole canonical tensors, same on every rank (small models: preflight and tests)."""
        out: dict[str, torch.Tensor] = {}
        for module in self.modules:
            out.update(gather_from_model(module))
        return out

    # ------------------------------------------------------------------ checkpoints
    def layout(self) -> dict[str, Any]:
        """This engine's checkpoint layout: what the optimizer-state formats depend on."""
        p = self.plan
        return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp if p.vpp and p.vpp > 1 else None, "cp": p.cp, "ep": p.ep,
                "etp": p.expert_tp, "dp": self.dp_size,
                "distributed_optimizer": self.optim_settings.distributed_optimizer}

    def sync_params(self) -> None:
        """Finish the distributed optimizer's parameter all-gather now. With overlap_param_gather
        it would only run at the next forward, so a save right after a step would write the
        previous step's weights (Megatron's own loop does the same before saving)."""
        for chunk in self.chunks:
            if getattr(chunk, "use_forward_hook", False):
                chunk.start_param_sync(force_sync=True)

    def sharded_state_dict(self, with_optimizer: bool = True, is_loading: bool = False,
                           checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
        """Model and optimizer shards for ``megatron.core.dist_checkpointing``.

        Saving: the distributed optimizer's state is ``dp_reshardable`` (each rank writes its own
        shard: no gather, no extra memory; reloads at another dp only) unless ``reshardable``
        (``fully_reshardable``: gathered over data-parallel ranks; reloads at any tp / ep / pp / dp).
        The format and the layout go into the checkpoint's content metadata. Loading
        (``checkpoint_dir``): the format the checkpoint holds (checkpoints without the metadata
        are fully reshardable, what hebtron wrote before), and a layout it cannot reload at is
        one CheckpointError (:func:`check_resume_layout`)."""
        if not is_loading:
            self.sync_params()
        state: dict[str, Any] = {}
        if len(self.chunks) == 1:
            state["model"] = self.modules[0].sharded_state_dict()
        else:
            for i, module in enumerate(self.modules):
                state[f"model{i}"] = module.sharded_state_dict()
        if with_optimizer and self.optimizer is not None:
            if is_loading:
                saved = _content_metadata(checkpoint_dir) if checkpoint_dir is not None else None
                check_resume_layout(saved, self.layout(), str(checkpoint_dir))
                sharding = (saved or {}).get(SHARDING_KEY, FULLY_RESHARDABLE)
            else:
                sharding = FULLY_RESHARDABLE if self.reshardable else DP_RESHARDABLE
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state, is_loading=is_loading,
                metadata={SHARDING_KEY: sharding, "chained_optim_avoid_prefix": True},
            )
            if not is_loading:  # after the optimizer walked the model shards: plain values, common state
                state[CONTENT_METADATA] = {SHARDING_KEY: sharding, "hebtron_layout": self.layout()}
        return state

    def save_checkpoint(self, directory: str | Path, with_optimizer: bool = True) -> None:
        """A Megatron distributed checkpoint: every rank writes its shards; reloads at any tp/ep/pp.

        megatron-core writes through writer processes forked on every save. They are started
        with SIGUSR1/SIGTERM blocked (inherited mask), so a stop signal sent to every process of
        the Slurm step, or by torchrun to the rank's process group, leaves them alive for the save
        it asks for (:mod:`hebtron.train.stop_signals`). Their results come back through an
        in-process queue (:func:`_in_process_write_results`)."""
        from megatron.core import dist_checkpointing

        from hebtron.train import stop_signals

        _in_process_write_results()
        directory = Path(directory)
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        with stop_signals.blocked():
            dist_checkpointing.save(self.sharded_state_dict(with_optimizer), str(directory))
        dist.barrier()

    def load_checkpoint(self, directory: str | Path, with_optimizer: bool = True) -> None:
        from megatron.core import dist_checkpointing

        directory = Path(directory)
        if not (directory / "metadata.json").is_file():
            raise CheckpointError(f"{directory}: not a Megatron distributed checkpoint (no metadata.json)")
        state = self.sharded_state_dict(with_optimizer, is_loading=True, checkpoint_dir=directory)
        loaded = dist_checkpointing.load(state, str(directory))
        if len(self.chunks) == 1:
            self.modules[0].load_state_dict(loaded["model"], strict=False)
        else:
            for i, module in enumerate(self.modules):
                module.load_state_dict(loaded[f"model{i}"], strict=False)
        if self.optimizer is not None:
            # the optimizer's main parameters are its own copies: without this, a resumed run's first
            # update would apply to the weights it was built with, not the checkpoint's (fp32 runs);
            # with bf16 the fp32 main weights saved in the optimizer state then override these
            self.optimizer.reload_model_params()
        if with_optimizer and self.optimizer is not None and "optimizer" in loaded:
            try:
                # no_grad: megatron-core (0.16.1 to 0.19) loads dp_reshardable state by copying in place
                # into the main parameters, which for fp32 parameters are views of the model's leaves
                with torch.no_grad():
                    self.optimizer.load_state_dict(loaded["optimizer"])
            except (RuntimeError, KeyError, ValueError) as err:
                raise CheckpointError(
                    f"{directory}: the optimizer state does not fit this layout ({err}); weights reshard to any "
                    "tp/ep/pp, optimizer state only while the expert/dense optimizer split is unchanged "
                    "(ep = 1 vs ep > 1): resume at the saved expert parallelism"
                ) from None
            _unshare_adam_steps(self.optimizer)

    def close(self) -> None:
        """Drop Megatron's parallel state (the torch.distributed group stays for the next engine)."""
        from megatron.core import parallel_state

        self.chunks, self.optimizer = [], None
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


# megatron-core's names (optimizer/distrib_optimizer.py, dist_checkpointing/serialization.py; the
# same in 0.16.1 and 0.19): the metadata key choosing the distributed optimizer's checkpoint format,
# two of its values, and the top-level key dist_checkpointing keeps content metadata under
SHARDING_KEY = "distrib_optim_sharding_type"
DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
CONTENT_METADATA = "content_metadata"
_MODEL_PARALLEL = ("tp", "pp", "vpp", "cp", "ep", "etp")


def _in_process_write_results() -> None:
    """Collect the checkpoint writers' results through an in-process queue.

    For a synchronous save (hebtron's only kind) megatron-core's writer hands its results from
    the training process to itself, yet through a queue served by a ``multiprocessing.Manager``
    it spawns at the first save and keeps for the run. That server imports torch to unpickle the
    first results (about 2 s per rank per run) and is one more process for a stop signal to kill
    mid-save. A ``queue.Queue`` does the same job here. Left alone where megatron-core has moved
    the queue (another release), or where a queue already exists."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def _content_metadata(directory: str | Path) -> dict[str, Any] | None:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_content_metadata(str(directory))


def check_resume_layout(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> None:
    """Refuse, with one line, optimizer state that cannot be reloaded at ``current``.

    ``saved`` is the checkpoint's content metadata (None: a checkpoint from before hebtron
    recorded it, fully reshardable). A dp_reshardable checkpoint holds the distributed
    optimizer's buckets as laid out at its tensor / pipeline / context / expert parallel sizes,
    so only dp may change; switching the distributed optimizer on or off changes the format."""
    if not saved or "hebtron_layout" not in saved:
        return
    layout = saved["hebtron_layout"]
    if layout.get("distributed_optimizer") != current.get("distributed_optimizer"):
        raise CheckpointError(
            f"{where}: the optimizer state was saved with megatron.distributed_optimizer: "
            f"{str(layout.get('distributed_optimizer')).lower()}; resume with the same setting"
        )
    if not current.get("distributed_optimizer") or saved.get(SHARDING_KEY) != DP_RESHARDABLE:
        return
    changed = [k for k in _MODEL_PARALLEL if layout.get(k) != current.get(k)]
    if changed:
        then = " ".join(f"{k}={layout.get(k)}" for k in changed)
        now = " ".join(f"{k}={current.get(k)}" for k in changed)
        raise CheckpointError(
            f"{where}: the optimizer state is dp_reshardable, saved at {then}, and reloads only at that layout "
            f"(this run: {now}; dp may differ); resume there with checkpoint.reshardable: true to write a checkpoint "
            "that reloads at any layout"
        )


def _unshare_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam step counter after a reload.

    Megatron's reshardable optimizer state stores one step per parameter group and hands the
    same tensor to every parameter's state; torch's Adam increments each parameter's step in
    place, so a shared tensor would advance once per parameter per update and the bias
    correction of every resumed step would be wrong (a resumed run then drifts from one that
    never stopped, from its second step on)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = step.clone()


def _masked_loss_sum(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's per-token-loss contract: (sum over loss tokens, their count, values to report)."""
    loss_sum = (per_token_loss.float() * loss_mask.reshape(per_token_loss.shape)).sum()
    tokens = loss_mask.sum().to(torch.int)
    return loss_sum, tokens, {"loss_sum": loss_sum.detach().clone(), "tokens": tokens.detach().clone()}


def _params_to(params: Any, device: torch.device) -> Any:
    if params is None:
        return None
    for name in ("cu_seqlens_q", "cu_seqlens_kv"):
        setattr(params, name, getattr(params, name).to(device))
    return params
