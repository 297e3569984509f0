"""Per-step metrics: an append-only JSONL file (the record), TensorBoard (the view), progress.

``metrics.jsonl`` holds one JSON object per optimizer step. After a crash the run resumes from
its last checkpoint, so steps logged after that checkpoint are replayed; on resume the file is
cut back to the resumed step so every step appears once and the curve matches the weights.
Non-finite numbers are written as ``null`` so the file stays strict JSON for any reader.
With recipe ``logging.wandb`` each record is mirrored to Weights & Biases too
(:mod:`hebtron.train.wandb_mirror`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
REQUIRED_KEYS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s")
# The record of the step that aborted a run (NaN limit, early kill, routing alarm) carries the
# reason under this key; it is then the file's last record.
ABORT_KEY = "aborted"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All well-formed records of a metrics file (a torn last line from a crash is skipped)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.exists():
        return []
    records = []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            rec = _parse(line)
            if rec is not None:
                records.append(rec)
    return records


def truncate_metrics(path: str | os.PathLike, after_step: int) -> int:
    """Drop records with ``step > after_step`` (and torn lines); return how many were dropped.

    Rewrites via a temporary file and ``os.replace`` so a crash here cannot lose the file.
    """
    p = Path(path)
    if not p.exists():
        return 0
    kept, dropped = [], 0
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            rec = _parse(line)
            if rec is None or rec["step"] > after_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    return dropped


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
        return None
    return rec


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; non-finite floats to None; recurse."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # torch / numpy scalar or array
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(f"metrics: cannot log value of type {type(value).__name__}")


def _scalars(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    """Flatten numbers and nested dicts to ``a/b`` tags for TensorBoard; lists are skipped."""
    if isinstance(value, bool):
        yield prefix, float(value)
    elif isinstance(value, (int, float)):
        yield prefix, float(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _scalars(f"{prefix}/{k}", v)


class MetricsWriter:
    """Append one record per optimizer step to ``run_dir/metrics.jsonl`` (+ TensorBoard).

    Create it on every rank with ``enabled=(rank == 0)`` so the loop needs no rank checks.
    ``resume_step`` cuts the file (and TensorBoard, via ``purge_step``) back to that step;
    without it the run is fresh and the file starts empty.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = False,
        resume_step: int | None = None,
        enabled: bool = True,
        wandb: Any = None,
    ) -> None:
        """``wandb``: the recipe's ``logging.wandb`` section (or None)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._fh = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if wandb is not None:  # first: a missing package is one line before any file is touched
            from hebtron.train.wandb_mirror import WandbMirror

            self._wandb = WandbMirror(wandb, self.run_dir, "train")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
            self._fh = open(self.path, "a", encoding="utf-8")
        else:  # fresh run: records of an earlier attempt would interleave with the new steps
            self._fh = open(self.path, "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one step's record; it must hold :data:`REQUIRED_KEYS`, may hold any others."""
        if not self.enabled:
            return
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise KeyError(f"metrics record for step {record.get('step')}: missing {missing}")
        rec = _plain(dict(record))
        if not isinstance(rec["step"], int):
            raise TypeError(f"metrics: step must be an int, got {record['step']!r}")
        assert self._fh is not None
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = rec["step"]
            for key, value in rec.items():
                if key == "step":
                    continue
                for tag, scalar in _scalars(key, value):
                    self._tb.add_scalar(tag, scalar, global_step=step)
            if isinstance(rec.get(ABORT_KEY), str):  # why the run stopped: a text entry, on disk before exit
                self._tb.add_scalar(ABORT_KEY, 1.0, global_step=step)
                self._tb.add_text(ABORT_KEY, rec[ABORT_KEY], global_step=step)
                self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(rec)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Progress over *tokens* (batch size may change) with an ETA.

    On a terminal it draws a rich progress bar. Without one (Slurm logs, CI) it prints a plain
    line at most every ``plain_every_s`` seconds instead of control codes. ``enabled=False``
    (non-zero ranks, tests) makes every call a no-op.
    """

    def __init__(
        self,
        total_tokens: int,
        start_tokens: int = 0,
        enabled: bool = True,
        plain_every_s: float = 30.0,
        stream: Any = None,
    ) -> None:
        self.total = max(int(total_tokens), 1)
        self.enabled = enabled
        self.plain_every_s = plain_every_s
        self.stream = stream if stream is not None else sys.stdout
        self._start_tokens = start_tokens
        self._t0 = time.monotonic()
        self._last_plain = -math.inf
        self._bar = None
        self._task = None
        if not enabled:
            return
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        if is_tty:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task("train", total=self.total, completed=start_tokens)
            self._bar.start()

    def eta_s(self, tokens: int) -> float:
        """Seconds left at the average token rate of this process so far."""
        done = tokens - self._start_tokens
        elapsed = time.monotonic() - self._t0
        if done <= 0 or elapsed <= 0:
            return math.inf
        return max(self.total - tokens, 0) * elapsed / done

    def update(self, step: int, tokens: int, loss: float | None = None,
               lr: float | None = None) -> None:
        if not self.enabled:
            return
        desc = f"step {step}"
        if loss is not None:
            desc += f" loss {loss:.4f}"
        if lr is not None:
            desc += f" lr {lr:.2e}"
        if self._bar is not None:
            self._bar.update(self._task, completed=tokens, description=desc)
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_every_s or tokens >= self.total:
            self._last_plain = now
            pct = 100.0 * tokens / self.total
            print(f"{desc} | tokens {tokens:,}/{self.total:,} ({pct:.1f}%) | "
                  f"eta {_fmt_duration(self.eta_s(tokens))}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
