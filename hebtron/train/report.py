"""PNG plots of a run from its ``metrics.jsonl``, for people reading a finished or dead run.

Plots come from a registry so other parts (router monitors, batch-size ramp) add their own
with ``@register_plot("name")`` without touching this file. A plot function receives the
metric records and the run directory and returns a matplotlib ``Figure``, or ``None`` when the
run has no data for it. Figures are built with ``matplotlib.figure.Figure`` directly (Agg
canvas, no pyplot): no GUI backend, no global state, safe on headless nodes and in threads.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hebtron.train.metrics import read_metrics

PlotFn = Callable[[list[dict[str, Any]], Path], Figure | None]
PLOTS: dict[str, PlotFn] = {}
REPORT_DIR = "report"
# Modules that register plots of their own; imported by write_report (like cli.COMMAND_MODULES).
PLOT_MODULES: list[str] = ["hebtron.monitor.plots"]


def register_plot(name: str) -> Callable[[PlotFn], PlotFn]:
    """Add a plot to every report; the PNG is written as ``report/<name>.png``."""
    def decorate(fn: PlotFn) -> PlotFn:
        PLOTS[name] = fn
        return fn
    return decorate


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 only: list[str] | None = None) -> list[Path]:
    """Render every registered plot (or those in ``only``) and return the PNG paths written."""
    for module in PLOT_MODULES:
        importlib.import_module(module)
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / REPORT_DIR
    records = read_metrics(run)
    written = []
    for name, fn in PLOTS.items():
        if only is not None and name not in only:
            continue
        fig = fn(records, run)
        if fig is None:
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written


def series(records: list[dict[str, Any]], key: str,
           x: str = "tokens") -> tuple[list[float], list[float]]:
    """(x, y) for records holding a finite ``key``; skipped/NaN steps (null) are left out."""
    xs, ys = [], []
    for rec in records:
        y, xv = rec.get(key), rec.get(x)
        if isinstance(y, (int, float)) and isinstance(xv, (int, float)) and math.isfinite(y):
            xs.append(float(xv))
            ys.append(float(y))
    return xs, ys


def line_figure(title: str, ylabel: str, lines: dict[str, tuple[list[float], list[float]]],
                xlabel: str = "tokens", logy: bool = False) -> Figure | None:
    """One axes with a line per non-empty series; None when all are empty."""
    lines = {k: v for k, v in lines.items() if v[0]}
    if not lines:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for label, (xs, ys) in lines.items():
        marker = "o" if len(xs) < 50 else None
        ax.plot(xs, ys, label=label, marker=marker, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy and all(y > 0 for _, ys in lines.values() for y in ys):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    return fig


@register_plot("loss")
def plot_loss(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("loss", "loss", {"train": series(records, "loss"),
                                        "val": series(records, "val_loss")})


@register_plot("lr")
def plot_lr(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("learning rate", "lr", {"lr": series(records, "lr")})


@register_plot("grad_norm")
def plot_grad_norm(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("gradient norm (before clipping)", "grad norm",
                       {"grad_norm": series(records, "grad_norm")}, logy=True)


@register_plot("tokens_per_s")
def plot_throughput(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("throughput", "tokens / s",
                       {"tokens/s": series(records, "tokens_per_s", x="step")}, xlabel="step")
