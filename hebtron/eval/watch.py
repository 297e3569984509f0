"""``hebtron eval watch``: benchmark every checkpoint of a run as it lands, beside training.

Benchmarks, not the loss, tell which checkpoint to keep, and in the runs that worked they moved
only after long flat stretches: so every checkpoint (or every N-th) is evaluated, not just the
last. The watcher polls the run's checkpoint directory; for each new complete checkpoint that
is due it takes an evaluation lease (``step_N/EVALUATING-<host>-<pid>``, refreshed every minute),
so the trainer's ``keep_last`` pruning leaves it alone until its results are written to
``step_N/eval/<suite>.json``; then it releases the lease. It holds no file open, so nothing
else is blocked. The results also go to the run's ``metrics.jsonl`` and TensorBoard as
``eval/<task>/<metric>`` at the checkpoint's step, and to Weights & Biases when the run's
recipe has ``logging.wandb`` (the W&B run ``eval-<suite>`` beside the trainer's, see
:mod:`hebtron.train.wandb_mirror`).

Restarts: the results files are the record of what was evaluated, and the watcher's state
(``CKPT_DIR/eval-watch/<suite>.json``: which checkpoints it has seen, in order, for ``--every``)
lives beside the checkpoints, so a killed and restarted watcher evaluates nothing twice. It
ends after the run's last checkpoint (the trainer marks it ``final``) is evaluated, or, with
``--until-job``, once that Slurm job has left the queue and nothing is left to evaluate.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hebtron.checkpoints import (
    LEASE_PREFIX,
    LEASE_TTL_S,
    checkpoint_name,
    checkpoint_problem,
    lease_path,
    list_checkpoints,
    pid_alive,
    this_host,
)
from hebtron.eval.run_results import (
    RunDirs,
    archive_path,
    checkpoint_tokens,
    is_final_checkpoint,
    locate_run,
    results_path,
)

from hebtron.train.wandb_mirror import WandbMirror, wandb_settings_of_run

STATE_DIR = "eval-watch"
Evaluate = Callable[[Path], dict[str, Any]]


# --------------------------------------------------------------------------- leases
def acquire_lease(checkpoint: Path, suite: str) -> Path | None:
    """Take this process's evaluation lease on a complete checkpoint; None when it is gone.

    The lease is made by the checkpoint's name with O_EXCL, so it fails if pruning has already
    renamed the directory away; pruning re-checks for leases after its rename (see
    :func:`hebtron.train.checkpoint.prune_checkpoints`), so a lease made in time always wins."""
    _remove_dead_leases(checkpoint)
    path = lease_path(checkpoint)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return path  # ours already (a lease taken earlier in this process)
    except OSError:
        return None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"suite": suite, "host": this_host(), "pid": os.getpid(),
                             "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}) + "\n")
    if checkpoint_problem(checkpoint) is not None:  # renamed or damaged meanwhile
        release_lease(path)
        return None
    return path


def release_lease(lease: Path) -> None:
    try:
        lease.unlink()
    except FileNotFoundError:
        pass


def _remove_dead_leases(checkpoint: Path) -> None:
    """Leases this host's dead evaluators left (a killed watcher); other hosts' expire by age."""
    host = this_host()
    try:
        names = [p.name for p in checkpoint.iterdir() if p.name.startswith(LEASE_PREFIX)]
    except OSError:
        return
    for name in names:
        lease_host, _, pid = name[len(LEASE_PREFIX):].rpartition("-")
        if lease_host == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            release_lease(checkpoint / name)


class Heartbeat:
    """Refreshes the mtime of every held lease, so evaluators on other hosts count as alive."""

    def __init__(self, interval_s: float = LEASE_TTL_S / 10) -> None:
        self.leases: set[Path] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True, name="lease-heartbeat")
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                held = list(self.leases)
            for lease in held:
                try:
                    os.utime(lease)
                except OSError:
                    pass

    def hold(self, lease: Path) -> None:
        with self._lock:
            self.leases.add(lease)

    def drop(self, lease: Path) -> None:
        with self._lock:
            self.leases.discard(lease)
        release_lease(lease)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            held, self.leases = list(self.leases), set()
        for lease in held:
            release_lease(lease)


# --------------------------------------------------------------------------- state
@dataclass
class WatchState:
    """What the watcher has seen, persisted beside the checkpoints (atomic writes)."""

    suite: str
    every: int
    seen: list[int] = field(default_factory=list)
    evaluated: dict[str, str] = field(default_factory=dict)  # step -> ok | crashed | skipped | missed
    final_step: int | None = None

    @classmethod
    def load(cls, path: Path, suite: str, every: int) -> WatchState:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(suite, every)
        except (OSError, ValueError, RecursionError, UnicodeDecodeError):
            raw = None
        if not isinstance(raw, dict) or not isinstance(raw.get("seen"), list):
            from hebtron.errors import UserError

            raise UserError(f"{path}: unreadable watcher state; move it away to start over (results already "
                            "written beside the checkpoints are kept and not evaluated again)")
        if raw.get("every") != every:
            from hebtron.errors import UserError

            raise UserError(f"{path}: this run is watched with --every {raw.get('every')}, not {every}; "
                            "use the same value (or move the state file away to renumber)")
        return cls(suite, every, [int(s) for s in raw["seen"]], {str(k): str(v) for k, v in raw.get("evaluated", {}).items()},
                   raw.get("final_step"))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"suite": self.suite, "every": self.every, "seen": self.seen,
                                   "evaluated": self.evaluated, "final_step": self.final_step}, indent=1) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)

    def due(self, step: int, final: bool) -> bool:
        """Every ``every``-th checkpoint seen, and always the run's last one."""
        return final or (self.seen.index(step) + 1) % self.every == 0


