"""The mixture search end to end: plan, proxy runs, regression, proposal, fragment, report.

Outputs under ``out/``: ``plan.json``, ``runs/proxy_NN/``, ``proposal.yaml`` (a recipe fragment:
``data.sources`` with the proposed weights, optionally ``extends:`` the spec's fragment.extends),
``report.json`` and ``report.md``. Running it again resumes: finished runs are kept, unfinished
ones continue from their checkpoints, and a plan written with other settings is refused.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hebtron.errors import UserError
from hebtron.launch.mix.proxies import ProxyRun, draw_mixtures, record_result, run_all, write_recipe
from hebtron.launch.mix.regression import choose, minimise, project, top_k_mean
from hebtron.launch.mix.spec import MixSpec, load_spec


def _fingerprint(spec: MixSpec) -> str:
    key = {"sources": [s.name for s in spec.sources], "targets": [t.name for t in spec.targets],
           "search": spec.search.model_dump(exclude={"model", "propose", "top_k"}), "proxy": spec.proxy.model_dump()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def plan_runs(spec: MixSpec, out: Path) -> list[ProxyRun]:
    """The proxy runs of this search, from ``out/plan.json`` (written on the first call)."""
    plan_file = out / "plan.json"
    fingerprint = _fingerprint(spec)
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        if plan.get("fingerprint") != fingerprint:
            raise UserError(f"{plan_file}: a search with other sources, targets, proxy or search settings; "
                            "use another --out (or delete it to start over)")
    else:
        mixtures = draw_mixtures(spec)
        plan = {"fingerprint": fingerprint, "sources": spec.names,
                "mixtures": [dict(zip(spec.names, map(float, w))) for w in mixtures]}
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(plan_file, json.dumps(plan, indent=2) + "\n")
    return [ProxyRun(f"proxy_{i:02d}", w, out / "runs" / f"proxy_{i:02d}") for i, w in enumerate(plan["mixtures"])]


def natural_weights(spec: MixSpec) -> np.ndarray:
    """Size-proportional weights: each source's share of all tokens."""
    from hebtron.data.indexed import open_indexed

    tokens = np.array([float(open_indexed(s.path).sequence_lengths.sum()) for s in spec.sources])
    if tokens.sum() <= 0:
        raise UserError("sources: every indexed dataset is empty")
    return tokens / tokens.sum()


