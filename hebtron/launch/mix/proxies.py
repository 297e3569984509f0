"""Proxy runs: Dirichlet-drawn mixtures, one ``hebtron train`` run each, resumable and parallel.

Layout under the search's output directory::

    plan.json                    the mixtures (seeded), fixed once written
    runs/<name>/recipe.yaml      extends the proxy recipe; data.sources = the mixture, data.valid = targets
    runs/<name>/train.log        the run's output
    runs/<name>/result.json      written once the run finished: weights and final target losses

A run with a ``result.json`` is done and is never repeated; any other run is (re)started with
``--resume auto``, so it continues from its last checkpoint. Each run is a ``hebtron train``
process (the same command a user types), ``parallel`` at a time with ``threads`` torch threads each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hebtron.errors import UserError
from hebtron.launch.mix.spec import MixSpec

MAX_DRAWS = 100_000


def draw_mixtures(spec: MixSpec) -> np.ndarray:
    """``search.runs`` Dirichlet(alpha) draws that respect every source's [min, max] (rejection)."""
    rng = np.random.default_rng(spec.search.seed)
    lower = np.array([s.min for s in spec.sources])
    upper = np.array([s.max for s in spec.sources])
    n = len(spec.sources)
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < spec.search.runs:
        w = rng.dirichlet(np.full(n, spec.search.alpha))
        tries += 1
        if np.all(w >= lower) and np.all(w <= upper):
            out.append(w)
        elif tries > MAX_DRAWS:
            raise UserError(f"sources: min/max bounds accept fewer than {spec.search.runs} of {MAX_DRAWS:,} "
                            f"Dirichlet draws; widen them or raise search.alpha")
    return np.array(out)


@dataclass(frozen=True)
class ProxyRun:
    name: str
    weights: dict[str, float]
    run_dir: Path
    overrides: tuple[str, ...] = ()  # on top of the proxy recipe's own (a check run's seed, say)

    @property
    def recipe(self) -> Path:
        return self.run_dir / "recipe.yaml"

    @property
    def result(self) -> Path:
        return self.run_dir / "result.json"

    @property
    def trained_marker(self) -> Path:
        return self.run_dir / "TRAINED"  # written by the Slurm array task after `hebtron train` succeeded

    def done(self) -> bool:
        return self.result.is_file()


def write_recipe(spec: MixSpec, run: ProxyRun) -> None:
    """The run's recipe: the proxy recipe with this mixture, the targets as validation sets and
    the run's own directories. Sources with weight 0 are left out (recipes need weights > 0)."""
    sources = [{"name": s.name, "path": s.path, "weight": round(float(run.weights[s.name]), 8),
                **({"lang": s.lang} if s.lang else {})}
               for s in spec.sources if run.weights[s.name] > 0]
    valid = [{"name": t.name, "path": t.path, **({"lang": t.lang} if t.lang else {})} for t in spec.targets]
    tree: dict[str, Any] = {
        "extends": spec.proxy.recipe,
        "data": {"sources": sources, "valid": valid, "phases": None},
        "logging": {"run_dir": str(run.run_dir)},
        "checkpoint": {"dir": str(run.run_dir / "checkpoints")},
    }
    run.run_dir.mkdir(parents=True, exist_ok=True)
    text = "# written by hebtron data mix-search\n" + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    _write_atomic(run.recipe, text)


def hebtron_command() -> str:
    """The ``hebtron`` console script of this interpreter's environment (else the one on PATH):
    proxies run the very command a user types, in their own processes."""
    found = shutil.which("hebtron", path=os.path.dirname(sys.executable)) or shutil.which("hebtron")
    if found is None:
        raise UserError("the hebtron command is not installed next to this Python (pip install -e .)")
    return found


def train_command(spec: MixSpec, run: ProxyRun) -> list[str]:
    return [hebtron_command(), "train", str(run.recipe), *spec.proxy.overrides, *run.overrides, "--resume", "auto"]


def final_losses(run_dir: Path, targets: list[str]) -> dict[str, float]:
    """The last validation loss of each target in the run's metrics.jsonl."""
    found: dict[str, float] = {}
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics}: missing; did the proxy run start?")
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for t in targets:
                if f"val_loss/{t}" in rec:
                    found[t] = float(rec[f"val_loss/{t}"])
    missing = [t for t in targets if t not in found]
    if missing:
        raise UserError(f"{metrics}: no validation loss for {', '.join(missing)}")
    return found


def objective(spec: MixSpec, losses: dict[str, float]) -> float:
    total = sum(t.weight for t in spec.targets)
    return sum(t.weight * losses[t.name] for t in spec.targets) / total


def record_result(spec: MixSpec, run: ProxyRun, seconds: float | None = None) -> dict[str, Any]:
    losses = final_losses(run.run_dir, [t.name for t in spec.targets])
    result = {"name": run.name, "weights": run.weights, "val_loss": losses, "objective": objective(spec, losses),
              "seconds": None if seconds is None else round(seconds, 1)}
    _write_atomic(run.result, json.dumps(result, indent=2) + "\n")
    return result


def run_all(spec: MixSpec, runs: list[ProxyRun], parallel: int, threads: int, log=print) -> None:
    """Train every run that is not done, ``parallel`` processes at a time; fail with the log's
    last line when a run fails (the others already started are finished first)."""
    pending = [r for r in runs if not r.done()]
    for r in pending:
        write_recipe(spec, r)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    active: list[tuple[ProxyRun, subprocess.Popen, float, Any]] = []
    failed: list[str] = []
    while pending or active:
        while pending and len(active) < parallel and not failed:
            r = pending.pop(0)
            logf = open(r.run_dir / "train.log", "a", encoding="utf-8")
            proc = subprocess.Popen(train_command(spec, r), stdout=logf, stderr=subprocess.STDOUT, env=env)
            active.append((r, proc, time.perf_counter(), logf))
            log(f"  started {r.name} ({_mixture_text(r.weights)})")
        if failed and not active:
            break
        time.sleep(0.2)
        for item in list(active):
            r, proc, t0, logf = item
            if proc.poll() is None:
                continue
            active.remove(item)
            logf.close()
            if proc.returncode == 0:
                res = record_result(spec, r, time.perf_counter() - t0)
                log(f"  done {r.name}: objective {res['objective']:.4f} in {res['seconds']:.0f} s")
            else:
                failed.append(f"{r.name} (exit {proc.returncode}): {_last_line(r.run_dir / 'train.log')}")
    if failed:
        raise UserError(f"proxy run failed: {failed[0]}; see its train.log; rerun to resume")


def _mixture_text(weights: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in weights.items())


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
