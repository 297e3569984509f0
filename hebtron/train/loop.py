"""The training loop: one loop for every run, the backend supplies parallelism.

One optimizer step takes ``train.global_batch`` sequences. Every rank draws the same global
batch from the (deterministic) data pipeline and keeps its own slice, so the data order is
the same for any number of ranks, and the global count of loss tokens is known on every rank
without communication. Each micro-batch's summed loss is divided by that global count before
backward, so accumulation and data parallelism do not change the gradient.

Resume restores weights, optimizer, schedule, data position, guards and RNG: a run killed
and resumed with ``--resume auto`` writes the same per-step losses as one never stopped.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hebtron.backends.native import NativeBackend
from hebtron.errors import UserError
from hebtron.model.config import describe
from hebtron.model.hf import hf_tensors_from_state, load_hf_state_dict
from hebtron.recipe import Recipe, dump_recipe
from hebtron.train.checkpoint import capture_rng, find_latest, load_checkpoint, restore_rng, save_checkpoint
from hebtron.train.guards import EarlyKillGuard, NanGuard, TrainingAborted
from hebtron.train.loss import token_loss_sum
from hebtron.train.metrics import MetricsWriter, Progress
from hebtron.train.batch_size import BatchSizePolicy, NoiseScaleEstimator, parse_ramp
from hebtron.train.moe_step import MoEStep
from hebtron.train.noise_probe import GradientNoiseProbe, NoiseMeasurement
from hebtron.train.optim import build_adamw, clip_grad_norm
from hebtron.train.schedule import TokenSchedule, set_lr
from hebtron.train.setup import build_model, build_train_data, build_valid_data, load_tokenizer

MODEL_INPUTS = ("input_ids", "position_ids", "seq_idx")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    tokens: int
    final_checkpoint: Path | None
    val_loss_start: dict[str, float] = field(default_factory=dict)
    val_loss_end: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    stopped_by_signal: bool = False


def split_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of every per-token field (``cu_seqlens`` / ``max_seqlen`` describe the
    whole batch and are rebuilt by consumers)."""
    return {k: v[start:stop] for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    global_loss_tokens: int,
    backend: NativeBackend,
    precision: str = "fp32",
    moe: MoEStep | None = None,
    noise: GradientNoiseProbe | None = None,
) -> torch.Tensor:
    """Backward over the micro-batches; returns this rank's summed loss (fp64, detached).
    ``moe`` adds the MoE aux losses (already globally normalized) and gathers routing figures;
    ``noise`` reads the small-batch gradient norms for the noise-scale estimator."""
    total = torch.zeros((), dtype=torch.float64)
    scale = backend.loss_scale / max(global_loss_tokens, 1)
    if moe is not None:
        moe.begin(micro_batches)
    for i, micro in enumerate(micro_batches):
        micro = {k: v.to(backend.device) for k, v in micro.items()}
        with backend.autocast(precision):
            output = model(**{k: micro[k] for k in MODEL_INPUTS if k in micro})
        logits = output.logits
        loss_sum = token_loss_sum(logits, micro["labels"], micro["loss_mask"])
        loss = loss_sum * scale
        aux = moe.micro_batch_loss(output.routers, micro) if moe is not None else None
        if aux is not None:
            loss = loss + aux * backend.loss_scale
        if noise is not None:
            noise.before_backward(i, len(micro_batches))
        with backend.gradient_sync(model, enabled=i == len(micro_batches) - 1):
            loss.backward()
        if noise is not None:
            noise.after_backward(i, len(micro_batches), float(micro["loss_mask"].double().sum()))
        total += loss_sum.detach().double().cpu()
    return total


