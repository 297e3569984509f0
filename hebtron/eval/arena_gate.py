"""The arena's half of the gate: does the candidate win enough head-to-head votes against the baseline?

A policy may add::

    arena: {db: runs/demo/arena, candidate: sft, baseline: cpt, min_win_rate: 0.5, min_votes: 30}

The candidate's win rate over the baseline counts ties and "both bad" as half a win. It fails
closed: a missing or unreadable database, a model name the arena does not have, or fewer than
``min_votes`` head-to-head votes is a rejection that says so. ``decides`` says how the two
verdicts combine: ``both`` (the default) keeps a checkpoint only when benchmarks and arena both
accept; ``arena`` lets the voters overrule benchmark regressions (the Hebatron case: users
preferred a checkpoint that scored lower), though never a benchmark run that crashed or is
missing. The report puts both verdicts side by side and names the one that decided.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hebtron.errors import UserError

if TYPE_CHECKING:
    from hebtron.eval.gate import Verdict

RATING_ROUNDS = 1000


class ArenaRule(BaseModel):
    """The ``arena:`` block of a gate policy."""

    model_config = ConfigDict(extra="forbid")

    db: str = Field(description="arena directory or its arena.sqlite, relative to the working directory")
    candidate: str = Field(min_length=1, description="the candidate's model name in the arena")
    baseline: str = Field(min_length=1, description="the baseline's model name in the arena")
    min_win_rate: float = Field(default=0.5, ge=0, le=1, description="candidate over baseline, ties half")
    min_votes: int = Field(ge=1, description="head-to-head votes needed before the arena may judge")
    decides: Literal["both", "arena"] = Field(
        default="both", description="both: keep only if benchmarks and arena accept; arena: votes overrule "
                                    "benchmark regressions")


@dataclass
class ArenaCheck:
    """The arena verdict and what it rests on."""

    db: str
    candidate: str
    baseline: str
    min_win_rate: float
    min_votes: int
    decides: str
    ok: bool = False
    votes: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0
    win_rate: float | None = None
    win_rate_ci: tuple[float, float] | None = None
    ratings: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> elo, lo, hi
    note: str = ""


def win_rate_interval(wins: int, losses: int, ties: int, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of (wins + ties / 2) / votes."""
    n = wins + losses + ties
    draws = np.random.default_rng(seed).multinomial(n, np.array([wins, losses, ties]) / n, size=rounds)
    rates = (draws[:, 0] + 0.5 * draws[:, 2]) / n
    return float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))


def check_arena(rule: ArenaRule) -> ArenaCheck:
    """Judge the candidate against the baseline on the arena's votes (fails closed, see module doc)."""
    from hebtron.eval import arena_store

    check = ArenaCheck(rule.db, rule.candidate, rule.baseline, rule.min_win_rate, rule.min_votes, rule.decides)
    path = arena_store.db_path(Path(rule.db))
    if not path.is_file():
        check.note = f"arena: no arena database at {path} (fail closed)"
        return check
    try:
        with arena_store.opened(path, readonly=True) as conn:
            names = {m.name for m in arena_store.models(conn)}
            missing = [n for n in (rule.candidate, rule.baseline) if n not in names]
            if missing:
                check.note = (f"arena: {path} has no model named {', '.join(map(repr, missing))} "
                              f"(has: {', '.join(sorted(names)) or 'none'})")
                return check
            table = arena_store.read_standings(conn, rounds=RATING_ROUNDS)
    except UserError as err:
        check.note = f"arena: {err} (fail closed)"
        return check
    for name in (rule.candidate, rule.baseline):
        r = table.rating(name)
        check.ratings[name] = {"elo": r.elo, "lo": r.lo, "hi": r.hi, "votes": r.votes}
    pair = table.pair(rule.candidate, rule.baseline)
    check.votes, check.wins, check.losses = pair.votes, pair.a_wins, pair.b_wins
    check.ties, check.both_bad = pair.ties, pair.both_bad
    head = f"{rule.candidate} vs {rule.baseline}"
    if pair.votes < rule.min_votes:
        check.note = (f"arena: only {pair.votes} head-to-head votes for {head}; the policy needs "
                      f"min_votes {rule.min_votes} (fail closed)")
        return check
    check.win_rate = pair.win_rate
    check.win_rate_ci = win_rate_interval(pair.a_wins, pair.b_wins, pair.ties + pair.both_bad)
    check.ok = check.win_rate >= rule.min_win_rate - 1e-12
    what = "wins" if check.ok else "loses"
    check.note = (f"arena: {head}: {what}: win rate {check.win_rate:.3f} (95% CI {check.win_rate_ci[0]:.3f}-"
                  f"{check.win_rate_ci[1]:.3f}) over {pair.votes} votes ({pair.a_wins} won, {pair.b_wins} lost, "
                  f"{pair.ties} ties, {pair.both_bad} both bad); needs {rule.min_win_rate:g}")
    return check


