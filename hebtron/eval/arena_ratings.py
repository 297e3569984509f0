"""Bradley-Terry ratings of arena votes, with bootstrap 95% intervals, on an Elo scale.

Model ``i`` beats ``j`` with probability ``sigmoid(beta_i - beta_j)``. Ties and "both bad"
count half a win to each side, as public chatbot arenas do. The strengths are the maximum of the
log-likelihood with a weak Gaussian prior (``ridge``), which keeps a model that never won finite
and pins the scale's free offset (the estimate has mean zero); they are shown as
``1000 + 400 * beta / ln 10``, so 400 points mean 10:1 odds.

The intervals are percentile bootstrap intervals over votes: votes are resampled with
replacement, which is a multinomial draw over the (pair, outcome) cells, and every resample is
refitted. Everything is vectorized over resamples: the fit is a batched Newton iteration on
k x k systems, so 1,000 resamples of a 5-model arena take milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ELO_BASE, ELO_SCALE = 1000.0, 400.0 / math.log(10.0)
RIDGE = 0.01  # prior precision on beta: sd 10 (about 1,700 Elo), negligible once a pair has votes
LEVEL = 0.95
WIN, LOSS, TIE = 0, 1, 2  # cell outcomes for the lower-indexed model of a pair


def to_elo(beta: np.ndarray) -> np.ndarray:
    return ELO_BASE + ELO_SCALE * np.asarray(beta)


def pairs_of(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def cell_matrix(k: int) -> np.ndarray:
    """(3 * pairs, k * k): maps cell counts (pair, WIN|LOSS|TIE) to the wins matrix W, where
    W[i, j] is how often i beat j, ties counting half to each."""
    pairs = pairs_of(k)
    m = np.zeros((3 * len(pairs), k * k))
    for p, (i, j) in enumerate(pairs):
        m[3 * p + WIN, i * k + j] = 1.0
        m[3 * p + LOSS, j * k + i] = 1.0
        m[3 * p + TIE, i * k + j] = m[3 * p + TIE, j * k + i] = 0.5
    return m


def wins_matrix(cells: np.ndarray, k: int) -> np.ndarray:
    """Cell counts (..., 3 * pairs) -> wins matrices (..., k, k)."""
    cells = np.asarray(cells, dtype=float)
    return (cells @ cell_matrix(k)).reshape(*cells.shape[:-1], k, k)


def fit_bradley_terry(wins: np.ndarray, ridge: float = RIDGE, iters: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Strengths beta (..., k) maximizing sum_ij W_ij log sigmoid(b_i - b_j) - ridge/2 |b|^2,
    for a batch of wins matrices (..., k, k). Newton steps on the (strictly concave) objective,
    each clipped to 2 nats so the first steps on lopsided data cannot overshoot."""
    wins = np.asarray(wins, dtype=float)
    k = wins.shape[-1]
    games = wins + np.swapaxes(wins, -1, -2)
    won = wins.sum(axis=-1)
    beta = np.zeros(wins.shape[:-1])
    eye = np.eye(k)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(beta[..., None, :] - beta[..., :, None]))  # p[i, j] = P(i beats j)
        grad = won - (games * p).sum(axis=-1) - ridge * beta
        w = games * p * (1.0 - p)
        hess = w - eye * w.sum(axis=-1)[..., None] - ridge * eye  # negative definite
        step = np.linalg.solve(-hess, grad[..., None])[..., 0]
        step = np.clip(step, -2.0, 2.0)
        beta = beta + step
        if np.abs(step).max(initial=0.0) < tol:
            break
    return beta


