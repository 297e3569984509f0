"""hebtron's training loop on the Megatron-Core backend (``backend: megatron``).

:class:`MegatronTrainer` reuses :class:`hebtron.train.loop.Trainer`'s run loop (evaluation and
checkpoint cadence, metrics, progress, signals, guards) and replaces what touches the model:
building it (Megatron's hybrid model at the recipe's tp / ep / pp / cp, weights read shard by
shard from ``model.hf_path``), one optimizer step (Megatron's forward-backward function, DDP
buffers, distributed optimizer, ``finalize_model_grads``), evaluation and checkpoints (Megatron
distributed checkpoints, see :mod:`.checkpoint`).

Data: every rank draws the same global batch from the deterministic pipeline (as the native
loop does) and keeps its data-parallel slice; tensor / pipeline / context peers take the same
rows. The loss is summed over loss tokens and divided by their global count (Megatron's
``calculate_per_token_loss``), hebtron's rule.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from hebtron.backends.megatron import checkpoint as mcheckpoint
from hebtron.backends.megatron import runtime
from hebtron.backends.megatron.config_map import settings_from_recipe
from hebtron.backends.megatron.noise import unsupported_reason
from hebtron.backends.megatron.step import MegatronEngine, OptimSettings
from hebtron.backends.native import ProcessGroupOps
from hebtron.errors import UserError
from hebtron.model.config import HybridConfig
from hebtron.recipe import Recipe
from hebtron.train.checkpoint import capture_rng
from hebtron.train.loop import Trainer
from hebtron.train.setup import load_tokenizer


class MegatronBackend(ProcessGroupOps):
    """The run loop's view of the process group, over Megatron's engine."""

    def __init__(self, engine: MegatronEngine) -> None:
        self.engine = engine
        self.rank, self.world_size = engine.rank, engine.world_size
        self.device = engine.device
        self.distributed = self.world_size > 1

    def close(self) -> None:
        self.engine.close()
        runtime.shutdown()


def model_config(recipe: Recipe, tokenizer: Any) -> HybridConfig:
    """The architecture: the checkpoint's config.json, or ``model.init`` completed from the tokenizer."""
    if recipe.model.hf_path is not None:
        return HybridConfig.from_json_file(Path(recipe.model.hf_path) / "config.json")
    raw = dict(recipe.model.init or {})
    raw.setdefault("vocab_size", len(tokenizer))
    raw.setdefault("pad_token_id", tokenizer.pad_token_id)
    raw.setdefault("bos_token_id", tokenizer.bos_token_id)
    raw.setdefault("eos_token_id", tokenizer.eos_token_id)
    return HybridConfig.from_dict(raw, source="recipe: model.init")


