"""``hebtron plan``: pick a global batch for a token budget before renting the cluster.

Fewer, larger steps are not free (the LR must scale with the batch), but too many small steps
below the critical batch size waste compute on gradient noise: 250B tokens at 2M-token batches
is ~125k steps and failed, 10.5M-token batches (~24k steps) worked. The plan lists candidate
batches with their step counts, the sqrt-rule LR, wall time and cost, and recommends the
batch whose step count is the geometric middle of the target range.

Per-GPU throughput and price are inputs (``--tokens-per-gpu-s``, ``--usd-per-gpu-hour``); the
profile defaults below are placeholders to replace with your measured figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hebtron.train.batch_size import lr_scale_for

# Placeholders, not measurements: override with --tokens-per-gpu-s / --usd-per-gpu-hour.
GPU_PROFILES: dict[str, dict[str, float]] = {
    "h200": {"tokens_per_gpu_s": 8000.0, "usd_per_gpu_hour": 3.5},
    "b300": {"tokens_per_gpu_s": 16000.0, "usd_per_gpu_hour": 6.0},
}


@dataclass
class PlanRow:
    global_batch: int  # sequences
    batch_tokens: int
    steps: int
    lr: float
    lr_scale: float
    in_range: bool
    recommended: bool


@dataclass
class Plan:
    tokens: int
    seq_len: int
    gpus: int
    gpu: str
    tokens_per_gpu_s: float
    usd_per_gpu_hour: float
    min_steps: int
    max_steps: int
    reference_batch: int
    reference_lr: float
    wall_hours: float
    cost_usd: float
    rows: list[PlanRow]

    @property
    def recommended(self) -> PlanRow:
        return next(r for r in self.rows if r.recommended)

    def to_json(self) -> dict:
        out = asdict(self)
        out["recommended"] = asdict(self.recommended)
        return out


def make_plan(
    tokens: int,
    seq_len: int,
    gpus: int,
    gpu: str = "h200",
    tokens_per_gpu_s: float | None = None,
    usd_per_gpu_hour: float | None = None,
    min_steps: int = 20_000,
    max_steps: int = 100_000,
    reference_batch: int = 256,
    reference_lr: float = 1e-4,
    micro_batch: int = 1,
    extra_batches: tuple[int, ...] = (),
) -> Plan:
    """Candidates: powers of two times the data-parallel granularity, plus the recommendation."""
    if gpu not in GPU_PROFILES:
        raise ValueError(f"unknown GPU profile {gpu!r}; expected one of {sorted(GPU_PROFILES)}")
    if not 0 < min_steps <= max_steps:
        raise ValueError(f"step range: expected 0 < min <= max, got {min_steps}-{max_steps}")
    profile = GPU_PROFILES[gpu]
    rate = tokens_per_gpu_s or profile["tokens_per_gpu_s"]
    price = usd_per_gpu_hour if usd_per_gpu_hour is not None else profile["usd_per_gpu_hour"]
    granularity = micro_batch * gpus
    target_steps = math.sqrt(min_steps * max_steps)
    ideal = tokens / target_steps / seq_len
    recommended = max(granularity, round(ideal / granularity) * granularity)
    candidates = {recommended, reference_batch, *extra_batches}
    size = granularity
    while size * seq_len * min_steps <= tokens * 4 and size <= recommended * 8:
        candidates.add(size)
        size *= 2
    rows = []
    for batch in sorted(candidates):
        steps = math.ceil(tokens / (batch * seq_len))
        scale = lr_scale_for(batch, reference_batch, "sqrt")
        rows.append(
            PlanRow(batch, batch * seq_len, steps, reference_lr * scale, scale,
                    min_steps <= steps <= max_steps, batch == recommended)
        )
    hours = tokens / (rate * gpus) / 3600
    return Plan(tokens, seq_len, gpus, gpu, rate, price, min_steps, max_steps, reference_batch, reference_lr,
                hours, hours * gpus * price, rows)
