"""The figures of ``hebtron report``: a run's curves and its router monitors, from metrics records.

Training curves (loss, learning rate, gradient norm, throughput) and two router figures:

- ``router_load_entropy``: a layer x step heatmap of load entropy, one panel per language
  (dark = few experts do the work);
- ``router_expert_load``: the expert loads of the worst layer (lowest load entropy of any
  language) at the last monitor record, per language, against the uniform share.

The router figures read the ``router`` / ``router_load`` fields that the training loop's monitor
writes to metrics.jsonl. :data:`PLOTS` lists every figure of a report; :func:`entropy_lines`
compares runs (e.g. with and without balancing). A plot function receives the metric records
and the run directory and returns a matplotlib ``Figure``, or ``None`` when the run has no data
for it. Figures are built with ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot):
no GUI backend, no global state, safe on headless nodes and in threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from hebtron.monitor.router import ALL

PlotFn = Callable[[list[dict[str, Any]], Path], Figure | None]


# ---------------------------------------------------------------- training curves

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


def plot_loss(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("loss", "loss", {"train": series(records, "loss"),
                                        "val": series(records, "val_loss")})


def plot_lr(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("learning rate", "lr", {"lr": series(records, "lr")})


def plot_grad_norm(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("gradient norm (before clipping)", "grad norm",
                       {"grad_norm": series(records, "grad_norm")}, logy=True)


def plot_throughput(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    return line_figure("throughput", "tokens / s",
                       {"tokens/s": series(records, "tokens_per_s", x="step")}, xlabel="step")


# ---------------------------------------------------------------- router monitors

def _layer_index(key: str) -> int:
    return int(key.split("_", 1)[1])


def entropy_grid(records: Sequence[Mapping[str, Any]], figure: str = "load_entropy"
                 ) -> tuple[list[int], list[int], dict[str, np.ndarray]]:
    """(steps, layers, {lang: (layers x steps) array, NaN where absent}) from monitor records."""
    rows = [r for r in records if isinstance(r.get("router"), dict)]
    steps = [int(r["step"]) for r in rows]
    layers = sorted({_layer_index(k) for r in rows for k in r["router"]})
    langs = sorted({lang for r in rows for v in r["router"].values() for lang in v if lang != ALL})
    grids = {lang: np.full((len(layers), len(steps)), np.nan) for lang in langs}
    for j, rec in enumerate(rows):
        for key, per_lang in rec["router"].items():
            i = layers.index(_layer_index(key))
            for lang, row in per_lang.items():
                value = row.get(figure)
                if lang in grids and isinstance(value, (int, float)):
                    grids[lang][i, j] = value
    return steps, layers, grids


def _edges(steps: Sequence[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def plot_load_entropy(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    steps, layers, grids = entropy_grid(records)
    if not grids:
        return None
    fig = Figure(figsize=(9, 1.2 + 0.35 * len(layers) * len(grids) + 0.6 * len(grids)))
    axes = fig.subplots(len(grids), 1, sharex=True, squeeze=False)[:, 0]
    x = _edges(steps)
    y = np.arange(len(layers) + 1) - 0.5
    mesh = None
    for ax, (lang, grid) in zip(axes, grids.items(), strict=True):
        mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", shading="flat")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_ylabel(f"{lang}\nMoE layer")
    axes[0].set_title("router load entropy per layer (1 = uniform over experts, 0 = one expert)")
    axes[-1].set_xlabel("step")
    fig.colorbar(mesh, ax=list(axes), label="normalized load entropy")
    return fig


def plot_worst_layer_load(records: list[dict[str, Any]], run_dir: Path) -> Figure | None:
    last = next((r for r in reversed(records) if isinstance(r.get("router_load"), dict)), None)
    if last is None:
        return None
    info = last["router_load"]
    loads = {lang: v for lang, v in info["load"].items() if lang != ALL} or dict(info["load"])
    num_experts = len(next(iter(loads.values())))
    entropy = last.get("router", {}).get(f"layer_{info['layer']}", {}).get(info["lang"], {}).get("load_entropy")
    fig = Figure(figsize=(max(6.0, 0.25 * num_experts * len(loads)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(loads)
    for i, (lang, shares) in enumerate(loads.items()):
        ax.bar(np.arange(num_experts) + (i - (len(loads) - 1) / 2) * width, shares, width, label=lang)
    ax.axhline(1.0 / num_experts, color="black", linestyle="--", linewidth=1, label="uniform")
    what = f"lowest {info['lang']} load entropy" + (f" {entropy:.2f}" if isinstance(entropy, (int, float)) else "")
    ax.set_title(f"expert load in MoE layer {info['layer']} ({what}) at step {last['step']}")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of assignments")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return fig


# Every figure of a report, in order; the PNG is written as ``report/<name>.png``.
PLOTS: dict[str, PlotFn] = {
    "loss": plot_loss,
    "lr": plot_lr,
    "grad_norm": plot_grad_norm,
    "tokens_per_s": plot_throughput,
    "router_load_entropy": plot_load_entropy,
    "router_expert_load": plot_worst_layer_load,
}


def entropy_lines(runs: Mapping[str, Sequence[Mapping[str, Any]]], layer: int, lang: str,
                  threshold: float | None = None, figure: str = "load_entropy") -> Figure:
    """One line per run of ``figure`` for (layer, lang) over steps; alarms marked with x."""
    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    for label, records in runs.items():
        xs, ys, alarm_x, alarm_y = [], [], [], []
        for rec in records:
            row = rec.get("router", {}).get(f"layer_{layer}", {}).get(lang, {})
            value = row.get(figure)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            xs.append(rec["step"])
            ys.append(value)
            if any(f"layer {layer}, lang {lang}:" in m for m in rec.get("router_alarm", [])):
                alarm_x.append(rec["step"])
                alarm_y.append(value)
        line = ax.plot(xs, ys, label=label, marker="o" if len(xs) < 60 else None, markersize=3)[0]
        if alarm_x:
            ax.plot(alarm_x, alarm_y, "x", color=line.get_color(), markersize=10, mew=2, label=f"{label}: alarm")
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"alarm threshold {threshold:g}")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{lang} {figure.replace('_', ' ')}, MoE layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel(figure)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig
