"""Loss guards: skip steps with non-finite numbers, and kill runs whose loss rises early.

Loss is a poor witness of quality, but it is a good witness of doom: a run whose smoothed loss
climbs in its first steps does not recover. Killing it early saves the cluster hours.
Feed both guards globally reduced numbers (the same on every rank) so all ranks agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


class TrainingAborted(RuntimeError):
    """Training stopped on purpose because continuing would waste compute.

    ``exit_code`` 3 differs from a user error (2) so launchers can tell "do not auto-resume".
    """

    exit_code = 3


def _as_float(x: Any) -> float:
    return float(x.item() if hasattr(x, "item") else x)


@dataclass
class NanGuard:
    """Skip optimizer steps whose loss or gradient norm is NaN/inf.

    One bad batch is survivable: the step is skipped (no optimizer update) and training moves
    on. A *streak* means the weights or optimizer state are already broken, so the guard counts
    **consecutive** skips and raises :class:`TrainingAborted` on the ``max_skips + 1``-th in a
    row (``max_skips=0``: abort on the first). ``max_total`` optionally caps all skips in the
    run too. A good step resets the streak.
    """

    max_skips: int = 5
    max_total: int | None = None
    consecutive: int = field(default=0, init=False)
    total: int = field(default=0, init=False)
    last: tuple[float, float] = field(default=(math.nan, math.nan), init=False)  # (loss, grad norm) checked last

    def check(self, loss: Any, grad_norm: Any, step: int | None = None) -> bool:
        """True when this step must be skipped; raises once the budget is exhausted."""
        lv, gv = _as_float(loss), _as_float(grad_norm)
        self.last = (lv, gv)
        if math.isfinite(lv) and math.isfinite(gv):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        where = f"step {step}" if step is not None else "this step"
        if self.consecutive > self.max_skips:
            raise TrainingAborted(
                f"training aborted at {where}: {self.consecutive} consecutive steps with "
                f"non-finite loss/grad norm (loss={lv}, grad_norm={gv}, limit {self.max_skips}); "
                "lower the LR or inspect the data at this position")
        if self.max_total is not None and self.total > self.max_total:
            raise TrainingAborted(
                f"training aborted at {where}: {self.total} steps skipped in total for non-finite "
                f"loss/grad norm (limit {self.max_total}); lower the LR or inspect the data")
        return True

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])


@dataclass
class EarlyKillGuard:
    """Abort when the smoothed loss rises above its running minimum during the first steps.

    The loss is smoothed with a bias-corrected EMA (``beta``) so one noisy batch does not kill
    a run. While ``step <= window_steps`` the guard tracks the minimum smoothed loss and raises
    :class:`TrainingAborted` when ``smoothed > minimum + allowance``, where the allowance is
    ``margin * minimum`` for ``margin_mode="relative"`` (default; 0.05 = 5 % above the best)
    or ``margin`` itself for ``"absolute"``. After the window it is inert: later rises are
    for the eval gate to judge. Non-finite losses are ignored (that is :class:`NanGuard`'s job).
    """

    window_steps: int
    margin: float = 0.05
    beta: float = 0.9
    margin_mode: Literal["relative", "absolute"] = "relative"
    ema: float = field(default=0.0, init=False)
    updates: int = field(default=0, init=False)
    minimum: float = field(default=math.inf, init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"EarlyKillGuard beta: expected 0 <= beta < 1, got {self.beta}")
        if self.margin < 0:
            raise ValueError(f"EarlyKillGuard margin: expected >= 0, got {self.margin}")
        if self.margin_mode not in ("relative", "absolute"):
            raise ValueError(f"EarlyKillGuard margin_mode: expected relative or absolute, "
                             f"got {self.margin_mode!r}")

    @property
    def smoothed(self) -> float:
        if self.updates == 0:
            return math.nan
        return self.ema / (1.0 - self.beta ** self.updates)

    def threshold(self) -> float:
        if self.margin_mode == "relative":
            return self.minimum + self.margin * abs(self.minimum)
        return self.minimum + self.margin

    def update(self, step: int, loss: Any) -> float:
        """Feed one step's loss; returns the smoothed loss, raises when the run is doomed."""
        if step > self.window_steps:
            return self.smoothed
        value = _as_float(loss)
        if not math.isfinite(value):
            return self.smoothed
        self.updates += 1
        self.ema = self.beta * self.ema + (1.0 - self.beta) * value
        smoothed = self.smoothed
        if smoothed > self.threshold():
            if self.margin_mode == "relative":
                kind = f"{self.margin * 100:g}% relative"
            else:
                kind = f"{self.margin:g} absolute"
            raise TrainingAborted(
                f"early kill at step {step}: smoothed loss {smoothed:.4f} rose above its minimum "
                f"{self.minimum:.4f} by more than the {kind} margin within the first "
                f"{self.window_steps} steps; loss rising early means the run is doomed "
                "(lower the LR, lengthen warmup, or check the data mix)")
        self.minimum = min(self.minimum, smoothed)
        return smoothed

    def state_dict(self) -> dict[str, float | int | None]:
        """JSON-safe: an unset minimum (inf) is stored as None."""
        minimum = self.minimum if math.isfinite(self.minimum) else None
        return {"ema": self.ema, "updates": self.updates, "minimum": minimum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = float(state["ema"])
        self.updates = int(state["updates"])
        self.minimum = math.inf if state["minimum"] is None else float(state["minimum"])
