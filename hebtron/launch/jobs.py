"""``hebtron jobs``: the submitted runs of a cluster profile, with Slurm state (training, chained
evaluation, companion watch job), last checkpoint, last verdict and the best checkpoint chosen
by ``hebtron eval select``, read from each job directory's ``job.json`` and the run's checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hebtron.launch import slurm
from hebtron.launch.submit import JOB_FILE
from hebtron.launch.verdict import latest_verdict
from hebtron.checkpoints import find_latest, step_of
from hebtron.eval.select import best_checkpoint


@dataclass
class JobRow:
    name: str
    job_dir: str
    train_job_id: str | None
    train_state: str
    eval_job_id: str | None
    eval_state: str
    checkpoint: str | None
    step: int | None
    verdict: str | None
    submitted_at: str
    watch_job_id: str | None = None
    watch_state: str = "-"
    best_step: int | None = None
    best_checkpoint: str | None = None
    best_suite: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_records(jobs_root: Path) -> list[dict[str, Any]]:
    """Every readable ``job.json`` under ``jobs_root`` (one level down), oldest first."""
    records = []
    if not jobs_root.is_dir():
        return records
    for path in jobs_root.glob(f"*/{JOB_FILE}"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    records.sort(key=lambda r: (str(r.get("submitted_at") or ""), str(r.get("job_dir") or "")))
    return records


def list_jobs(jobs_root: Path) -> list[JobRow]:
    records = read_records(jobs_root)
    ids = [str(r.get(k)) for r in records for k in ("train_job_id", "eval_job_id", "watch_job_id") if r.get(k)]
    states = slurm.job_states(ids) if ids else {}
    rows = []
    for r in records:
        train_id, eval_id = r.get("train_job_id"), r.get("eval_job_id")
        ckpt_dir = Path(str(r.get("ckpt_dir") or ""))
        latest = find_latest(ckpt_dir) if r.get("ckpt_dir") else None
        verdict = latest_verdict(ckpt_dir) if r.get("ckpt_dir") else None
        best = best_checkpoint(ckpt_dir) if r.get("ckpt_dir") else None
        watch_id = r.get("watch_job_id")
        verdict_text = None
        if verdict is not None:
            verdict_text = f"{verdict.get('verdict')} (step {verdict.get('step')})"
        rows.append(JobRow(
            name=str(r.get("name")),
            job_dir=str(r.get("job_dir")),
            train_job_id=str(train_id) if train_id else None,
            train_state=_state(train_id, states),
            eval_job_id=str(eval_id) if eval_id else None,
            eval_state=_state(eval_id, states) if eval_id else "-",
            checkpoint=str(latest) if latest else None,
            step=step_of(latest) if latest else None,
            verdict=verdict_text,
            submitted_at=str(r.get("submitted_at") or ""),
            watch_job_id=str(watch_id) if watch_id else None,
            watch_state=_state(watch_id, states) if watch_id else "-",
            best_step=best["step"] if best else None,
            best_checkpoint=best["checkpoint"] if best else None,
            best_suite=best["suite"] if best else None,
        ))
    return rows


def _state(job_id: Any, states: dict[str, str]) -> str:
    if not job_id:
        return "NOT SUBMITTED"
    return states.get(str(job_id), "UNKNOWN")  # purged from slurmctld and no accounting


def format_table(rows: list[JobRow]) -> str:
    header = ("NAME", "TRAIN JOB", "STATE", "EVAL JOB", "STATE", "LAST CHECKPOINT", "VERDICT", "BEST", "SUBMITTED")
    body = [
        (
            r.name,
            r.train_job_id or "-",
            r.train_state,
            f"{r.watch_job_id} (watch)" if r.watch_job_id else r.eval_job_id or "-",
            r.watch_state if r.watch_job_id else r.eval_state,
            f"step {r.step}" if r.step is not None else "-",
            r.verdict or "-",
            f"step {r.best_step} ({r.best_suite})" if r.best_step is not None else "-",
            r.submitted_at,
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]) + "\n"