# --------------------------------------------------------------------------- metrics
def log_eval_metrics(run_dir: Path | None, step: int, tokens: int | None, tag: str, payload: dict[str, Any],
                     mirror: WandbMirror | None = None) -> dict[str, Any]:
    """Append the results as one ``kind: eval`` record to ``metrics.jsonl`` (one write, so it
    never interleaves with the trainer's lines), to TensorBoard when the run has it, and to
    ``mirror`` (W&B) when given."""
    record: dict[str, Any] = {"step": step, "kind": "eval", "suite": tag}
    if tokens is not None:
        record["tokens"] = tokens
    for task, row in (payload.get("results") or {}).items():
        for key, value in row.items():
            if "," not in key or "_stderr," in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name, _, filt = key.partition(",")
            metric = name if filt == "none" else f"{name}_{filt}"
            record[f"eval/{task}/{metric}"] = value if value == value else None  # NaN -> null
            se = row.get(f"{name}_stderr,{filt}")
            if isinstance(se, int | float) and not isinstance(se, bool) and se == se:
                record[f"eval/{task}/{metric}_stderr"] = se
    if run_dir is None:
        return record
    line = json.dumps(record, ensure_ascii=False) + "\n"
    fd = os.open(run_dir / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
    tb_dir = run_dir / "tensorboard"
    if tb_dir.is_dir():
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(tb_dir), filename_suffix=f".eval-{tag}") as tb:
            for key, value in record.items():
                if key.startswith("eval/") and isinstance(value, int | float):
                    tb.add_scalar(key, value, global_step=step)
    if mirror is not None:
        mirror.log(record)
    return record


