"""Target loss as a function of mixture weights: a ridge model, its held-out fit, its minimum.

Why ridge and not LightGBM (RegMix's choice): RegMix fits its trees on 512 proxy runs. With ~16
runs a tree ensemble has a handful of samples per leaf and predicts a step function that is flat
between the points it saw, so its minimum is wherever it happened to split; a ridge model is what
16 points support. Two feature sets are fitted:
- ``linear``: the weights (one slope per source; the weights sum to 1, so the intercept is shared);
- ``quadratic``: the weights, their squares and pairwise products (a source's benefit may saturate,
  two sources may substitute for each other); ``n + n(n+1)/2`` features, so it leans on the ridge.
The ridge strength comes from scikit-learn's ``RidgeCV`` (efficient leave-one-out over a grid).
Held-out fit is leave-one-out: each run's loss predicted by a model fitted on the other runs
(the ridge strength chosen again inside, so nothing of the left-out run leaks in); the Spearman rank
correlation of those predictions with the real losses is the number that says whether the
regression ranks mixtures it did not train on. ``auto`` takes the feature set with the higher
leave-one-out rank correlation (the fit ranks mixtures; its absolute error matters less).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ALPHAS = np.logspace(-6, 2, 17)
FeatureSet = Literal["linear", "quadratic"]


def features(weights: np.ndarray, kind: FeatureSet) -> np.ndarray:
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    if kind == "linear":
        return w
    n = w.shape[1]
    pairs = [w[:, i] * w[:, j] for i in range(n) for j in range(i, n)]
    return np.column_stack([w, *pairs])


def _ridge(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=ALPHAS).fit(x, y)


@dataclass
class Fit:
    """One feature set fitted on all runs, with its leave-one-out predictions."""

    kind: FeatureSet
    model: Any
    loo_predictions: np.ndarray
    loo_mse: float
    loo_spearman: float
    loo_pearson: float
    alpha: float

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return self.model.predict(features(weights, self.kind))

    def summary(self) -> dict[str, Any]:
        return {"features": self.kind, "ridge_alpha": float(self.alpha), "loo_mse": round(self.loo_mse, 6),
                "loo_rmse": round(float(np.sqrt(self.loo_mse)), 5), "loo_spearman": round(self.loo_spearman, 4),
                "loo_pearson": round(self.loo_pearson, 4)}


def fit(weights: np.ndarray, losses: np.ndarray, kind: FeatureSet) -> Fit:
    from scipy.stats import pearsonr, spearmanr

    x, y = features(weights, kind), np.asarray(losses, dtype=float)
    loo = np.empty_like(y)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        loo[i] = _ridge(x[keep], y[keep]).predict(x[i : i + 1])[0]
    full = _ridge(x, y)
    constant = np.ptp(loo) == 0 or np.ptp(y) == 0
    rho = float("nan") if constant else float(spearmanr(loo, y).statistic)
    r = float("nan") if constant else float(pearsonr(loo, y).statistic)
    return Fit(kind, full, loo, float(np.mean((loo - y) ** 2)), rho, r, float(full.alpha_))


def choose(weights: np.ndarray, losses: np.ndarray, model: str) -> tuple[Fit, list[Fit]]:
    """The fit to use and every fit made. ``auto``: the higher leave-one-out Spearman (ties: the
    lower leave-one-out error), since the fit is used to rank mixtures, not to predict a loss;
    on the demo the linear fit had the lower error, but only the quadratic one can say that a
    source's benefit saturates, and its proposal was the one near the best proxies."""
    kinds: list[FeatureSet] = ["linear", "quadratic"] if model == "auto" else [model]  # type: ignore[list-item]
    fits = [fit(weights, losses, k) for k in kinds]

    def rank(f: Fit) -> tuple[float, float]:
        rho = f.loo_spearman if np.isfinite(f.loo_spearman) else -np.inf
        return (-rho, f.loo_mse)

    return min(fits, key=rank), fits


def minimise(f: Fit, lower: np.ndarray, upper: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The mixture (weights summing to 1 within per-source bounds) with the lowest predicted loss:
    SLSQP from every start (projected into the bounds), the best result kept."""
    from scipy.optimize import minimize

    n = len(lower)
    bounds = list(zip(lower.tolist(), upper.tolist()))
    best_w, best_v = None, np.inf
    for start in np.atleast_2d(starts):
        x0 = project(start, lower, upper)
        res = minimize(lambda w: float(f.predict(w[None, :])[0]), x0, method="SLSQP", bounds=bounds,
                       constraints=[{"type": "eq", "fun": lambda w: float(np.sum(w) - 1.0)}],
                       options={"maxiter": 300, "ftol": 1e-10})
        w = project(res.x, lower, upper)
        v = float(f.predict(w[None, :])[0])
        if v < best_v - 1e-12:
            best_w, best_v = w, v
    assert best_w is not None and best_w.shape == (n,)
    return best_w


def top_k_mean(f: Fit, lower: np.ndarray, upper: np.ndarray, alpha: float, seed: int,
               candidates: int = 100_000, top: int = 100) -> np.ndarray:
    """RegMix's proposal: the mean of the ``top`` mixtures with the lowest predicted loss among
    ``candidates`` drawn from the proxies' own prior (Dirichlet(``alpha``) within the bounds).

    Why not the argmin (:func:`minimise`): a linear fit's minimum over the simplex is always a
    corner of the bounds, and a quadratic one's is often near one, far from every proxy the fit
    saw; there the loss was measured to rise where the fit said it falls. The mean of the best
    draws stays inside the region the proxies sampled and averages out the fit's noise."""
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    have, tries = 0, 0
    while have < candidates and tries < 50:
        draws = rng.dirichlet(np.full(len(lower), alpha), size=candidates)
        inside = draws[np.all((draws >= lower) & (draws <= upper), axis=1)]
        kept.append(inside)
        have += len(inside)
        tries += 1
    pool = np.concatenate(kept)[:candidates]
    if len(pool) < top:  # bounds too tight for the prior: fall back to the argmin from the bounds' centre
        return minimise(f, lower, upper, np.atleast_2d(project(np.full(len(lower), 1 / len(lower)), lower, upper)))
    predicted = f.predict(pool)
    best = np.argsort(predicted, kind="stable")[:top]
    return project(pool[best].mean(axis=0), lower, upper)


def project(w: np.ndarray, lower: np.ndarray, upper: np.ndarray, iters: int = 100) -> np.ndarray:
    """The point of {sum 1, lower <= w <= upper} nearest to ``w`` (bisection on the shift)."""
    w = np.asarray(w, dtype=float)
    lo, hi = float(np.min(w - upper)), float(np.max(w - lower))
    for _ in range(iters):
        mid = (lo + hi) / 2
        if np.clip(w - mid, lower, upper).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.clip(w - (lo + hi) / 2, lower, upper)