class Trainer:
    def __init__(self, recipe: Recipe, resume: str | None = None) -> None:
        self.recipe = recipe
        train = recipe.train
        self.backend = NativeBackend(recipe.parallel.dp)
        self.tokenizer = load_tokenizer(recipe.tokenizer.path)
        model = build_model(recipe, self.tokenizer)
        self.config = model.config
        self.model = self.backend.wrap(model)
        self.optimizer = build_adamw(
            self.model, train.lr, train.weight_decay, (train.adam_beta1, train.adam_beta2), train.adam_eps
        )
        self._init_run_parts()
        self.moe = MoEStep(recipe.moe, self.model, self.backend, getattr(self.data, "pad_id", self.config.pad_token_id))
        if self.moe.note():
            self._say(self.moe.note())
        self.noise_probe = GradientNoiseProbe(self.model, self.backend)
        self._open_run(resume)

    def _init_run_parts(self) -> None:
        """Schedule, data, guards, batch-size control and run position: the same on every backend."""
        recipe, train = self.recipe, self.recipe.train
        self.schedule = TokenSchedule(
            train.schedule, train.lr, train.min_lr, train.warmup_tokens, recipe.planned_tokens,
            recipe.decay_token_count if train.schedule == "wsd" else 0, train.decay_shape,
        )
        self.data = build_train_data(recipe)
        self.valid = build_valid_data(recipe)
        self.nan_guard = NanGuard(train.nan_guard_max_skips)
        kill = train.early_kill
        self.early_kill = EarlyKillGuard(kill.window_steps, kill.margin, kill.ema) if kill.enabled else None
        self.batch_policy, self.noise = _batch_size_control(recipe)
        self._tokens_per_sequence = 0.0
        self.run_dir = Path(recipe.logging.run_dir)
        self.ckpt_dir = Path(recipe.checkpoint.dir)
        self.step = 0
        self.tokens = 0
        self.val_loss_start: dict[str, float] = {}
        self._stop_signal: int | None = None

    def _open_run(self, resume: str | None) -> Path | None:
        """Resume from ``resume`` if it names a checkpoint, then open the metrics; returns the checkpoint."""
        resumed_from = self._resolve_resume(resume)
        if resumed_from is not None:
            self._load(resumed_from)
        self.resumed_from = resumed_from
        self.metrics = MetricsWriter(
            self.run_dir, tensorboard=self.recipe.logging.tensorboard,
            resume_step=self.step if resumed_from is not None else None, enabled=self.backend.is_main,
        )
        return resumed_from

    # ------------------------------------------------------------------ the run
    @property
    def done(self) -> bool:
        if self.recipe.train.total_steps is not None:
            return self.step >= self.recipe.train.total_steps
        return self.tokens >= self.recipe.planned_tokens

    def run(self) -> RunResult:
        recipe, train = self.recipe, self.recipe.train
        self._install_signal_handlers()
        if self.backend.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            self._say(f"model: {describe(self.config)}")
            start = f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "fresh start"
            self._say(f"run dir: {self.run_dir} ({start}); {recipe.planned_tokens:,} tokens planned")
        if self.valid and self.step == 0:
            self.val_loss_start = self.evaluate()
            self._say("validation loss before training: " + _fmt_losses(self.val_loss_start))
        progress = Progress(recipe.planned_tokens, self.tokens, enabled=self.backend.is_main and recipe.logging.progress)
        started, start_tokens = time.perf_counter(), self.tokens
        last_ckpt: Path | None = None
        val_end: dict[str, float] = {}
        try:
            while not self.done and not self._stop_requested():
                record = self.train_step()
                due_eval = train.eval_interval and self.step % train.eval_interval == 0
                if self.valid and (due_eval or self.done):
                    val_end = self.evaluate()
                    record.update({f"val_loss/{k}": v for k, v in val_end.items()})
                    record["val_loss"] = next(iter(val_end.values()))
                self.metrics.log(record)
                progress.update(self.step, self.tokens, record["loss"], record["lr"])
                if self.step % recipe.logging.log_interval == 0 and not recipe.logging.progress:
                    self._say(_fmt_record(record))
                interval = recipe.checkpoint.interval
                if (interval and self.step % interval == 0) or self.done:
                    last_ckpt = self.save()
            if self._stop_signal is not None and not self.done:
                self._say(f"signal {self._stop_signal}: saving a checkpoint at step {self.step} and stopping")
                last_ckpt = self.save()
        finally:
            progress.close()
            self.metrics.close()
        wall = time.perf_counter() - started
        if self.valid and val_end:
            self._say("validation loss after training: " + _fmt_losses(val_end))
        return RunResult(
            self.run_dir, self.step, self.tokens, last_ckpt, self.val_loss_start, val_end, wall,
            (self.tokens - start_tokens) / max(wall, 1e-9), self._stop_signal is not None,
        )

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics record."""
        recipe, train = self.recipe, self.recipe.train
        t0 = time.perf_counter()
        global_batch, step_tokens, lr = self._plan_step()
        set_lr(self.optimizer, lr)
        phase = self.data.phase_name
        batch = self.data.next_batch(global_batch)
        loss_tokens = float(batch["loss_mask"].double().sum())  # float weights: SFT per-sample averaging
        per_rank = global_batch // self.backend.world_size
        first = self.backend.rank * per_rank
        micro_batches = [
            split_rows(batch, s, s + train.micro_batch) for s in range(first, first + per_rank, train.micro_batch)
        ]
        self.model.train()
        self.noise_probe.begin_step(self._measure_now() and self.noise_probe.usable(len(micro_batches)))
        loss_sum = accumulate_gradients(
            self.model, micro_batches, loss_tokens, self.backend, train.precision, moe=self.moe,
            noise=self.noise_probe,
        )
        loss = float(self.backend.all_reduce_sum(loss_sum.to(self.backend.device)).item()) / max(loss_tokens, 1)
        grad_norm = clip_grad_norm(self.model.parameters(), train.grad_clip if train.grad_clip > 0 else math.inf)
        skipped = self.nan_guard.check(loss, grad_norm, self.step + 1)
        measured = self.noise_probe.measurement(loss_tokens, grad_norm) if not skipped else None
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += step_tokens
        if self.early_kill is not None:
            self.early_kill.update(self.step, loss)
        moe_record = self.moe.finish_step(self.step, skipped)  # expert bias, router figures, alarms
        elapsed = time.perf_counter() - t0
        record = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": step_tokens / elapsed,
            "loss_tokens": loss_tokens,
            "skipped_steps": self.nan_guard.total,
            "phase": phase,
        }
        record.update(self._batch_size_step(global_batch, loss_tokens, measured))
        record.update(moe_record)
        self._moe_alarms(record)
        return record

    # -------------------------------------------------------------- batch size
    def _plan_step(self) -> tuple[int, int, float]:
        """The policy's global batch for this step, its tokens, and the LR (scaled for the batch)."""
        global_batch = self.batch_policy.decide(self.step, self.tokens, self._noise_in_sequences(), self.noise.updates)
        self.schedule.lr_scale = self.batch_policy.lr_scale()
        step_tokens = global_batch * self.recipe.data.seq_len
        return global_batch, step_tokens, self.schedule.lr(self.tokens + step_tokens)

    def _measure_now(self) -> bool:
        interval = self.recipe.batch_size.measure_interval
        return bool(interval) and self.step % interval == 0

    def _batch_size_step(self, global_batch: int, loss_tokens: float, measured: NoiseMeasurement | None) -> dict[str, Any]:
        """Fold the step's noise measurement into the estimator; the batch-size metrics fields."""
        if measured is not None:
            self.noise.update(measured.g_small_sq, measured.g_big_sq, measured.b_small, measured.b_big)
        self._tokens_per_sequence = loss_tokens / global_batch
        record: dict[str, Any] = {"global_batch": global_batch, "lr_scale": self.schedule.lr_scale}
        if measured is not None:  # this step's raw norms; the EMAs below smooth them
            record.update({"noise/g_small_sq": measured.g_small_sq, "noise/g_big_sq": measured.g_big_sq})
        if self.noise.updates:
            record.update({"noise/b_simple_tokens": self.noise.b_simple, "noise/b_simple_seqs": self._noise_in_sequences(),
                           "noise/g2": self.noise.g2, "noise/trace": self.noise.trace,
                           "noise/spikes": self.noise.spikes})
        return record

    @functools.cached_property
    def _chat_template(self) -> str | None:
        """The Jinja template SFT rendered conversations with (None for CPT): kept with every
        checkpoint so that an export serves the model with the format it was trained on."""
        if self.recipe.sft is None:
            return None
        from hebtron.data.chat import resolve_template
        from hebtron.data.sft import SFTOptions

        return resolve_template(self.tokenizer, SFTOptions.from_recipe(self.recipe.sft).template)

    def _batch_size_state(self) -> dict[str, Any]:
        return {"batch_size": self.batch_policy.state_dict(), "noise": self.noise.state_dict(),
                "tokens_per_sequence": self._tokens_per_sequence}

    def _noise_in_sequences(self) -> float:
        """The critical batch estimate in sequences (the estimator works in loss tokens)."""
        return self.noise.b_simple / self._tokens_per_sequence if self._tokens_per_sequence else math.nan

    def _moe_alarms(self, record: dict[str, Any]) -> None:
        """Print routing-collapse alarms; a ``stop`` alarm logs this step's record, then aborts."""
        for message in self.moe.messages:
            self._say(message)
        if self.moe.stop_message is not None:
            self.metrics.log(record)
            raise TrainingAborted(self.moe.stop_message)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss per validation source (the same fixed batches every time)."""
        self.model.eval()
        out = {}
        for name, batches in self.valid.items():
            total = torch.zeros(2, dtype=torch.float64)
            for batch in batches:
                batch = {k: v.to(self.backend.device) for k, v in batch.items() if k != "cu_seqlens"}
                with self.backend.autocast(self.recipe.train.precision):
                    logits = self.model(**{k: batch[k] for k in MODEL_INPUTS}).logits
                total[0] += token_loss_sum(logits, batch["labels"], batch["loss_mask"]).double().cpu()
                total[1] += batch["loss_mask"].sum().double().cpu()
            out[name] = float(total[0] / total[1].clamp(min=1))
        return out

    # --------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        model_state = self.backend.model_state(self.model)
        optim_state = self.backend.optimizer_state(self.model, self.optimizer)
        moe_state = self.moe.state_dict()  # collective: every rank
        path = None
        if self.backend.is_main:
            hf_tensors = dict(hf_tensors_from_state(model_state))
            extra = {
                "tokens": self.tokens,
                "data": self.data.state_dict(),
                "schedule": self.schedule.state_dict(),
                "nan_guard": self.nan_guard.state_dict(),
                "early_kill": self.early_kill.state_dict() if self.early_kill else None,
                "moe": moe_state,
                **self._batch_size_state(),
                "val_loss_start": self.val_loss_start,
                "rng": capture_rng(),
                "tokenizer": str(self.recipe.tokenizer.path),
                "chat_template": self._chat_template,
                "world_size": self.backend.world_size,
            }
            config_json = json.dumps(self.config.to_hf_dict(), indent=2, sort_keys=True)
            path = save_checkpoint(
                self.ckpt_dir, self.step, hf_tensors, optim_state, extra,
                keep_last=self.recipe.checkpoint.keep_last, extra_files={"config.json": config_json},
            )
        self.backend.barrier()
        return path

    def _resolve_resume(self, resume: str | None) -> Path | None:
        if resume in (None, "none", "never"):
            return None
        if resume == "auto":
            return find_latest(self.ckpt_dir)
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume: {path} is not a checkpoint directory (or use 'auto')")
        return path

    def _load(self, path: Path) -> None:
        _, optim_state, extra = load_checkpoint(path)
        model_state = load_hf_state_dict(path, self.config)
        self.backend.load_model_state(self.model, model_state)
        if optim_state is not None:
            self.backend.load_optimizer_state(self.model, self.optimizer, optim_state)
        self._restore_run_state(extra)
        self.moe.load_state_dict(extra.get("moe") or {})

    def _restore_run_state(self, extra: dict[str, Any]) -> None:
        """Position, data, schedule, guards and RNG: what every backend's checkpoint carries."""
        self.step = int(extra["step"])
        self.tokens = int(extra["tokens"])
        self.data.load_state_dict(extra["data"])
        self.schedule.load_state_dict(extra["schedule"])
        self.nan_guard.load_state_dict(extra["nan_guard"])
        if self.early_kill is not None and extra.get("early_kill"):
            self.early_kill.load_state_dict(extra["early_kill"])
        self.val_loss_start = dict(extra.get("val_loss_start") or {})
        if extra.get("batch_size"):
            self.batch_policy.load_state_dict(extra["batch_size"])
            self.noise.load_state_dict(extra["noise"])
            self._tokens_per_sequence = float(extra["tokens_per_sequence"])
        restore_rng(extra["rng"])

    # ------------------------------------------------------------------ helpers
    def _install_signal_handlers(self) -> None:
        """SIGUSR1 (Slurm's time-limit warning) and SIGTERM: finish the step, checkpoint, stop."""

        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _stop_requested(self) -> bool:
        """A stop signal on any rank stops every rank after the same step (one tiny all-reduce
        per step when distributed), so that all of them reach the checkpoint's collectives."""
        if self.backend.distributed:
            flag = torch.tensor([0.0 if self._stop_signal is None else 1.0], device=self.backend.device)
            if float(self.backend.all_reduce_sum(flag).item()) > 0 and self._stop_signal is None:
                self._stop_signal = 0  # another rank's signal
        return self._stop_signal is not None

    def _say(self, text: str) -> None:
        if self.backend.is_main:
            print(text, flush=True)

    def close(self) -> None:
        self.backend.close()


