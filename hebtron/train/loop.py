"""The training loop: one :class:`Trainer` for every run, an engine does the model work.

One optimizer step takes ``train.global_batch`` sequences. Every rank advances the same
(deterministic) data pipeline over the whole global batch but collates only its own
data-parallel slice, so the data order is the same for any number of ranks. The engine
divides each micro-batch's summed loss by the global count of loss tokens before backward,
so accumulation and data parallelism do not change the gradient.

Resume restores weights, optimizer, schedule, data position, guards and RNG: a run killed
and resumed with ``--resume auto`` writes the same per-step losses as one never stopped.
"""

from __future__ import annotations

import functools
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from hebtron.checkpoints import find_latest
from hebtron.errors import CheckpointError, StorageError, UserError
from hebtron.model.config import describe
from hebtron.recipe import Recipe, dump_recipe
from hebtron.recipe.units import parse_ramp
from hebtron.train.batch_size import BatchSizePolicy, NoiseMeasurement, NoiseScaleEstimator
from hebtron.train.checkpoint import (
    RUN_STATE_ERRORS, capture_rng, ensure_room, repair_interrupted_swap, restore_rng, run_state_error,
)
from hebtron.train.engine import StepPlan, TrainEngine, split_rows
from hebtron.train.guards import EarlyKillGuard, NanGuard, TrainingAborted
from hebtron.train.metrics import ABORT_KEY, MetricsWriter, Progress
from hebtron.train.schedule import TokenSchedule
from hebtron.train.setup import build_train_data, build_valid_data
from hebtron.train.stop_signals import STOP_SIGNALS, take_pending as take_pending_stop_signal


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


