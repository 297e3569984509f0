"""The Megatron-Core engine of hebtron's training loop (``backend: megatron``).

:class:`MegatronTrainEngine` implements :class:`hebtron.train.engine.TrainEngine` on top of
:class:`.step.MegatronEngine`: it builds Megatron's hybrid model at the recipe's tp / ep / pp /
cp, reads ``model.hf_path`` shard by shard, runs one optimizer step through Megatron's
forward-backward function, DDP buffers, distributed optimizer and ``finalize_model_grads``
(with the NaN guard deciding before the update), evaluates, and writes Megatron distributed
checkpoints in hebtron's run layout (:mod:`.checkpoint`). The run itself (schedule, data, guards,
batch size, metrics, signals, cadence) is :class:`hebtron.train.loop.Trainer`'s, as on native.

Data: the trainer hands each data-parallel rank its own rows; tensor / pipeline / context peers
get the same rows. The loss is summed over loss tokens and divided by their global count
(Megatron's ``calculate_per_token_loss``), hebtron's rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from hebtron.backends.megatron import checkpoint as mcheckpoint
from hebtron.backends.megatron import runtime
from hebtron.backends.megatron.config_map import settings_from_recipe
from hebtron.backends.megatron.noise import unsupported_reason
from hebtron.backends.megatron.step import MegatronEngine, OptimSettings
from hebtron.errors import UserError
from hebtron.recipe import Recipe
from hebtron.train.engine import ProcessGroupOps, StepPlan, StepResult
from hebtron.train.setup import model_config


class MegatronOps(ProcessGroupOps):
    """The run loop's view of the process group, over Megatron's engine."""

    def __init__(self, engine: MegatronEngine) -> None:
        self.rank, self.world_size = engine.rank, engine.world_size
        self.device = engine.device
        self.distributed = self.world_size > 1


class MegatronTrainEngine:
    """Megatron-Core doing the model work of one hebtron run."""

    def __init__(self, recipe: Recipe, tokenizer: Any) -> None:
        if recipe.backend != "megatron":
            raise UserError(f"backend: the Megatron engine needs backend: megatron, got {recipe.backend}")
        if not torch.cuda.is_available():
            from hebtron.backends.megatron import compat

            compat.apply()  # CPU runs are tests and preflight-sized experiments
        train = recipe.train
        self.recipe = recipe
        settings = settings_from_recipe(recipe)
        self.config = model_config(recipe, tokenizer)
        _, world = runtime.init_distributed()
        runtime.check_world(settings.plan, world, where="recipe: parallel")
        from hebtron.backends.megatron.preflight import check_seq_len

        check_seq_len(recipe.data.seq_len, settings.plan, "recipe")
        optim = OptimSettings(train.lr, train.min_lr, train.weight_decay, train.adam_beta1, train.adam_beta2,
                              train.adam_eps, train.grad_clip if train.grad_clip > 0 else 0.0,
                              recipe.megatron.distributed_optimizer)
        torch.manual_seed(train.seed)
        self.engine = MegatronEngine(self.config, settings.plan, settings.precision, settings.balance, optim,
                                     seed=train.seed, speed=settings.speed, local_spec=settings.local_spec,
                                     reshardable=settings.reshardable)
        self.ops = MegatronOps(self.engine)
        self.dp_rank, self.dp_size = self.engine.dp_rank, self.engine.dp_size
        self._noise_blocked = unsupported_reason(settings.plan) or self.engine.noise_blocked
        if recipe.batch_size.policy == "adaptive" and self._noise_blocked:
            raise UserError(f"recipe: batch_size.policy: adaptive needs the gradient noise scale, but "
                            f"{self._noise_blocked}; use policy fixed or steps with this plan")
        self.router_monitor, self.router_alarm = self._router_monitor()

    def notes(self) -> list[str]:
        return list(self.engine.notes)  # GPU speed settings turned off here, an unclamped dt

    def load_pretrained(self) -> None:
        if self.recipe.model.hf_path is None:
            return
        from hebtron.backends.megatron.checkpoint_io import LazyHFState
        from hebtron.backends.megatron.convert import lazy_canonical

        hf_dir = Path(self.recipe.model.hf_path)
        self.engine.load_weights(lazy_canonical(LazyHFState(hf_dir, self.config), self.config))

    def noise_usable(self, micro_batches_per_rank: int) -> bool:
        return not self._noise_blocked and micro_batches_per_rank * self.dp_size > 1

    # ------------------------------------------------------------------ routers
    def _router_monitor(self) -> tuple[Any, Any]:
        """Routing figures per layer and language from Megatron's routers (``moe.monitor``)."""
        from megatron.core import parallel_state as ps

        from hebtron.backends.megatron.routers import MegatronRouterMonitor
        from hebtron.monitor.alarm import CollapseAlarm

        moe = self.recipe.moe
        layers = [i for i, kind in enumerate(self.config.layer_types) if kind == "moe"]
        if not layers or moe.monitor.interval == 0:
            return None, None
        first = min(layers)
        holds_first = any(int(getattr(m, "layer_number", 0)) - 1 == first
                          for module in self.engine.modules for m in module.modules()
                          if type(m).__name__ == "TopKRouter")
        monitor = MegatronRouterMonitor(
            self.engine.modules, layers, self.config.n_routed_experts, self.config.num_experts_per_tok,
            ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            bool(self.engine.config.sequence_parallel), holds_first, self.engine.device,
        )
        alarm = CollapseAlarm(moe.alarms, self.config.n_routed_experts, self.config.num_experts_per_tok) if moe.alarms else None
        return monitor, alarm

    def _router_figures(self, step: int, result: StepResult) -> None:
        """On monitor steps: figures summed over ranks, then the collapse alarms (collective)."""
        from hebtron.monitor.router import metrics_fields

        if self.router_monitor is None or step % self.recipe.moe.monitor.interval:
            return
        stats = self.router_monitor.stats
        stats.reduce(self.ops.all_reduce_sum)
        summary = stats.summary(self.recipe.moe.monitor.active_threshold)
        stats.reset()
        result.figures.update(metrics_fields(summary))
        for event in (self.router_alarm.check(summary, step) if self.router_alarm else []):
            if event.action == "stop":
                text = f"{event.message} -> stopping the run (moe.alarms[{event.rule}].action: stop)"
                result.stop = result.stop or text
            else:  # raise_aux would change Megatron's per-layer aux coefficients: warn instead
                text = f"{event.message} -> warning only on the megatron backend (action {event.action})"
            result.figures.setdefault("router_alarm", []).append(text)
            result.messages.append(text)

    # ------------------------------------------------------------------ one step
    def train_step(self, plan: StepPlan) -> StepResult:
        micros = self.engine.inputs_for(plan.micro_batches)
        if self.router_monitor is not None:
            from hebtron.backends.megatron.routers import micro_slots

            self.router_monitor.begin([micro_slots(m, inputs, plan.pad_id)
                                       for m, inputs in zip(plan.micro_batches, micros, strict=True)])
        result = self.engine.train_step(micros, plan.lr, measure_noise=plan.measure_noise, guard=plan.guard)
        self._router_figures(plan.step, result)
        return result

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
        """Every rank runs the same rows; each data-parallel replica's sum is counted once."""
        total, tokens = 0.0, 0
        for batch in batches:
            micros = self.engine.micro_inputs(batch, next(iter(batch.values())).shape[0])
            loss_sum, count = self.engine.evaluate(micros)
            total += loss_sum / self.dp_size  # identical rows on every data-parallel rank
            tokens += count // self.dp_size
        return total, float(tokens)

    # --------------------------------------------------------------- checkpoints
    def save(self, root: Path, step: int, extra: dict[str, Any], keep_last: int | None) -> Path | None:
        config_json = json.dumps(self.config.to_hf_dict(), indent=2, sort_keys=True)
        path = mcheckpoint.save(self.engine, root, step, extra, config_json, keep_last=keep_last)
        return path if self.ops.is_main else None

    def load(self, path: Path) -> dict[str, Any]:
        return mcheckpoint.load(self.engine, path)

    def close(self) -> None:
        if self.router_monitor is not None:
            self.router_monitor.close()
        self.engine.close()
        runtime.shutdown()
