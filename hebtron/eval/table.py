"""``hebtron eval table``: a run's benchmarks over its checkpoints, as markdown and a PNG.

The table has one row per evaluated checkpoint (``step_N/eval/<suite>.json``, written by
``hebtron eval watch`` or the chained evaluation) and one column per task metric with its
stderr, plus the gate verdict and KEEP mark where there are any. The PNG draws every metric
over the steps (with the trained tokens on a second axis) under the training and validation
loss from ``metrics.jsonl``, on one shared x-axis: the loss can fall while the benchmarks
stay flat or fall, and only the two side by side show it.

A directory with no per-checkpoint results but ``*.gate.json`` verdicts (``hebtron eval gate``
on results kept elsewhere) gets the older table of gated metrics per verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hebtron.errors import UserError
from hebtron.jsonio import read_json_object
from hebtron.eval.run_results import suite_tag


def collect(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per gate file: checkpoint, step, verdict, {task/metric: candidate value}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    rows = []
    for path in sorted(run_dir.rglob("*.gate.json")):
        data = read_json_object(path, "gate verdict (.gate.json)")
        cand, checks = data.get("candidate") or {}, data.get("checks", [])
        if not isinstance(cand, dict):
            raise UserError(f"{path}: candidate: expected an object, got {type(cand).__name__}")
        if not isinstance(checks, list) or not all(
                isinstance(c, dict) and isinstance(c.get("task"), str) and isinstance(c.get("metric"), str) for c in checks):
            raise UserError(f"{path}: checks: expected a list of objects with string task and metric (as "
                            "`hebtron eval gate` writes)")
        values = {f"{c['task']} {c['metric'].removesuffix(',none')}": c.get("candidate") for c in checks}
        rows.append({
            "file": str(path),
            "checkpoint": cand.get("checkpoint") or cand.get("path", str(path)),
            "step": cand.get("step"),
            "verdict": data.get("verdict", "reject"),
            "reasons": data.get("reasons", []),
            "values": values,
        })
    if not rows:
        raise UserError(f"{run_dir}: no evaluated checkpoints (no step_N/eval/SUITE.json results, no *.gate.json "
                        "verdicts; run `hebtron eval watch` or `hebtron eval gate` first)")
    rows.sort(key=lambda r: (r["step"] is None, r["step"] if r["step"] is not None else 0, r["checkpoint"]))
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r["values"]))
    return list(seen)


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    lines = ["| checkpoint | step | " + " | ".join(cols) + " | verdict |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r["values"].get(c)
            cells.append("—" if v is None else f"{v:.4g}")
        lines.append(f"| {Path(r['checkpoint']).name} | {r['step'] if r['step'] is not None else '—'} | "
                     + " | ".join(cells) + f" | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]]) -> Figure:
    """One panel per gated metric against the step; accepted points green, rejected red."""
    cols = columns(rows)
    fig = Figure(figsize=(4.2 * max(1, len(cols)), 3.2))
    xs = [r["step"] if r["step"] is not None else i for i, r in enumerate(rows)]
    for k, col in enumerate(cols):
        ax = fig.add_subplot(1, max(1, len(cols)), k + 1)
        pts = [(x, r["values"].get(col), r["verdict"]) for x, r in zip(xs, rows, strict=True)
               if r["values"].get(col) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.6", linewidth=1)
            for x, y, verdict in pts:
                ax.scatter([x], [y], color="tab:green" if verdict == "accept" else "tab:red", zorder=3)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------- per-checkpoint results
def _metric_cells(data: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """``{"task metric": (value, stderr)}`` of one results payload (lm-eval's unfiltered names)."""
    cells = {}
    for task, row in (data.get("results") or {}).items():
        for key, value in row.items():
            if "," not in key or "_stderr," in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name, _, filt = key.partition(",")
            se = row.get(f"{name}_stderr,{filt}")
            label = f"{task} {name}" + ("" if filt == "none" else f" [{filt}]")
            finite = value if math.isfinite(value) else None
            cells[label] = (finite, float(se) if isinstance(se, int | float) and not isinstance(se, bool)
                            and math.isfinite(se) else None)
    return cells


def result_rows(ckpt_dir: Path, suite: str | None = None) -> list[dict[str, Any]]:
    """One row per (checkpoint, suite) with results, by step."""
    from hebtron.checkpoints import EVAL_DIR, KEEP_FILE
    from hebtron.eval.run_results import evaluated_checkpoints

    tags = {suite_tag(suite)} if suite else {p.stem for p in ckpt_dir.glob(f"step_*/{EVAL_DIR}/*.json")
                                             if not p.name.endswith(".gate.json")}
    rows = []
    for tag in sorted(tags):
        for e in evaluated_checkpoints(ckpt_dir, tag):
            gate_file = e.path.with_name(f"{tag}.gate.json")
            verdict = None
            if gate_file.is_file():
                try:
                    verdict = json.loads(gate_file.read_text(encoding="utf-8")).get("verdict")
                except (OSError, ValueError, RecursionError, AttributeError):
                    verdict = "unreadable"
            rows.append({"suite": tag, "step": e.step, "tokens": e.tokens, "checkpoint": str(e.checkpoint),
                         "status": "ok" if e.problem is None else "failed", "problem": e.problem,
                         "cells": _metric_cells(e.data) if e.data else {}, "verdict": verdict,
                         "keep": (e.checkpoint / KEEP_FILE).is_file()})
    return sorted(rows, key=lambda r: (r["step"], r["suite"]))


def results_markdown(rows: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(label for r in rows for label in r["cells"]))
    lines = ["| suite | step | tokens | " + " | ".join(labels) + " | status | gate | keep |",
             "|---|---|---|" + "---|" * len(labels) + "---|---|---|"]
    for r in rows:
        cells = []
        for label in labels:
            value, se = r["cells"].get(label, (None, None))
            cells.append("—" if value is None else f"{value:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
        tokens = f"{r['tokens']:,}" if r["tokens"] is not None else "—"
        status = r["status"] if r["problem"] is None else f"failed: {r['problem']}"
        lines.append(f"| {r['suite']} | {r['step']} | {tokens} | " + " | ".join(cells)
                     + f" | {status} | {r['verdict'] or '—'} | {'KEEP' if r['keep'] else ''} |")
    return "\n".join(lines) + "\n"


def curves(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> Figure:
    """The training and validation loss on top, then one panel per metric, on one step axis;
    the trained tokens on a second axis at the top, mapped from the run's own records."""
    import numpy as np

    labels = list(dict.fromkeys(label for r in rows for label in r["cells"]))
    train = [r for r in records if r.get("kind") != "eval" and isinstance(r.get("loss"), int | float)]
    panels = 1 + len(labels)
    fig = Figure(figsize=(7.5, 2.2 * panels + 0.6))
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.55", linewidth=0.8, label="train loss")
        val_keys = sorted({k for r in train for k in r if k.startswith("val_loss/")})
        for key in val_keys:
            pts = [(r["step"], r[key]) for r in train if isinstance(r.get(key), int | float)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=key.replace("val_loss/", "val "))
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl for this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("loss")
    ax.set_title("benchmarks over the run, beside the loss", fontsize=10)
    ax.grid(alpha=0.3)
    for ax, label in zip(axes[1:], labels, strict=True):
        pts = [(r["step"], *r["cells"][label], r["keep"]) for r in rows if r["cells"].get(label, (None,))[0] is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts],
                        marker="o", markersize=4, capsize=3, linewidth=1)
            kept = [p for p in pts if p[3]]
            if kept:
                ax.scatter([p[0] for p in kept], [p[1] for p in kept], s=90, facecolors="none",
                           edgecolors="tab:green", linewidths=2, zorder=3, label="KEEP")
                ax.legend(fontsize=7, loc="best")
        ax.set_title(label, fontsize=8, loc="left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    known = sorted({(r["step"], r["tokens"]) for r in [*train, *rows] if isinstance(r.get("tokens"), int)})
    if len(known) >= 2:
        steps, toks = np.array([k[0] for k in known], float), np.array([k[1] for k in known], float)
        top = axes[0].secondary_xaxis("top", functions=(lambda s: _extrapolated(s, steps, toks),
                                                        lambda t: _extrapolated(t, toks, steps)))
        top.set_xlabel("tokens", fontsize=8)
        top.xaxis.set_major_formatter(lambda x, _pos: f"{x / 1e9:g}B" if x >= 1e9 else (
            f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"))
    fig.tight_layout()
    return fig


def _extrapolated(x: Any, xp: Any, fp: Any) -> Any:
    """``np.interp`` that continues the end segments' slopes past the ends: clamped, the margins
    of the step axis would map to the last token count, and its ticks would pile up there."""
    import numpy as np

    y = np.interp(x, xp, fp)
    if len(xp) < 2:
        return y
    lo_slope = (fp[1] - fp[0]) / (xp[1] - xp[0]) if xp[1] != xp[0] else 0.0
    hi_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]) if xp[-1] != xp[-2] else 0.0
    x = np.asarray(x, dtype=float)
    return np.where(x < xp[0], fp[0] + (x - xp[0]) * lo_slope,
                    np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi_slope, y))


def write_table(run_dir: str | Path, out_dir: str | Path | None = None, suite: str | None = None,
                checkpoints: str | Path | None = None) -> tuple[str, Path, Path]:
    """Markdown text, and the paths of ``eval_table.md`` and ``eval_table.png`` written."""
    from hebtron.eval.run_results import locate_run
    from hebtron.train.metrics import read_metrics

    run_dir = Path(run_dir)
    dirs = locate_run(run_dir, checkpoints, must_exist=False) if run_dir.is_dir() else None
    rows = result_rows(dirs.ckpt_dir, suite) if dirs is not None else []
    out = Path(out_dir) if out_dir is not None else run_dir
    md, png = out / "eval_table.md", out / "eval_table.png"
    if rows:
        records = read_metrics(dirs.run_dir) if dirs is not None and dirs.run_dir is not None else []
        text, fig = results_markdown(rows), curves(rows, records)
    elif suite is not None and dirs is not None:
        raise UserError(f"{dirs.ckpt_dir}: no checkpoint has results for suite {suite_tag(suite)} "
                        "(run `hebtron eval watch` or `hebtron eval run --out CHECKPOINT/eval/SUITE.json`)")
    else:
        gated = collect(run_dir)
        text, fig = markdown(gated), plot(gated)
    out.mkdir(parents=True, exist_ok=True)
    md.write_text(text, encoding="utf-8")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    return text, md, png
