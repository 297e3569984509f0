"""The native engine: hebtron's own model in plain PyTorch, on one process or FSDP2 ranks.

It implements :class:`hebtron.train.engine.TrainEngine` for ``backend: native``. One step:
every micro-batch's summed loss is divided by the *global* count of loss tokens before
backward (so accumulation and data parallelism do not change the gradient), MoE aux losses
are added, the gradient is clipped, the guard decides, and only then does AdamW step.
Checkpoints are the run layout of :mod:`hebtron.train.checkpoint`: HF-named safetensors, the
optimizer state and the trainer's ``extra``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from hebtron.backends.native import NativeBackend
from hebtron.backends.native_noise import GradientNoiseProbe
from hebtron.backends.native_sharded import config_json, load_sharded, save_sharded
from hebtron.checkpoints import is_sharded_checkpoint
from hebtron.model.hf import hf_tensors_from_state, load_hf_state_dict
from hebtron.model.implementations import implementations
from hebtron.recipe import Recipe
from hebtron.train.checkpoint import RUN_STATE_ERRORS, load_checkpoint, run_state_error, save_checkpoint
from hebtron.train.engine import MODEL_INPUTS, StepPlan, StepResult, to_device
from hebtron.train.loss import LOSS_IMPLEMENTATION, token_loss_sum_from_hidden
from hebtron.train.moe_step import MoEStep
from hebtron.train.optim import build_adamw, clip_grad_norm
from hebtron.train.schedule import set_lr
from hebtron.train.setup import build_model


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    global_loss_tokens: float,
    backend: NativeBackend,
    precision: str = "fp32",
    moe: MoEStep | None = None,
    noise: GradientNoiseProbe | None = None,
) -> torch.Tensor:
    """Backward over the micro-batches; returns this rank's summed loss (fp64, detached, on the
    device: no host sync per micro-batch). ``moe`` adds the MoE aux losses (already globally
    normalized) and gathers routing figures; ``noise`` reads the small-batch gradient norms."""
    total = torch.zeros((), dtype=torch.float64, device=backend.device)
    scale = backend.loss_scale / max(global_loss_tokens, 1)
    if moe is not None:
        moe.begin(micro_batches)
    for i, host_micro in enumerate(micro_batches):
        micro_tokens = float(host_micro["loss_mask"].double().sum()) if noise is not None and noise.active else 0.0
        micro = to_device(host_micro, backend.device)
        with backend.autocast(precision):
            output = model(**{k: micro[k] for k in MODEL_INPUTS if k in micro}, return_hidden=True)
            # head + loss chunk by chunk: no (b, T, vocab) logits (the head weight is unsharded
            # here: FSDP2 keeps the root's parameters gathered from forward through backward)
            loss_sum = token_loss_sum_from_hidden(
                output.hidden, model.lm_head.weight, micro["labels"], micro["loss_mask"]
            )
        loss = loss_sum * scale
        aux = moe.micro_batch_loss(output.routers, micro) if moe is not None else None
        if aux is not None:
            loss = loss + aux * backend.loss_scale
        if noise is not None:
            noise.before_backward(i, len(micro_batches))
        with backend.gradient_sync(model, enabled=i == len(micro_batches) - 1):
            loss.backward()
        if noise is not None:
            noise.after_backward(i, len(micro_batches), micro_tokens)
        total += loss_sum.detach().double()
    return total


class NativeEngine:
    """hebtron's HybridModel, wrapped by :class:`NativeBackend`, with AdamW."""

    def __init__(self, recipe: Recipe, tokenizer: Any) -> None:
        train = recipe.train
        self.recipe = recipe
        self.ops = NativeBackend(recipe.parallel.dp)
        self.dp_rank, self.dp_size = self.ops.rank, self.ops.world_size
        model = build_model(recipe, tokenizer)  # reads model.hf_path's weights while building
        self.config = model.config
        self.model = self.ops.wrap(model, train.precision, train.activation_checkpointing, train.sharded_accumulation)
        self.optimizer = build_adamw(
            self.model, train.lr, train.weight_decay, (train.adam_beta1, train.adam_beta2), train.adam_eps
        )
        self.moe = MoEStep(recipe.moe, self.model, self.ops, self.config.pad_token_id)
        self.noise_probe = GradientNoiseProbe(self.model, self.ops, required=recipe.batch_size.policy == "adaptive")
        # decided now, so a CUDA run without its kernels stops before it trains (one line)
        self.kernels = implementations(model, self.ops.device, self._compute_dtype())

    def _compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.recipe.train.precision == "bf16" else next(self.model.parameters()).dtype

    def notes(self) -> list[str]:
        kernels = ", ".join(f"{part} {impl}" for part, impl in {**self.kernels, "loss": LOSS_IMPLEMENTATION}.items())
        notes = [f"kernels: {kernels}"]
        if self.recipe.train.master_weights == "bf16":
            notes.append("warning: train.master_weights bf16: AdamW updates bf16 weights, and relative updates "
                         "below ~4e-3 (bf16's resolution) round away; fp32 master weights are the default")
        note = self.moe.note()
        return [*notes, *([note] if note else [])]

    def load_pretrained(self) -> None:
        """Nothing to do: :func:`build_model` already read ``model.hf_path`` (config and weights
        come from the same directory)."""

    def noise_usable(self, micro_batches_per_rank: int) -> bool:
        return self.noise_probe.usable(micro_batches_per_rank)

    # ------------------------------------------------------------------ one step
    def train_step(self, plan: StepPlan) -> StepResult:
        train = self.recipe.train
        set_lr(self.optimizer, plan.lr)
        local_tokens = sum(m["loss_mask"].double().sum() for m in plan.micro_batches)
        loss_tokens = float(self.ops.all_reduce_sum(torch.as_tensor(local_tokens, device=self.ops.device)))
        self.model.train()
        self.moe.pad_id = plan.pad_id
        self.noise_probe.begin_step(plan.measure_noise)
        loss_sum = accumulate_gradients(
            self.model, plan.micro_batches, loss_tokens, self.ops, train.precision, moe=self.moe,
            noise=self.noise_probe,
        )
        loss_sum = float(self.ops.all_reduce_sum(loss_sum).item())
        grad_norm = clip_grad_norm(self.model.parameters(), train.grad_clip if train.grad_clip > 0 else math.inf)
        skipped = plan.guard(loss_sum / max(loss_tokens, 1), grad_norm)
        noise = self.noise_probe.measurement(loss_tokens, grad_norm) if not skipped else None
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        figures = self.moe.finish_step(plan.step, skipped)  # expert bias, router figures, alarms
        return StepResult(loss_sum, loss_tokens, grad_norm, skipped, noise, figures, list(self.moe.messages),
                          self.moe.stop_message)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
        """Every rank runs the same rows (FSDP needs all of them in each forward)."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.ops.device)
        for batch in batches:
            batch = to_device({k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}, self.ops.device)
            with self.ops.autocast(self.recipe.train.precision):
                hidden = self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, return_hidden=True).hidden
                total[0] += token_loss_sum_from_hidden(
                    hidden, self.model.lm_head.weight, batch["labels"], batch["loss_mask"]
                ).double()
            total[1] += batch["loss_mask"].double().sum()
        return float(total[0]), float(total[1])

    # --------------------------------------------------------------- checkpoints
    def save(self, root: Path, step: int, extra: dict[str, Any], keep_last: int | None) -> Path | None:
        if self.ops.sharded:  # FSDP2: each rank writes its own shards (hebtron.backends.native_sharded)
            moe_state = self.moe.state_dict()  # collective: every rank
            return save_sharded(self.model, self.optimizer, root, step, self.ops.rank, {**extra, "moe": moe_state},
                                config_json(self.config), keep_last)
        model_state = self.ops.model_state(self.model)
        optim_state = self.optimizer.state_dict()
        moe_state = self.moe.state_dict()  # collective: every rank
        path = None
        if self.ops.is_main:
            path = save_checkpoint(
                root, step, dict(hf_tensors_from_state(model_state)), optim_state, {**extra, "moe": moe_state},
                keep_last=keep_last, extra_files={"config.json": config_json(self.config)},
            )
        self.ops.barrier()
        return path

    def load(self, path: Path) -> dict[str, Any]:
        """Either format at any dp: a sharded checkpoint reshards to this run's ranks; a
        single-process one is read whole and (FSDP2) scattered."""
        if is_sharded_checkpoint(path):
            extra = load_sharded(self.model, self.optimizer, path)
            self._restore_moe(path, extra)
            return extra
        _, optim_state, extra = load_checkpoint(path)
        self.ops.load_model_state(self.model, load_hf_state_dict(path, self.config))
        if optim_state is not None:
            self.ops.load_optimizer_state(self.model, self.optimizer, optim_state)
        self._restore_moe(path, extra)
        return extra

    def _restore_moe(self, path: Path, extra: dict[str, Any]) -> None:
        """The router monitor's and balancing state; a damaged one is one line naming ``extra.moe``."""
        try:
            self.moe.load_state_dict(extra.get("moe") or {})
        except RUN_STATE_ERRORS as err:
            raise run_state_error(path, "moe", err) from None

    def close(self) -> None:
        self.ops.close()
