"""``hebtron report``: PNG plots of a run from its ``metrics.jsonl``, for people reading a finished
or dead run.

The figures themselves live in :mod:`hebtron.monitor.plots` (training curves and router
monitors alike); this module only reads the run's records and writes each figure to a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from hebtron.monitor.plots import PLOTS
from hebtron.train.metrics import read_metrics

REPORT_DIR = "report"


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 only: list[str] | None = None) -> list[Path]:
    """Render every plot of :data:`~hebtron.monitor.plots.PLOTS` (or those in ``only``) that the
    run has data for; return the PNG paths written (``report/<name>.png`` by default)."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / REPORT_DIR
    records = [r for r in read_metrics(run) if r.get("kind") != "eval"]  # eval watch adds benchmark records
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