class Trainer:
    """The run: schedule, data, guards, batch size, metrics, signals, run state and checkpoint
    cadence, the same whatever ``engine`` (:class:`hebtron.train.engine.TrainEngine`) does the
    model work."""

    def __init__(self, recipe: Recipe, engine: TrainEngine, tokenizer: Any, resume: str | None = None) -> None:
        self.recipe = recipe
        self.engine = engine
        self.ops = engine.ops
        self.config = engine.config
        self.tokenizer = tokenizer
        train = recipe.train
        per_step = train.micro_batch * engine.dp_size
        if train.global_batch % per_step:
            raise UserError(f"recipe: train.global_batch ({train.global_batch}) must be a multiple of "
                            f"micro_batch x data-parallel ranks ({per_step})")
        self.schedule = TokenSchedule(
            train.schedule, train.lr, train.min_lr, train.warmup_tokens, recipe.planned_tokens,
            recipe.decay_token_count if train.schedule == "wsd" else 0, train.decay_shape,
        )
        self.data = build_train_data(recipe)
        self.valid = build_valid_data(recipe)
        self.pad_id = getattr(self.data, "pad_id", self.config.pad_token_id)
        self.nan_guard = NanGuard(train.nan_guard_max_skips)
        kill = train.early_kill
        self.early_kill = EarlyKillGuard(kill.window_steps, kill.margin, kill.beta) if kill.enabled else None
        self.batch_policy, self.noise = _batch_size_control(recipe, engine.dp_size)
        self._tokens_per_sequence = 0.0
        self.run_dir = Path(recipe.logging.run_dir)
        self.ckpt_dir = Path(recipe.checkpoint.dir)
        self.step = 0
        self.tokens = 0
        self.val_loss_start: dict[str, float] = {}
        self._stop_signal: int | None = None
        for note in engine.notes():
            self._say(note)
        self.resumed_from = self._resolve_resume(resume)
        if self.resumed_from is not None:
            self._restore_run_state(engine.load(self.resumed_from), self.resumed_from)
        else:
            engine.load_pretrained()
        self._saved_step = self.step  # the state at this step is on disk (or is the start): no save due
        self.metrics = MetricsWriter(
            self.run_dir, tensorboard=recipe.logging.tensorboard,
            resume_step=self.step if self.resumed_from is not None else None, enabled=self.ops.is_main,
            wandb=recipe.logging.wandb,
        )

    # ------------------------------------------------------------------ the run
    @property
    def done(self) -> bool:
        if self.recipe.train.total_steps is not None:
            return self.step >= self.recipe.train.total_steps
        return self.tokens >= self.recipe.planned_tokens

    def run(self) -> RunResult:
        recipe, train = self.recipe, self.recipe.train
        self._install_signal_handlers()
        if self.ops.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            self._say(f"model: {describe(self.config)}")
            start = f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "fresh start"
            self._say(f"run dir: {self.run_dir} ({start}); {recipe.planned_tokens:,} tokens planned")
        if self.valid and self.step == 0:
            self.val_loss_start = self.evaluate()
            self._say("validation loss before training: " + _fmt_losses(self.val_loss_start))
        progress = Progress(recipe.planned_tokens, self.tokens, enabled=self.ops.is_main and recipe.logging.progress)
        started, start_tokens = time.perf_counter(), self.tokens
        last_ckpt: Path | None = None
        val_end: dict[str, float] = {}
        try:
            while not self.done and not self._stop_requested():
                record = self.train_step()
                if self.early_kill is not None:
                    self._abort_on(lambda: self.early_kill.update(self.step, record["loss"]), record)
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
                if self._saved_step == self.step:  # just saved (an interval step) or nothing trained yet
                    self._say(f"signal {self._stop_signal}: stopping at step {self.step} (its checkpoint is on disk)")
                else:
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
        train = self.recipe.train
        t0 = time.perf_counter()
        global_batch, step_tokens, lr = self._plan_step()
        phase = self.data.phase_name
        rows = self.data.next_batch(global_batch, self.engine.dp_rank, self.engine.dp_size)
        per_rank = global_batch // self.engine.dp_size
        micro_batches = [split_rows(rows, s, s + train.micro_batch) for s in range(0, per_rank, train.micro_batch)]
        measure = self._measure_now() and self.engine.noise_usable(len(micro_batches))
        plan = StepPlan(
            micro_batches, lr, self.step + 1, self.pad_id, measure,
            guard=lambda loss, grad_norm: self.nan_guard.check(loss, grad_norm, self.step + 1),
        )
        def unfinished() -> dict[str, Any]:  # the record of a step the NaN guard aborted
            guard = self.nan_guard.last
            return {"step": self.step + 1, "tokens": self.tokens + step_tokens, "loss": guard[0], "lr": lr,
                    "grad_norm": guard[1], "tokens_per_s": step_tokens / (time.perf_counter() - t0),
                    "skipped_steps": self.nan_guard.total, "phase": phase, "global_batch": global_batch}

        result = self._abort_on(lambda: self.engine.train_step(plan), unfinished)
        self.step += 1
        self.tokens += step_tokens
        record = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": step_tokens / (time.perf_counter() - t0),
            "loss_tokens": result.loss_tokens,
            "skipped_steps": self.nan_guard.total,
            "phase": phase,
        }
        record.update(self._batch_size_step(global_batch, result.loss_tokens, None if result.skipped else result.noise))
        record.update(result.figures)
        for message in result.messages:
            self._say(message)
        if result.stop is not None:  # a routing alarm with action stop: log this step, then abort
            self._abort_on(lambda: _raise(TrainingAborted(result.stop)), record)
        return record

    def _abort_on(self, work: Callable[[], Any], record: dict[str, Any] | Callable[[], dict[str, Any]]) -> Any:
        """``work()``; if it aborts the run (NaN limit, early kill, routing alarm), the step's
        ``record`` goes to metrics.jsonl and TensorBoard with the reason before the abort goes on:
        the file tools read says why the run died, in its last record."""
        try:
            return work()
        except TrainingAborted as err:
            self.metrics.log({**(record() if callable(record) else record), ABORT_KEY: str(err)})
            raise

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

    def packing_report(self) -> list[str]:
        """SFT runs: how the training and validation conversations were packed (fill, padding)."""
        if self.recipe.sft is None:
            return []
        lines = ["packing (best-fit decreasing):", *("  " + x for x in self.data.report_lines())]
        for batches in self.valid.values():
            if batches.report is not None:
                lines += ["  " + x for x in batches.report.lines()]
        return lines

    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss per validation source (the same fixed batches every time)."""
        out = {}
        for name, batches in self.valid.items():
            loss_sum, tokens = self.engine.evaluate(batches)
            out[name] = loss_sum / max(tokens, 1)
        return out

    # --------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """A checkpoint of the whole run: the engine's model and optimizer, with this state."""
        extra = {
            "tokens": self.tokens,
            "data": self.data.state_dict(),
            "schedule": self.schedule.state_dict(),
            "nan_guard": self.nan_guard.state_dict(),
            "early_kill": self.early_kill.state_dict() if self.early_kill else None,
            **self._batch_size_state(),
            "val_loss_start": self.val_loss_start,
            "rng": capture_rng(),
            "tokenizer": str(self.recipe.tokenizer.path),
            "chat_template": self._chat_template,
            "world_size": self.ops.world_size,
            "backend": self.recipe.backend,
            "final": self.done,  # the run's last checkpoint: `hebtron eval watch` stops after it
        }
        self._make_room()
        path = self.engine.save(self.ckpt_dir, self.step, extra, self.recipe.checkpoint.keep_last)
        self._saved_step = self.step
        return path

    def _make_room(self) -> None:
        """Rank 0 checks the disk before a save writes (pruning first with
        ``checkpoint.prune_before_save``); every rank stops with the same error if there is no room."""
        section = self.recipe.checkpoint
        message = None
        if self.ops.is_main:
            try:
                for path in ensure_room(self.ckpt_dir, section.keep_last, section.prune_before_save):
                    self._say(f"pruned {path.name} before saving step {self.step} (checkpoint.prune_before_save)")
            except StorageError as err:
                message = str(err)
        if self.ops.distributed:
            flag = torch.tensor([float(message is not None)], device=self.ops.device)
            if self.ops.all_reduce_sum(flag).item() and message is None:
                message = f"checkpoint save at step {self.step}: rank 0 found no room on {self.ckpt_dir} (see its error)"
        if message is not None:
            raise StorageError(message)

    def _resolve_resume(self, resume: str | None) -> Path | None:
        if resume in (None, "none", "never"):
            return None
        if resume == "auto":
            if self.ops.is_main and self.ckpt_dir.is_dir():
                restored = repair_interrupted_swap(self.ckpt_dir)
                if restored is not None:
                    self._say(f"restored {restored.name}: a kill had interrupted its re-save")
            self.ops.barrier()
            return find_latest(self.ckpt_dir)
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume: {path} is not a checkpoint directory (or use 'auto')")
        return path

    def _restore_run_state(self, extra: dict[str, Any], where: Path) -> None:
        """Position, data, schedule, guards and RNG: what every engine's checkpoint carries. A
        field that is missing or misshaped is one line naming it (the file came from disk)."""
        for name in ("step", "tokens", "data", "schedule", "nan_guard", "rng"):
            if name not in extra:
                raise CheckpointError(f"{where / 'trainer_state.json'}: extra: unusable run state (missing {name!r})")
        for name, restore in self._run_state_parts(extra):
            try:
                restore()
            except RUN_STATE_ERRORS as err:
                raise run_state_error(where, name, err) from None

    def _run_state_parts(self, extra: dict[str, Any]) -> list[tuple[str, Callable[[], None]]]:
        """(field of ``extra``, how to restore it), in restore order; the RNG last."""
        def assign(attr: str, value: Callable[[], Any]) -> Callable[[], None]:
            return lambda: setattr(self, attr, value())

        parts: list[tuple[str, Callable[[], None]]] = [
            ("step", assign("step", lambda: int(extra["step"]))),
            ("tokens", assign("tokens", lambda: int(extra["tokens"]))),
            ("data", lambda: self.data.load_state_dict(extra["data"])),
            ("schedule", lambda: self.schedule.load_state_dict(extra["schedule"])),
            ("nan_guard", lambda: self.nan_guard.load_state_dict(extra["nan_guard"])),
        ]
        if self.early_kill is not None and extra.get("early_kill"):
            parts.append(("early_kill", lambda: self.early_kill.load_state_dict(extra["early_kill"])))
        parts.append(("val_loss_start", assign("val_loss_start", lambda: dict(extra.get("val_loss_start") or {}))))
        if extra.get("batch_size"):
            parts += [("batch_size", lambda: self.batch_policy.load_state_dict(extra["batch_size"])),
                      ("noise", lambda: self.noise.load_state_dict(extra["noise"])),
                      ("tokens_per_sequence",
                       assign("_tokens_per_sequence", lambda: float(extra["tokens_per_sequence"])))]
        parts.append(("rng", lambda: restore_rng(extra["rng"])))
        return parts

    # ------------------------------------------------------------------ helpers
    def _install_signal_handlers(self) -> None:
        """SIGUSR1 (Slurm's time-limit warning) and SIGTERM: finish the step, checkpoint, stop."""

        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _stop_requested(self) -> bool:
        """A stop signal on any rank stops every rank after the same step (one tiny all-reduce
        per step when distributed), so that all of them reach the checkpoint's collectives.
        Under ``hebtron train`` the signals are blocked and wait here, pending
        (:mod:`hebtron.train.stop_signals`); the handler covers a Trainer run without that."""
        if self._stop_signal is None:
            self._stop_signal = take_pending_stop_signal()
        if self.ops.distributed:
            # which signals the ranks hold, so that every rank names the one that stops the run
            # even when only another rank has taken it yet (killpg reaches the ranks one by one)
            held = [float(self._stop_signal == kind) for kind in STOP_SIGNALS]
            seen = self.ops.all_reduce_sum(torch.tensor(held, device=self.ops.device)).tolist()
            if self._stop_signal is None:
                self._stop_signal = next((int(kind) for kind, n in zip(STOP_SIGNALS, seen, strict=True) if n > 0), None)
        return self._stop_signal is not None

    def _say(self, text: str) -> None:
        if self.ops.is_main:
            print(text, flush=True)

    def close(self) -> None:
        self.engine.close()


def _raise(error: BaseException) -> NoReturn:
    raise error


def _batch_size_control(recipe: Recipe, dp_size: int) -> tuple[BatchSizePolicy, NoiseScaleEstimator]:
    section, train = recipe.batch_size, recipe.train
    policy = BatchSizePolicy(
        section.policy,
        start=train.global_batch,
        granularity=train.micro_batch * dp_size,
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
