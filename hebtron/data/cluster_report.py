"""The cluster report: markdown (browsers apply the bidi algorithm: Hebrew sits in ``dir="rtl"``
spans) and one PNG. Matplotlib from 3.11 lays text out with libraqm, which applies the bidi
algorithm, so Hebrew is passed in logical order; an older matplotlib draws strings left to right,
so there each word is reversed and the terms are listed from the right (:func:`rtl_line`). Every
text from the corpus is HTML-escaped in the markdown."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from hebtron.data.hebrew_text import visual_rtl


def _cell(text: Any) -> str:
    return html.escape(" ".join(str(text).split())).replace("|", "&#124;")


def _rtl(text: Any) -> str:
    return f'<span dir="rtl">{_cell(text)}</span>'


def _has_bidi() -> bool:
    import matplotlib.ft2font

    return hasattr(matplotlib.ft2font, "__libraqm_version__")


def rtl_line(terms: list[str], bidi: bool, sep: str = "  ·  ") -> str:
    """Terms that read right to left, first term rightmost, for matplotlib with or without bidi."""
    if bidi:
        return sep.join(terms)
    return sep.join(visual_rtl(t) for t in reversed(terms))


def report_markdown(report: dict[str, Any]) -> str:
    clusters = report["clusters"]
    k = len(clusters)
    cfg = report["config"]
    lines = [
        "# Content clusters", "",
        f"{report['documents']:,} documents from {', '.join(_cell(p) for p in report.get('inputs', []))}; "
        f"k = {k}, fitted on a sample of {report['sampled']:,} (LSA {cfg['dims']} dims, "
        f"{cfg['restarts']} k-means restarts); tail: distance to the centroid > mean + "
        f"{cfg['tail_sigma']} sigma of the sample's distances.", "",
    ]
    if "purity" in report:
        lines += [f"**Purity against `{_cell(cfg['label_field'])}`: {report['purity']:.3f}**", ""]
    lines += ["| cluster | documents | bytes | tail | top terms |", "|---:|---:|---:|---:|---|"]
    for c in clusters:
        lines.append(f"| {c['cluster']} | {c['documents']:,} | {c['bytes']:,} | {c['tail_documents']:,} | "
                     f"{_rtl(' · '.join(c['top_terms']))} |")
    for title, table in (("Source x cluster", report["source_by_cluster"]),
                         ("Label x cluster", report.get("label_by_cluster"))):
        if not table:
            continue
        lines += ["", f"## {title} (documents)", "",
                  "| | " + " | ".join(f"c{c}" for c in range(k)) + " | total |",
                  "|---|" + "---:|" * (k + 1)]
        for name, row in table.items():
            lines.append(f"| {_cell(name)} | " + " | ".join(f"{v:,}" for v in row) + f" | {sum(row):,} |")
    for c in clusters:
        lines += ["", f"## Cluster {c['cluster']} ({c['documents']:,} documents)", "",
                  f"Top terms: {_rtl(' · '.join(c['top_terms']))}", "", "Closest to the centroid:", ""]
        lines += [f"- `{_cell(e['where'])}` (d={e['distance']}): {_rtl(e['text'])}" for e in c["examples"]]
        lines += ["", f"Tail ({c['tail_documents']:,} documents beyond d={c['tail_threshold']}), farthest first:", ""]
        lines += [f"- `{_cell(e['where'])}` (d={e['distance']}): {_rtl(e['text'])}" for e in c["tail"]] or ["- none"]
    return "\n".join(lines) + "\n"


def report_png(report: dict[str, Any], path: Path) -> None:
    """Sizes, the source x cluster table as a heat map, and the top terms in Hebrew, right to left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    clusters = report["clusters"]
    k = len(clusters)
    sources = list(report["source_by_cluster"])
    fig = plt.figure(figsize=(13, 4.2 + 0.32 * k + 0.25 * len(sources)))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.3], height_ratios=[1, 1])
    ax = fig.add_subplot(grid[0, 0])
    sizes = [c["documents"] for c in clusters]
    tails = [c["tail_documents"] for c in clusters]
    ax.bar(range(k), sizes, color="#4c72b0", label="documents")
    ax.bar(range(k), tails, color="#dd8452", label="2-sigma tail" if report["config"]["tail_sigma"] == 2 else "tail")
    ax.set_xticks(range(k), [f"c{c}" for c in range(k)])
    ax.set_title("documents per cluster")
    ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[1, 0])
    table = np.array([report["source_by_cluster"][s] for s in sources], dtype=float)
    shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(k), [f"c{c}" for c in range(k)])
    bidi = _has_bidi()
    ax.set_yticks(range(len(sources)), [s if bidi else visual_rtl(s) for s in sources])
    for i in range(len(sources)):
        for j in range(k):
            ax.text(j, i, f"{int(table[i, j]):,}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.6 else "black")
    ax.set_title("source x cluster (documents; colour: share of the source)")

    ax = fig.add_subplot(grid[:, 1])
    ax.axis("off")
    title = "top terms per cluster (read right to left)"
    if "purity" in report:
        title += f" - purity {report['purity']:.3f} vs {report['config']['label_field']}"
    ax.set_title(title)
    for c in clusters:
        y = 1 - (c["cluster"] + 0.5) / max(k, 1)
        line = rtl_line(c["top_terms"][:8], bidi)
        ax.text(0.97, y, line, ha="right", va="center", fontsize=11, family="DejaVu Sans", transform=ax.transAxes)
        ax.text(1.0, y, f"c{c['cluster']}", ha="left", va="center", fontsize=10, weight="bold", transform=ax.transAxes)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