def _batch_size_control(recipe: Recipe) -> tuple[BatchSizePolicy, NoiseScaleEstimator]:
    section, train = recipe.batch_size, recipe.train
    policy = BatchSizePolicy(
        section.policy,
        start=train.global_batch,
        granularity=train.micro_batch * recipe.parallel.dp,
        minimum=section.min,
        maximum=section.max or max([train.global_batch] + [b for _, b in parse_ramp(section.ramp or "0:1")]),
        ramp=parse_ramp(section.ramp) if section.ramp else [],
        k=section.k,
        interval=section.interval,
        warmup_updates=section.warmup_updates,
        max_growth=section.max_growth,
        rule=section.lr_scaling,
    )
    return policy, NoiseScaleEstimator(section.ema, section.spike_factor)


def _fmt_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())


def _fmt_record(record: dict[str, Any]) -> str:
    return (
        f"step {record['step']} | tokens {record['tokens']:,} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.2e} | grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s"
    )


def make_trainer(recipe: Recipe, resume: str | None = None) -> Trainer:
    """The trainer for the recipe's backend: this loop with the native model, or with Megatron-Core."""
    if recipe.backend == "megatron":
        from hebtron.backends.megatron.trainer import MegatronTrainer

        return MegatronTrainer(recipe, resume)
    return Trainer(recipe, resume)
