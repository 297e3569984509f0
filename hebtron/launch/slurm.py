"""The few Slurm client commands hebtron runs: ``sbatch --parsable`` and job-state queries.

Arguments go to the commands as a list (no shell). Failures become one-line UserErrors that
quote Slurm's own message.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from hebtron.errors import UserError
from hebtron.recipe.hints import one_line

TIMEOUT_S = 60


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]}: not found; is this a Slurm login node? (slurm/local/start.sh starts one here)")
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"{cmd[0]}: no answer from Slurm in {TIMEOUT_S} s") from None


def sbatch(script: Path, cwd: Path, dependency: str | None = None, args: Sequence[str] = ()) -> str:
    """Submit ``script`` (with ``args``: kept by Slurm across requeues) with ``cwd`` as the job's
    working directory; returns the job id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    cmd += [str(script), *args]
    done = _run(cmd, cwd=cwd)
    if done.returncode != 0:
        raise UserError(one_line(f"sbatch {script}: {done.stderr.strip() or done.stdout.strip() or 'failed'}"))
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = done.stdout.strip().splitlines()[-1].split(";")[0] if done.stdout.strip() else ""
    if not job_id.isdigit():
        raise UserError(one_line(f"sbatch {script}: expected a job id, got {done.stdout.strip()!r}"))
    return job_id


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Slurm state of each job (PENDING, RUNNING, COMPLETED, FAILED, ...) that Slurm still knows.

    Asks ``squeue`` (jobs in slurmctld's memory, finished ones for MinJobAge), then ``sacct``
    for the rest where accounting is on. Jobs neither knows are left out.
    """
    wanted = {j for j in job_ids if j}
    states: dict[str, str] = {}
    if not wanted:
        return states
    done = _run(["squeue", "--noheader", "--states=all", "--format=%i|%T"])
    if done.returncode == 0:
        for line in done.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            if job in wanted and state:
                states[job] = state
    missing = sorted(wanted - states.keys())
    if missing and shutil.which("sacct"):
        done = _run(["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobIDRaw,State",
                     f"--jobs={','.join(missing)}"])
        if done.returncode == 0:
            for line in done.stdout.splitlines():
                job, _, state = line.strip().partition("|")
                if job in wanted and state:
                    states[job] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states