# --------------------------------------------------------------------------- the watcher
def slurm_job_active(job_id: str) -> bool:
    """Whether a Slurm job is still queued or running (``squeue`` lists it)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep watching rather than stop early
    if out.returncode != 0:  # "Invalid job id specified": long gone; anything else: cannot tell
        return "Invalid job id" not in out.stderr
    return bool(out.stdout.strip())


class Watcher:
    """Poll a run's checkpoints and evaluate the due ones; see the module docstring.

    A scout thread leases every new complete checkpoint as soon as it appears (every
    ``scout_s``), also while an evaluation runs: a trainer that saves faster than checkpoints are
    evaluated must not prune the ones still waiting. The main loop evaluates the due ones, oldest
    first, and releases each lease once the results are written (and archived, see
    :func:`hebtron.eval.run_results.archive_path`); skipped ones (``--every``) are released at once."""

    def __init__(
        self,
        run: str | Path,
        suite: str,
        evaluate: Evaluate,
        every: int = 1,
        checkpoints: str | Path | None = None,
        poll_s: float = 30.0,
        until_job: str | None = None,
        after_each: Callable[[], None] | None = None,
        say: Callable[[str], None] = print,
        scout_s: float = 1.0,
    ) -> None:
        from hebtron.eval.run_results import suite_tag

        if every < 1:
            from hebtron.errors import UserError

            raise UserError(f"--every: expected a positive number of checkpoints, got {every}")
        self.run, self.checkpoints = Path(run), checkpoints
        self.tag = suite_tag(suite)
        self.evaluate, self.every, self.poll_s = evaluate, every, poll_s
        self.scout_s = min(scout_s, poll_s)
        self.until_job, self.after_each, self.say = until_job, after_each, say
        self.dirs: RunDirs | None = None
        self.evaluations = 0
        self._held: dict[int, Path] = {}
        self._done: set[int] = set()  # steps the main loop has finished with (evaluated or skipped)
        self._lock = threading.Lock()
        self._wandb: WandbMirror | None = None
        self._wandb_checked = False

    def _state_path(self) -> Path:
        assert self.dirs is not None
        return self.dirs.ckpt_dir / STATE_DIR / f"{self.tag}.json"

    def _has_result(self, step: int, checkpoint: Path) -> bool:
        assert self.dirs is not None
        return results_path(checkpoint, self.tag).exists() or archive_path(self.dirs.ckpt_dir, self.tag, step).exists()

    def scout(self, heartbeat: Heartbeat) -> None:
        """Lease every complete checkpoint that has no result yet (idempotent)."""
        if self.dirs is None:
            return
        for step, checkpoint in list_checkpoints(self.dirs.ckpt_dir):
            with self._lock:
                if step in self._held or step in self._done:
                    continue
            if self._has_result(step, checkpoint):
                continue
            lease = acquire_lease(checkpoint, self.tag)
            if lease is not None:
                heartbeat.hold(lease)
                with self._lock:
                    self._held[step] = lease

    def _release(self, step: int, heartbeat: Heartbeat) -> None:
        with self._lock:
            self._done.add(step)
            lease = self._held.pop(step, None)
        if lease is not None:
            heartbeat.drop(lease)

    def poll(self, state: WatchState, heartbeat: Heartbeat) -> bool:
        """One pass: note new checkpoints, evaluate the due ones oldest first; True when done."""
        assert self.dirs is not None
        self._mirror()  # a recipe asking for W&B without wandb installed: one line now, not after an evaluation
        self.scout(heartbeat)
        present = dict(list_checkpoints(self.dirs.ckpt_dir))
        for step in sorted(present):
            if step not in state.seen and str(step) not in state.evaluated:
                state.seen.append(step)
        due = []
        for step in sorted(present):
            checkpoint = present[step]
            if str(step) in state.evaluated or self._has_result(step, checkpoint):
                if str(step) not in state.evaluated:
                    state.evaluated[str(step)] = "ok"  # written by another job (the chained evaluation)
                self._release(step, heartbeat)
                _remove_dead_leases(checkpoint)  # a killed watcher's, left between writing and releasing
                continue
            final = is_final_checkpoint(checkpoint)
            if final:
                state.final_step = step
            if not state.due(step, final):
                state.evaluated[str(step)] = "skipped"
                self._release(step, heartbeat)
            elif step in self._held:
                due.append(step)
        for step in state.seen:
            if str(step) not in state.evaluated and step not in present and not self._has_result(
                    step, self.dirs.ckpt_dir / checkpoint_name(step)):
                state.evaluated[str(step)] = "missed"  # pruned before the watcher could lease it
                self.say(f"eval watch: step {step} was pruned before it could be evaluated")
        state.save(self._state_path())
        for step in due:
            try:
                self._evaluate_one(step, present[step], state)
            finally:
                self._release(step, heartbeat)
            state.save(self._state_path())
        return state.final_step is not None and str(state.final_step) in state.evaluated

    def _evaluate_one(self, step: int, checkpoint: Path, state: WatchState) -> None:
        from hebtron.eval.runner import write_json

        assert self.dirs is not None
        started = time.perf_counter()
        payload = self.evaluate(checkpoint)
        tokens = checkpoint_tokens(checkpoint)
        meta = payload.setdefault("hebtron", {})
        meta.setdefault("step", step)
        meta["tokens"] = tokens
        out = archive_path(self.dirs.ckpt_dir, self.tag, step)
        if checkpoint_problem(checkpoint) is None:  # never re-create a pruned step_N as a fake directory
            out = results_path(checkpoint, self.tag)
            write_json(out, payload)
        else:
            self.say(f"eval watch: step {step} was pruned during its evaluation (a lease was lost)")
        write_json(archive_path(self.dirs.ckpt_dir, self.tag, step), payload)
        status = meta.get("status", "ok")
        state.evaluated[str(step)] = "ok" if status == "ok" else str(status)
        self.evaluations += 1
        log_eval_metrics(self.dirs.run_dir, step, tokens, self.tag, payload, self._mirror())
        self.say(f"eval watch: step {step}: {status} in {time.perf_counter() - started:.1f} s -> {out}")
        gc.collect()
        if self.after_each is not None:
            self.after_each()

    def _mirror(self) -> WandbMirror | None:
        """The W&B run for this suite's results, when the run's recipe asks for one (opened once)."""
        assert self.dirs is not None
        if not self._wandb_checked and self.dirs.run_dir is not None:
            settings = wandb_settings_of_run(self.dirs.run_dir)
            self._wandb_checked = settings is not None or (self.dirs.run_dir / "recipe.yaml").is_file()
            if settings is not None:
                self._wandb = WandbMirror(settings, self.dirs.run_dir, f"eval-{self.tag}")
        return self._wandb

    def _scout_loop(self, heartbeat: Heartbeat, stop: threading.Event) -> None:
        while not stop.wait(self.scout_s):
            try:
                self.scout(heartbeat)
            except OSError:  # a checkpoint vanishing mid-scan: the next pass sees the new state
                pass

    def run_until_done(self, once: bool = False) -> WatchState:
        """Watch until the final checkpoint is evaluated (or, with ``once``, one pass)."""
        heartbeat, stop = Heartbeat(), threading.Event()
        self.say(f"eval watch: watching {self.checkpoints or self.run} for suite {self.tag} "
                 f"(every {self.every} checkpoint{'s' if self.every > 1 else ''})")
        scout = threading.Thread(target=self._scout_loop, args=(heartbeat, stop), daemon=True, name="eval-scout")
        scout.start()
        try:
            while True:
                if self.dirs is None or not self.dirs.ckpt_dir.is_dir():
                    self.dirs = locate_run(self.run, self.checkpoints, must_exist=once)
                if self.dirs is not None and self.dirs.ckpt_dir.is_dir():
                    state = WatchState.load(self._state_path(), self.tag, self.every)
                    if self.poll(state, heartbeat) or once:
                        return state
                if self.until_job is not None and not slurm_job_active(self.until_job):
                    if self.dirs is not None:  # the training job is gone: a last pass, then stop
                        state = WatchState.load(self._state_path(), self.tag, self.every)
                        self.poll(state, heartbeat)
                        self.say(f"eval watch: Slurm job {self.until_job} has ended; stopping")
                        return state
                    self.say(f"eval watch: Slurm job {self.until_job} has ended and left no checkpoints")
                    return WatchState(self.tag, self.every)
                time.sleep(self.poll_s)
        finally:
            stop.set()
            scout.join(timeout=10)
            heartbeat.close()
            if self._wandb is not None:
                self._wandb.close()
                self._wandb = None