def bootstrap_cells(cells: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """``rounds`` resamples (rounds, cells) of the votes, each of the same size."""
    cells = np.asarray(cells, dtype=np.int64)
    n = int(cells.sum())
    if n == 0:
        return np.zeros((rounds, cells.size))
    return rng.multinomial(n, cells / n, size=rounds).astype(float)


def intervals(cells: np.ndarray, k: int, rounds: int, rng: np.random.Generator, level: float = LEVEL,
              ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval (lo, hi) of every model's beta, each (k,)."""
    betas = fit_bradley_terry(wins_matrix(bootstrap_cells(cells, rounds, rng), k), ridge)
    tail = 100 * (1 - level) / 2
    return np.percentile(betas, tail, axis=0), np.percentile(betas, 100 - tail, axis=0)


@dataclass
class PairRecord:
    """Head-to-head votes between two models; ``win_rate`` is a's, ties and both-bad counting half."""

    a: str
    b: str
    votes: int
    a_wins: int
    b_wins: int
    ties: int
    both_bad: int

    @property
    def win_rate(self) -> float | None:
        return None if not self.votes else (self.a_wins + 0.5 * (self.ties + self.both_bad)) / self.votes


@dataclass
class Rating:
    model: str
    elo: float
    lo: float
    hi: float
    votes: int
    win_rate: float | None  # over all its votes, ties half


@dataclass
class Standings:
    ratings: list[Rating]  # best first
    pairs: list[PairRecord]
    votes: int
    voters: int
    rounds: int
    level: float = LEVEL
    notes: list[str] = field(default_factory=list)

    def rating(self, model: str) -> Rating | None:
        return next((r for r in self.ratings if r.model == model), None)

    def pair(self, a: str, b: str) -> PairRecord | None:
        """The record seen from ``a``'s side (swapped if stored the other way round)."""
        for p in self.pairs:
            if (p.a, p.b) == (a, b):
                return p
            if (p.b, p.a) == (a, b):
                return PairRecord(a, b, p.votes, p.b_wins, p.a_wins, p.ties, p.both_bad)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "votes": self.votes, "voters": self.voters, "bootstrap_rounds": self.rounds, "level": self.level,
            "scale": {"base": ELO_BASE, "points_per_10x_odds": 400, "ties": "half a win each"},
            "ratings": [asdict(r) for r in self.ratings],
            "pairs": [asdict(p) | {"win_rate_a": p.win_rate} for p in self.pairs],
            "notes": self.notes,
        }


def pair_cells(names: Sequence[str], outcomes: Sequence[tuple[str, str, str]]) -> tuple[np.ndarray, list[PairRecord]]:
    """(left model, right model, outcome) votes -> cell counts and per-pair records."""
    index = {n: i for i, n in enumerate(names)}
    k = len(names)
    pairs = pairs_of(k)
    slot = {pair: p for p, pair in enumerate(pairs)}
    cells = np.zeros(3 * len(pairs), dtype=np.int64)
    both_bad = np.zeros(len(pairs), dtype=np.int64)
    for left, right, outcome in outcomes:
        i, j = index[left], index[right]
        p = slot[(min(i, j), max(i, j))]
        if outcome in ("tie", "both_bad"):
            cells[3 * p + TIE] += 1
            both_bad[p] += outcome == "both_bad"
        else:
            winner = i if outcome == "a" else j
            cells[3 * p + (WIN if winner == min(i, j) else LOSS)] += 1
    records = [PairRecord(names[i], names[j], int(cells[3 * p: 3 * p + 3].sum()), int(cells[3 * p + WIN]),
                          int(cells[3 * p + LOSS]), int(cells[3 * p + TIE] - both_bad[p]), int(both_bad[p]))
               for p, (i, j) in enumerate(pairs)]
    return cells, records


def standings(names: Sequence[str], outcomes: Sequence[tuple[str, str, str]], voters: int = 0,
              rounds: int = 1000, seed: int = 0) -> Standings:
    """Ratings with intervals, head-to-head records and counts for the models ``names``."""
    names = list(names)
    k = len(names)
    cells, records = pair_cells(names, outcomes)
    notes = []
    if k < 2:
        notes.append("fewer than two models: nothing to compare")
    beta = fit_bradley_terry(wins_matrix(cells, k)) if k else np.zeros(0)
    lo, hi = intervals(cells, k, rounds, np.random.default_rng(seed)) if k and rounds else (beta, beta)
    ratings = []
    for i, name in enumerate(names):
        mine = [r for r in records if name in (r.a, r.b)]
        n = sum(r.votes for r in mine)
        points = sum((r.a_wins if r.a == name else r.b_wins) + 0.5 * (r.ties + r.both_bad) for r in mine)
        ratings.append(Rating(name, float(to_elo(beta[i])), float(to_elo(lo[i])), float(to_elo(hi[i])), n,
                              points / n if n else None))
    unvoted = [r.model for r in ratings if not r.votes]
    if unvoted and k >= 2:
        notes.append(f"no votes yet for {', '.join(unvoted)}: their ratings are the prior's 1000")
    ratings.sort(key=lambda r: -r.elo)
    return Standings(ratings, records, len(outcomes), voters, rounds, notes=notes)
