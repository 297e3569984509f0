"""The chained evaluation's verdict record, ``CHECKPOINT/eval/<suite>.verdict.json``.

The evaluation job (slurm/eval.sbatch.j2) runs ``hebtron eval run`` and ``hebtron eval gate``
and then ``python -m hebtron.launch.verdict``, which records the outcome in one small file
beside the checkpoint, errors included (a gate that could not run leaves no ``*.gate.json``).
``hebtron jobs`` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

VERDICTS = {0: "accept", 1: "reject"}
_STEP = re.compile(r"^step_(\d+)$")


def verdict_path(checkpoint: Path, tag: str) -> Path:
    return checkpoint / "eval" / f"{tag}.verdict.json"


def build_record(checkpoint: Path, suite: str, tag: str, eval_exit: int, gate_exit: int, job_dir: str | None) -> dict[str, Any]:
    out = checkpoint / "eval"
    gate_json = out / f"{tag}.gate.json"
    reasons: list[str] = []
    if gate_json.is_file():
        try:
            reasons = list(json.loads(gate_json.read_text(encoding="utf-8")).get("reasons") or [])
        except (OSError, ValueError, AttributeError):
            reasons = [f"{gate_json}: unreadable"]
    step = _STEP.match(checkpoint.name)
    return {
        "verdict": VERDICTS.get(gate_exit, "error"),
        "checkpoint": str(checkpoint),
        "step": int(step.group(1)) if step else None,
        "suite": suite,
        "results": str(out / f"{tag}.json"),
        "gate": str(gate_json) if gate_json.is_file() else None,
        "report": str(out / f"{tag}.gate.md") if (out / f"{tag}.gate.md").is_file() else None,
        "reasons": reasons,
        "eval_exit": eval_exit,
        "gate_exit": gate_exit,
        "eval_job_id": os.environ.get("SLURM_JOB_ID"),
        "job_dir": job_dir,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_verdict(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def latest_verdict(ckpt_dir: Path) -> dict[str, Any] | None:
    """The newest verdict record among a run's checkpoints (by step, then time)."""
    best: tuple[int, str, dict[str, Any]] | None = None
    if not ckpt_dir.is_dir():
        return None
    for path in ckpt_dir.glob("step_*/eval/*.verdict.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        key = (int(record.get("step") or -1), str(record.get("time") or ""), record)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hebtron.launch.verdict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--eval-exit", type=int, required=True)
    parser.add_argument("--gate-exit", type=int, required=True)
    parser.add_argument("--job-dir", default=None)
    args = parser.parse_args(argv)
    record = build_record(args.checkpoint, args.suite, args.tag, args.eval_exit, args.gate_exit, args.job_dir)
    path = verdict_path(args.checkpoint, args.tag)
    write_verdict(record, path)
    print(f"verdict: {record['verdict']} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
