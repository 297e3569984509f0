"""Learning-rate schedules measured in tokens, not optimizer steps.

The batch size may change mid-run (gradient-noise-scale ramp), so a step-based schedule would
stretch or squeeze warmup and decay. Measuring progress in tokens keeps the curve fixed while
steps get bigger. ``lr_scale`` multiplies the whole curve; the batch-size scheduler sets it to
sqrt(new_batch / base_batch) and it is saved with the schedule so a resumed run keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

ScheduleKind = Literal["wsd", "cosine", "constant"]
DecayShape = Literal["linear", "1-sqrt"]


@dataclass
class TokenSchedule:
    """A warmup + (stable | cosine | WSD decay) schedule as a function of tokens seen.

    * ``constant``: linear warmup over ``warmup_tokens`` from 0 to ``peak_lr``, then flat.
    * ``cosine``: warmup, then cosine from ``peak_lr`` to ``min_lr`` at ``total_tokens``.
    * ``wsd`` (warmup-stable-decay): warmup, flat at ``peak_lr``, then over the final
      ``decay_tokens`` before ``total_tokens`` decay to ``min_lr``, shaped ``linear`` or
      ``1-sqrt`` (lr = min + (peak - min) * (1 - sqrt(progress))).

    Past ``total_tokens`` the LR stays at ``min_lr`` (cosine, wsd). Pass the number of tokens
    consumed *including* the step being taken, so the very first step has a non-zero LR.
    """

    kind: ScheduleKind
    peak_lr: float
    min_lr: float = 0.0
    warmup_tokens: int = 0
    total_tokens: int | None = None
    decay_tokens: int = 0
    decay_shape: DecayShape = "linear"
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("wsd", "cosine", "constant"):
            raise ValueError(f"schedule kind: expected wsd, cosine or constant, got {self.kind!r}")
        if self.decay_shape not in ("linear", "1-sqrt"):
            raise ValueError(
                f"schedule decay_shape: expected linear or 1-sqrt, got {self.decay_shape!r}")
        if self.peak_lr <= 0 or self.min_lr < 0 or self.min_lr > self.peak_lr:
            raise ValueError(
                f"schedule: expected 0 <= min_lr <= peak_lr and peak_lr > 0, "
                f"got peak_lr={self.peak_lr}, min_lr={self.min_lr}")
        if self.warmup_tokens < 0 or self.decay_tokens < 0:
            raise ValueError("schedule: warmup_tokens and decay_tokens must be >= 0")
        if self.lr_scale <= 0:
            raise ValueError(f"schedule lr_scale: expected > 0, got {self.lr_scale}")
        if self.kind in ("wsd", "cosine"):
            if self.total_tokens is None:
                raise ValueError(f"schedule {self.kind}: total_tokens is required")
            if self.kind == "cosine" and self.total_tokens <= self.warmup_tokens:
                raise ValueError(
                    f"schedule cosine: expected total_tokens > warmup_tokens, "
                    f"got {self.total_tokens} <= {self.warmup_tokens}")
            if self.kind == "wsd" and self.warmup_tokens + self.decay_tokens > self.total_tokens:
                raise ValueError(
                    f"schedule wsd: expected warmup_tokens + decay_tokens <= total_tokens, got "
                    f"{self.warmup_tokens} + {self.decay_tokens} > {self.total_tokens}")

    def lr(self, tokens: int | float) -> float:
        """The learning rate after ``tokens`` tokens, including ``lr_scale``."""
        return self._base_lr(float(tokens)) * self.lr_scale

    lr_at = lr

    def _base_lr(self, t: float) -> float:
        if t < 0:
            raise ValueError(f"schedule: tokens must be >= 0, got {t}")
        peak, floor = self.peak_lr, self.min_lr
        if self.warmup_tokens > 0 and t < self.warmup_tokens:
            return peak * t / self.warmup_tokens
        if self.kind == "constant":
            return peak
        total = float(self.total_tokens)  # type: ignore[arg-type]  # validated above
        if t >= total:
            return floor
        if self.kind == "cosine":
            progress = (t - self.warmup_tokens) / (total - self.warmup_tokens)
            return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
        decay_start = total - self.decay_tokens
        if t < decay_start:
            return peak
        progress = (t - decay_start) / self.decay_tokens
        keep = 1.0 - progress if self.decay_shape == "linear" else 1.0 - math.sqrt(progress)
        return floor + (peak - floor) * keep

    def state_dict(self) -> dict[str, Any]:
        """Only ``lr_scale`` changes during a run; the rest comes from the recipe."""
        return {"lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = float(state["lr_scale"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every param group (groups differ only in weight decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
