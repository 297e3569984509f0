"""Critical batch size: measure the gradient noise scale and let it drive the global batch.

McCandlish et al. (2018), appendix A: from the squared norms of the same step's gradient at
two batch sizes, ``|G_small|^2`` at ``b_small`` and ``|G_big|^2`` at ``b_big``,

    |G|^2  ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(S)  ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

are unbiased estimates of the true gradient's squared norm and the per-example covariance
trace. Each is smoothed with an EMA and ``B_simple = tr(S) / |G|^2`` estimates the critical
batch size (in the unit of ``b``; hebtron uses loss tokens). Both norms come for free from the
accumulation the loop already does: no extra backward pass.

Below the critical batch, steps are wasted on noise; the ``adaptive`` policy grows the global
batch toward ``k * B_simple`` and scales the learning rate by ``sqrt(B / B_ref)`` (the rule
that took a Hebrew CPT run from failing at 2M-token batches to working at 10.5M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import Any, Literal

ScalingRule = Literal["sqrt", "linear", "none"]


@dataclass
class NoiseScaleEstimator:
    """Bias-corrected EMAs of the unbiased ``|G|^2`` and ``tr(S)`` estimates.

    A gradient spike (one step whose ``|G_big|^2`` is ``spike_factor`` times its running
    mean, i.e. a gradient norm ~5x the usual) is left out: its two norms are thousands of
    times the usual, so a single one would dominate both EMAs for hundreds of steps, and it
    says nothing about the noise of ordinary steps. Spikes are counted in ``spikes``.
    """

    beta: float = 0.99
    spike_factor: float = 25.0
    g2_ema: float = 0.0
    trace_ema: float = 0.0
    big_ema: float = 0.0
    updates: int = 0
    spikes: int = 0

    SPIKE_BASELINE = 5  # updates before the spike guard has a running mean to compare with

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"NoiseScaleEstimator beta: expected 0 <= beta < 1, got {self.beta}")
        if self.spike_factor <= 1.0:
            raise ValueError(f"NoiseScaleEstimator spike_factor: expected > 1, got {self.spike_factor}")

    @staticmethod
    def unbiased(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
        """One step's unbiased (|G|^2, tr(S)) from the two squared norms."""
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
        g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
        return g2, trace

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> bool:
        """Fold in one step; False when it was not used (non-finite, or a gradient spike)."""
        g2, trace = self.unbiased(g_small_sq, g_big_sq, b_small, b_big)
        if not (math.isfinite(g2) and math.isfinite(trace)):
            return False
        if self.updates >= self.SPIKE_BASELINE and g_big_sq > self.spike_factor * self.big_ema / self._correction:
            self.spikes += 1
            return False
        self.g2_ema = self.beta * self.g2_ema + (1 - self.beta) * g2
        self.trace_ema = self.beta * self.trace_ema + (1 - self.beta) * trace
        self.big_ema = self.beta * self.big_ema + (1 - self.beta) * g_big_sq
        self.updates += 1
        return True

    @property
    def _correction(self) -> float:
        return 1.0 - self.beta**self.updates if self.updates else 0.0

    @property
    def g2(self) -> float:
        return self.g2_ema / self._correction if self.updates else math.nan

    @property
    def trace(self) -> float:
        return self.trace_ema / self._correction if self.updates else math.nan

    @property
    def b_simple(self) -> float:
        """tr(S) / |G|^2; NaN before the first update or while |G|^2 is not yet positive."""
        if not self.updates or self.g2_ema <= 0:
            return math.nan
        return self.trace_ema / self.g2_ema  # the bias corrections cancel

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "g2_ema": self.g2_ema, "trace_ema": self.trace_ema, "big_ema": self.big_ema,
                "updates": self.updates, "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.g2_ema = float(state["g2_ema"])
        self.trace_ema = float(state["trace_ema"])
        self.big_ema = float(state.get("big_ema", 0.0))
        self.updates = int(state["updates"])
        self.spikes = int(state.get("spikes", 0))


@dataclass
class NoiseMeasurement:
    """One step's two gradient norms, the input of :meth:`NoiseScaleEstimator.update`."""

    g_small_sq: float  # mean over units of |mean gradient of the unit|^2
    g_big_sq: float  # |mean gradient of the step|^2
    b_small: float  # mean loss tokens per unit
    b_big: float  # loss tokens of the step