def mix_search(spec_path: str | os.PathLike[str], out: Path, parallel: int = 1, threads: int = 1,
               slurm: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the search; with ``slurm``, submit the unfinished runs as a job array
    and return ``{"submitted": job_id}`` (run again when the array is done)."""
    if parallel < 1 or threads < 1:
        raise UserError(f"--parallel and --threads must be >= 1, got {parallel} and {threads}")
    spec = load_spec(spec_path)
    runs = plan_runs(spec, out)
    for r in runs:
        if not r.done() and r.trained_marker.is_file():
            record_result(spec, r)
    todo = [r for r in runs if not r.done()]
    if todo and slurm is not None:
        return _submit_array(spec, out, slurm, todo, log)
    if todo:
        log(f"{len(todo)} of {len(runs)} proxy runs to train ({parallel} at a time, {threads} threads each)")
        run_all(spec, runs, parallel, threads, log)
    results = [json.loads(r.result.read_text(encoding="utf-8")) for r in runs]
    report = fit_and_propose(spec, results)
    report["out"] = str(out)
    _write_atomic(out / "proposal.yaml", fragment_text(spec, report["proposal"]["weights"]))
    report["fragment"] = str(out / "proposal.yaml")
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "report.md", report_markdown(report))
    return report


def fit_and_propose(spec: MixSpec, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Regression of the objective on the weights, and the mixture it predicts best."""
    names = spec.names
    w = np.array([[r["weights"][n] for n in names] for r in results])
    y = np.array([r["objective"] for r in results])
    chosen, fits = choose(w, y, spec.search.model)
    lower = np.array([s.min for s in spec.sources])
    upper = np.array([s.max for s in spec.sources])
    natural = natural_weights(spec)
    uniform = np.full(len(names), 1 / len(names))
    search = spec.search
    if search.propose == "argmin":
        proposal = minimise(chosen, lower, upper, np.vstack([uniform, natural, w]))
    else:
        proposal = top_k_mean(chosen, lower, upper, search.alpha, search.seed, top=search.top_k)
    best = int(np.argmin(y))

    def point(weights: np.ndarray) -> dict[str, Any]:
        return {"weights": {n: round(float(v), 6) for n, v in zip(names, weights)},
                "predicted_objective": round(float(chosen.predict(weights[None, :])[0]), 5),
                "within_bounds": bool(np.all(weights >= lower - 1e-9) and np.all(weights <= upper + 1e-9))}

    return {
        "sources": names, "targets": {t.name: t.weight for t in spec.targets},
        "runs": [{"name": r["name"], "weights": r["weights"], "val_loss": r["val_loss"], "objective": r["objective"],
                  "loo_predicted": round(float(p), 5)} for r, p in zip(results, chosen.loo_predictions)],
        "regression": {"chosen": chosen.kind, "fits": [f.summary() for f in fits],
                       "why": "ridge: ~16 runs support a linear or quadratic model, not a tree ensemble; the "
                              "feature set that ranks held-out runs best (leave-one-out Spearman) is used",
                       "held_out_spearman": round(chosen.loo_spearman, 4)},
        "proposal": point(proposal),
        "proposal_method": search.propose if search.propose == "argmin" else f"top_k_mean (k={search.top_k})",
        "natural": point(natural),
        "natural_in_bounds": point(project(natural, lower, upper)),
        "uniform": point(uniform),
        "best_proxy": {"name": results[best]["name"], "objective": results[best]["objective"],
                       **point(w[best])},
    }


def fragment_text(spec: MixSpec, weights: dict[str, float]) -> str:
    """``data.sources`` with the proposed weights (sources at 0 left out), for ``extends:``."""
    sources = [{"name": s.name, "path": s.path, "weight": weights[s.name], **({"lang": s.lang} if s.lang else {})}
               for s in spec.sources if weights[s.name] > 1e-6]
    tree: dict[str, Any] = {}
    if spec.fragment.extends:
        tree["extends"] = spec.fragment.extends
    tree["data"] = {"sources": sources}
    head = ("# written by hebtron data mix-search: the proposed mixture. Use it with `extends:` in a recipe\n"
            "# (lists are replaced whole, so this is the complete source list).\n")
    return head + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def _submit_array(spec: MixSpec, out: Path, profile: str, todo: list[ProxyRun], log: Callable[[str], None]) -> dict[str, Any]:
    from hebtron.launch.mix.slurm_array import render_array, write_array
    from hebtron.launch.slurm import sbatch

    for r in todo:
        write_recipe(spec, r)
    script = write_array(out / "slurm" / "proxies.sbatch",
                         render_array(profile, todo, spec.proxy.overrides, Path.cwd().resolve()))
    job_id = sbatch(script, cwd=out / "slurm")
    log(f"submitted {len(todo)} proxy runs as job array {job_id} ({script}); run this command again when it is done")
    return {"submitted": job_id, "script": str(script), "runs": [r.name for r in todo]}


def _cell(value: Any) -> str:
    return html.escape(str(value)).replace("|", "&#124;")


def report_markdown(report: dict[str, Any]) -> str:
    names = report["sources"]
    reg = report["regression"]
    lines = ["# Mixture search", "",
             "Targets (objective = weighted mean validation loss): "
             + ", ".join(f"{_cell(t)} x{w}" for t, w in report["targets"].items()), "",
             f"Regression: ridge on **{reg['chosen']}** features; held-out (leave-one-out) Spearman "
             f"**{reg['held_out_spearman']}**. {reg['why']}. Proposal: {report['proposal_method']}.", "",
             "| features | ridge alpha | LOO RMSE | LOO Spearman | LOO Pearson |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {f['features']} | {f['ridge_alpha']:.2g} | {f['loo_rmse']} | {f['loo_spearman']} | {f['loo_pearson']} |"
              for f in reg["fits"]]
    lines += ["", "| mixture | " + " | ".join(map(_cell, names)) + " | predicted |", "|---|" + "---:|" * (len(names) + 1)]
    for label in ("proposal", "natural", "uniform", "best_proxy"):
        p = report[label]
        lines.append(f"| {label} | " + " | ".join(f"{p['weights'][n]:.3f}" for n in names)
                     + f" | {p['predicted_objective']:.4f} |")
    lines += ["", "## Proxy runs", "", "| run | " + " | ".join(map(_cell, names)) + " | objective | LOO predicted |",
              "|---|" + "---:|" * (len(names) + 2)]
    for r in report["runs"]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['weights'][n]:.3f}" for n in names)
                     + f" | {r['objective']:.4f} | {r['loo_predicted']:.4f} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

