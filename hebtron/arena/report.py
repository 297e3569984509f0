"""``hebtron arena results``: the standings as markdown, JSON and a PNG of ratings with intervals."""

from __future__ import annotations

import json
import os
from contextlib import closing
from pathlib import Path
from typing import Any

from hebtron.eval import arena_store
from hebtron.eval.arena_ratings import ELO_BASE, Standings


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def render_markdown(table: Standings, db: Path) -> str:
    lines = [
        "# Arena results", "",
        f"- database: `{db}`",
        f"- {table.votes} votes from {table.voters} voters; Bradley-Terry ratings on an Elo scale "
        f"({ELO_BASE:.0f} = average, +400 = 10:1 odds), {100 * table.level:.0f}% percentile bootstrap "
        f"intervals over {table.rounds} resamples of the votes; ties and both-bad count half a win.",
        "",
        "| rank | model | rating | 95% CI | votes | win rate |", "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(table.ratings, 1):
        lines.append(f"| {i} | {r.model} | {r.elo:.0f} | {r.lo:.0f} – {r.hi:.0f} | {r.votes} | {_rate(r.win_rate)} |")
    lines += ["", "| model A | model B | votes | A won | B won | ties | both bad | A's win rate |",
              "|---|---|---|---|---|---|---|---|"]
    for p in table.pairs:
        lines.append(f"| {p.a} | {p.b} | {p.votes} | {p.a_wins} | {p.b_wins} | {p.ties} | {p.both_bad} | "
                     f"{_rate(p.win_rate)} |")
    lines += ["", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines).rstrip() + "\n"


def plot(table: Standings, path: Path) -> None:
    """Ratings as points with their intervals, best on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratings = list(reversed(table.ratings))
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(ratings) + 1.4))
    y = range(len(ratings))
    elo = [r.elo for r in ratings]
    ax.errorbar(elo, y, xerr=[[r.elo - r.lo for r in ratings], [r.hi - r.elo for r in ratings]], fmt="o",
                capsize=4, color="#24324a")
    ax.axvline(ELO_BASE, color="#999", lw=0.8, ls="--")
    ax.set_yticks(list(y), [f"{r.model} ({r.votes})" for r in ratings])
    ax.set_xlabel(f"rating (Elo scale), {100 * table.level:.0f}% bootstrap interval")
    ax.set_title(f"hebtron arena: {table.votes} votes, {table.voters} voters")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(arena: str | Path, out: str | Path | None = None, rounds: int = 1000,
                  seed: int = 0) -> tuple[Standings, dict[str, Any], dict[str, Path]]:
    """Standings, their JSON form, and the files written (results.md, results.json, results.png)."""
    db = arena_store.db_path(Path(arena))
    with closing(arena_store.connect(db, readonly=True)) as conn:
        table = arena_store.read_standings(conn, rounds=rounds, seed=seed)
    out_dir = Path(out) if out is not None else db.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"db": str(db), **table.to_dict()}
    files = {"markdown": out_dir / "results.md", "json": out_dir / "results.json", "png": out_dir / "results.png"}
    _atomic_write(files["markdown"], render_markdown(table, db))
    _atomic_write(files["json"], json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    plot(table, files["png"])
    return table, payload, files
