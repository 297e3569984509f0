"""Checkpoint x task table of a run's gate verdicts, as markdown and a PNG.

``hebtron eval gate`` writes ``R.gate.json`` beside each candidate's results; this collects
every one under a run directory, orders them by training step, and shows each gated metric
per checkpoint with its verdict, so a reader sees where a run peaked and what was kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hebtron.errors import UserError


def collect(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per gate file: checkpoint, step, verdict, {task/metric: candidate value}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    rows = []
    for path in sorted(run_dir.rglob("*.gate.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: unreadable gate verdict ({err})") from None
        cand = data.get("candidate") or {}
        values = {f"{c['task']} {c['metric'].removesuffix(',none')}": c.get("candidate") for c in data.get("checks", [])}
        rows.append({
            "file": str(path),
            "checkpoint": cand.get("checkpoint") or cand.get("path", str(path)),
            "step": cand.get("step"),
            "verdict": data.get("verdict", "reject"),
            "reasons": data.get("reasons", []),
            "values": values,
        })
    if not rows:
        raise UserError(f"{run_dir}: no gated checkpoints (no *.gate.json files; run `hebtron eval gate` first)")
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


def write_table(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[str, Path, Path]:
    """Markdown text, and the paths of ``eval_table.md`` and ``eval_table.png`` written."""
    rows = collect(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    md, png = out / "eval_table.md", out / "eval_table.png"
    md.write_text(text, encoding="utf-8")
    plot(rows).savefig(png, dpi=110, bbox_inches="tight")
    return text, md, png