class MegatronTrainer(Trainer):
    """The loop of :class:`Trainer` with Megatron-Core doing the model work."""

    def __init__(self, recipe: Recipe, resume: str | None = None) -> None:  # noqa: D107 (no super().__init__)
        self.recipe = recipe
        train = recipe.train
        if recipe.backend != "megatron":
            raise UserError(f"backend: MegatronTrainer needs backend: megatron, got {recipe.backend}")
        if not torch.cuda.is_available():
            from hebtron.backends.megatron import compat

            compat.apply()  # CPU runs are tests and preflight-sized experiments
        settings = settings_from_recipe(recipe)
        self.tokenizer = load_tokenizer(recipe.tokenizer.path)
        self.config = model_config(recipe, self.tokenizer)
        rank, world = runtime.init_distributed()
        runtime.check_world(settings.plan, world, where="recipe: parallel")
        from hebtron.backends.megatron.preflight import check_seq_len

        check_seq_len(recipe.data.seq_len, settings.plan, "recipe")
        optim = OptimSettings(train.lr, train.min_lr, train.weight_decay, train.adam_beta1, train.adam_beta2,
                              train.adam_eps, train.grad_clip if train.grad_clip > 0 else 0.0,
                              recipe.megatron.distributed_optimizer)
        torch.manual_seed(train.seed)
        self.engine = MegatronEngine(self.config, settings.plan, settings.precision, settings.balance, optim,
                                     seed=train.seed)
        self.backend = MegatronBackend(self.engine)
        per_step = train.micro_batch * self.engine.dp_size
        if train.global_batch % per_step:
            raise UserError(f"recipe: train.global_batch ({train.global_batch}) must be a multiple of "
                            f"micro_batch x data-parallel ranks ({per_step})")
        self.model = None  # Megatron's model chunks live in self.engine
        self.optimizer = self.engine.optimizer
        self._init_run_parts()
        self._noise_blocked = unsupported_reason(settings.plan)
        if recipe.batch_size.policy == "adaptive" and self._noise_blocked:
            raise UserError(f"recipe: batch_size.policy: adaptive needs the gradient noise scale, but {self._noise_blocked}; "
                            "use policy fixed or steps with this plan")
        self.moe = None  # Megatron computes the aux losses and updates the expert bias itself
        self.router_monitor, self.router_alarm = self._router_monitor()
        if self._open_run(resume) is None and recipe.model.hf_path is not None:
            self._load_hf(Path(recipe.model.hf_path))  # a fresh run (or --resume auto with no checkpoint yet)

    def _load_hf(self, hf_dir: Path) -> None:
        from hebtron.backends.megatron.checkpoint_io import LazyHFState
        from hebtron.backends.megatron.convert import lazy_canonical

        self.engine.load_weights(lazy_canonical(LazyHFState(hf_dir, self.config), self.config))

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
            bool(self.engine.config.sequence_parallel), holds_first,
        )
        alarm = CollapseAlarm(moe.alarms, self.config.n_routed_experts, self.config.num_experts_per_tok) if moe.alarms else None
        return monitor, alarm

    def _router_record(self) -> dict[str, Any]:
        """On monitor steps: figures summed over ranks, then the collapse alarms (collective)."""
        from hebtron.monitor.router import metrics_fields
        from hebtron.train.guards import TrainingAborted

        if self.router_monitor is None or self.step % self.recipe.moe.monitor.interval:
            return {}
        stats = self.router_monitor.stats
        stats.reduce(self.backend.all_reduce_sum)
        summary = stats.summary(self.recipe.moe.monitor.active_threshold)
        stats.reset()
        out = metrics_fields(summary)
        stop = None
        for event in (self.router_alarm.check(summary, self.step) if self.router_alarm else []):
            if event.action == "stop":
                text = f"{event.message} -> stopping the run (moe.alarms[{event.rule}].action: stop)"
                stop = stop or text
            else:  # raise_aux would change Megatron's per-layer aux coefficients: warn instead
                text = f"{event.message} -> warning only on the megatron backend (action {event.action})"
            out.setdefault("router_alarm", []).append(text)
            self._say(text)
        if stop is not None:
            raise TrainingAborted(stop)
        return out

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        recipe, train = self.recipe, self.recipe.train
        t0 = time.perf_counter()
        global_batch, step_tokens, lr = self._plan_step()
        phase = self.data.phase_name
        batch = self.data.next_batch(global_batch)
        rows = self.engine.rank_rows(batch)
        micros = self.engine.micro_inputs(rows, train.micro_batch)
        if self.router_monitor is not None:
            from hebtron.backends.megatron.routers import micro_slots

            pad = getattr(self.data, "pad_id", self.config.pad_token_id)
            mb = train.micro_batch
            self.router_monitor.begin([
                micro_slots({k: v[i * mb : (i + 1) * mb] for k, v in rows.items()}, inputs, pad)
                for i, inputs in enumerate(micros)
            ])
        measure = self._measure_now() and not self._noise_blocked and len(micros) * self.engine.dp_size > 1
        result = self.engine.train_step(micros, lr, measure_noise=measure)
        loss_tokens = result.loss_tokens
        skipped = self.nan_guard.check(result.loss, result.grad_norm, self.step + 1) or result.skipped
        self.step += 1
        self.tokens += step_tokens
        if self.early_kill is not None:
            self.early_kill.update(self.step, result.loss)
        record = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": step_tokens / (time.perf_counter() - t0),
            "loss_tokens": loss_tokens,
            "skipped_steps": self.nan_guard.total,
            "phase": phase,
        }
        record.update(self._batch_size_step(global_batch, loss_tokens, None if skipped else result.noise))
        record.update(self._router_record())
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss per validation source; every rank runs the same rows, counted once."""
        out = {}
        for name, batches in self.valid.items():
            total, tokens = 0.0, 0
            for batch in batches:
                micros = self.engine.micro_inputs(batch, next(iter(batch.values())).shape[0])
                loss_sum, count = self.engine.evaluate(micros)
                total += loss_sum / self.engine.dp_size  # identical rows on every data-parallel rank
                tokens += count // self.engine.dp_size
            out[name] = total / max(tokens, 1)
        return out

    # --------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        extra = {
            "tokens": self.tokens,
            "data": self.data.state_dict(),
            "schedule": self.schedule.state_dict(),
            "nan_guard": self.nan_guard.state_dict(),
            "early_kill": self.early_kill.state_dict() if self.early_kill else None,
            "val_loss_start": self.val_loss_start,
            **self._batch_size_state(),
            "rng": capture_rng(),
            "tokenizer": str(self.recipe.tokenizer.path),
            "chat_template": self._chat_template,
            "world_size": self.backend.world_size,
            "backend": "megatron",
        }
        config_json = json.dumps(self.config.to_hf_dict(), indent=2, sort_keys=True)
        path = mcheckpoint.save(self.engine, self.ckpt_dir, self.step, extra, config_json,
                                keep_last=self.recipe.checkpoint.keep_last)
        return path if self.backend.is_main else None

    def _load(self, path: Path) -> None:
        self._restore_run_state(mcheckpoint.load(self.engine, path))

    def close(self) -> None:
        self.backend.close()