def combine(verdict: Verdict, rule: ArenaRule | None, input_problems: bool = False) -> Verdict:
    """Add the arena verdict to a benchmark verdict and decide (see module doc).

    ``input_problems``: the benchmark results could not be read; that rejection stands whatever
    the arena says."""
    verdict.benchmark_accepted = verdict.accepted
    if rule is None:
        verdict.decided_by = "benchmarks"
        return verdict
    check = check_arena(rule)
    bench_ok = verdict.accepted
    verdict.arena = asdict(check)
    if rule.decides == "arena" and not input_problems:
        overruled = [] if bench_ok else list(verdict.reasons)
        verdict.arena["overruled"] = overruled if check.ok else []
        verdict.accepted = check.ok
        verdict.reasons = [] if check.ok else [*verdict.reasons, check.note]
        verdict.decided_by = "arena" + (" (overruling benchmarks)" if check.ok and not bench_ok else "")
        return verdict
    verdict.accepted = bench_ok and check.ok
    if not check.ok:
        verdict.reasons = [*verdict.reasons, check.note]
    verdict.decided_by = ("benchmarks and arena" if bench_ok and check.ok else "benchmarks" if check.ok
                          else "arena" if bench_ok else "benchmarks and arena")
    return verdict


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def render_verdicts(v: Verdict) -> list[str]:
    """Markdown: benchmark and arena verdicts side by side, which one decided, and the arena's numbers."""
    arena: dict[str, Any] | None = getattr(v, "arena", None)
    if arena is None:
        return []
    bench = "ACCEPT" if v.benchmark_accepted else "REJECT"
    votes = arena["votes"]
    basis = (f"win rate {_fmt(arena['win_rate'])} of {arena['candidate']} over {arena['baseline']}, "
             f"{votes} votes (needs {arena['min_win_rate']:g} and {arena['min_votes']} votes)")
    lines = [
        "## Verdicts", "",
        "| judge | verdict | on |", "|---|---|---|",
        f"| benchmarks | {bench} | {len(v.checks)} gated tasks |",
        f"| arena | {'ACCEPT' if arena['ok'] else 'REJECT'} | {basis} |",
        "",
        f"Decided by: **{v.decided_by}** (policy `arena.decides: {arena['decides']}`)."
        + (" Benchmarks and arena disagree." if v.benchmark_accepted != arena["ok"] else ""),
        "",
    ]
    if arena.get("overruled"):
        lines += ["Benchmark regressions the arena overruled:", "", *[f"- {r}" for r in arena["overruled"]], ""]
    if arena["ratings"]:
        lines += ["| arena model | rating | 95% CI | votes |", "|---|---|---|---|"]
        for name, r in arena["ratings"].items():
            lines.append(f"| {name} | {r['elo']:.0f} | {r['lo']:.0f} – {r['hi']:.0f} | {r['votes']} |")
        lines.append("")
    lines += [f"- {arena['note']}", ""]
    return lines