def combine_units(unit_sq: Sequence[Any], unit_tokens: Sequence[float], token_scale: float, global_tokens: float,
                  grad_norm: float, all_reduce_sum: Callable[[Any], Any]) -> NoiseMeasurement | None:
    """This rank's small-batch units -> the step's measurement, combined over ranks (collective).

    ``unit_sq[i]`` is the squared norm of unit ``i``'s raw gradient (a 0-dim tensor, left on the
    device until here), ``token_scale / unit_tokens[i]`` turns that raw gradient into the unit's
    mean per-token gradient; ``all_reduce_sum`` sums a tensor over the ranks that hold other
    units. None when fewer than two units exist (no second batch size).
    """
    import torch

    if not unit_sq:
        return None
    first = unit_sq[0]
    weights = torch.tensor([(token_scale / max(tok, 1e-9)) ** 2 for tok in unit_tokens], dtype=torch.float64,
                           device=first.device)
    totals = torch.stack([
        (torch.stack(list(unit_sq)).double() * weights).sum(),
        weights.new_tensor(float(len(unit_sq))),
        weights.new_tensor(float(sum(unit_tokens))),
    ])
    all_reduce_sum(totals)
    units = float(totals[1])
    if units < 2:
        return None
    return NoiseMeasurement(float(totals[0]) / units, grad_norm**2, float(totals[2]) / units, global_tokens)


def lr_scale_for(batch: int, reference: int, rule: ScalingRule) -> float:
    """Learning-rate multiplier when the global batch moves from ``reference`` to ``batch``."""
    ratio = batch / reference
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "linear":
        return ratio
    return 1.0


@dataclass
class BatchSizePolicy:
    """Chooses the global batch (in sequences) before every step.

    ``fixed``: always ``start``. ``steps``: the ramp's value at the tokens seen so far.
    ``adaptive``: once the estimate has ``warmup_updates`` updates, every ``interval`` steps,
    move toward ``k * B_simple`` (converted to sequences), never down, at most ``max_growth``
    times the current batch per decision (one noisy estimate must not jump straight to the
    maximum), within [``minimum``, ``maximum``], rounded down to a multiple of ``granularity``
    (micro_batch x dp) so that every rank gets whole micro-batches. The learning rate follows
    ``lr_scale``.
    """

    kind: Literal["fixed", "steps", "adaptive"]
    start: int
    granularity: int
    minimum: int | None = None
    maximum: int | None = None
    ramp: list[tuple[int, int]] = field(default_factory=list)
    k: float = 1.0
    interval: int = 50
    warmup_updates: int = 20
    max_growth: float = 2.0
    rule: ScalingRule = "sqrt"
    current: int = 0
    last_change_step: int = 0

    def __post_init__(self) -> None:
        self.minimum = self.minimum or self.start
        self.maximum = self.maximum or self.start
        if self.current == 0:
            self.current = self._round(self.start)
        for value, name in ((self.start, "start"), (self.minimum, "minimum"), (self.maximum, "maximum")):
            if value % self.granularity:
                raise ValueError(f"batch size {name} {value} is not a multiple of micro_batch x dp ({self.granularity})")
        if self.max_growth <= 1.0:
            raise ValueError(f"batch size max_growth must be > 1, got {self.max_growth}")
        for _, size in self.ramp:
            if size % self.granularity:
                raise ValueError(f"batch ramp size {size} is not a multiple of micro_batch x dp ({self.granularity})")

    def _round(self, batch: float) -> int:
        rounded = int(batch // self.granularity) * self.granularity
        return max(self.minimum, min(self.maximum, max(rounded, self.granularity)))

    def lr_scale(self) -> float:
        return lr_scale_for(self.current, self.start, self.rule)

    def decide(self, step: int, tokens: int, b_noise_sequences: float, estimator_updates: int) -> int:
        """The global batch for the next step (``step`` optimizer steps done, ``tokens`` seen)."""
        if self.kind == "steps":
            for at, size in self.ramp:
                if tokens >= at:
                    self.current = size
        elif self.kind == "adaptive":
            due = step - self.last_change_step >= self.interval
            ready = estimator_updates >= self.warmup_updates and math.isfinite(b_noise_sequences)
            if due and ready:
                target = self._round(min(self.k * b_noise_sequences, self.max_growth * self.current))
                if target > self.current:
                    self.current = target
                    self.last_change_step = step
        return self.current

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "last_change_step": self.last_change_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = int(state["current"])
        self.last_change_step = int(state["last_change_step"])
