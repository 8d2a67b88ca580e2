"""Win-rate statistics: both-order scoring of pairwise verdicts, the Wilson interval, bootstrap CIs
(one model, or the paired difference of two, through ``scipy.stats.bootstrap``), a length-controlled
win-rate, and the summary table. Judging itself lives in ``judges.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

Verdict = str  # "win" | "loss" | "tie" | "invalid", always from the MODEL's point of view
VERDICTS = ("win", "loss", "tie", "invalid")
SCORE_NAMES = {1.0: "wins", 0.5: "ties", 0.0: "losses"}
Z95 = float(sps.norm.ppf(0.975))
"""The two-sided 95% normal quantile, 1.959964 (what scipy's own Wilson interval uses)."""


def both_order_score(first: Verdict, second: Verdict) -> float | None:
    """Score one prompt judged twice, once with the model's response shown as A and once as B.

    Both verdicts are already mapped to the model's perspective. The table:

    ==========  ==========  =====
    first       second      score
    ==========  ==========  =====
    win         win         1.0
    loss        loss        0.0
    win         loss        0.5   (the judge followed the position, not the content)
    tie         any valid   0.5
    invalid     anything    None  (the prompt is ``invalid``: excluded from the rate, counted)
    ==========  ==========  =====
    """
    for v in (first, second):
        if v not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {v!r}")
    if "invalid" in (first, second):
        return None
    if first == second == "win":
        return 1.0
    if first == second == "loss":
        return 0.0
    return 0.5


def wilson_interval(wins: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a win-rate of ``wins / n`` (ties count as 0.5 wins).

    Written out rather than taken from ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``
    because that takes whole counts only, and a tie here is half a win; for whole counts the two
    agree to 1e-12 (tests/test_stats.py).

    With p = wins/n:  center = (p + z²/2n) / (1 + z²/n),
    half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n);  the interval is center ± half.
    Worked example (with z = 1.96, z² = 3.8416): 8 wins of 10 -> 1 + z²/n = 1.38416,
    center = (0.8 + 0.19208)/1.38416 = 0.716738, half = 1.96·sqrt(0.016 + 0.009604)/1.38416 = 0.226581,
    interval (0.490157, 0.943319). With n = 0 nothing is known: (0.0, 1.0)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= wins <= n:
        raise ValueError(f"wins must lie in [0, n]; got wins={wins}, n={n}")
    p = wins / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile bootstrap CI at level 1 - alpha.

    ``scipy.stats.bootstrap`` resamples ``n_boot`` times from ``numpy.random.default_rng(seed)``, so a
    seed gives the same interval every time. Empty input gives (nan, nan, nan); one value, itself."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    if x.size == 1 or np.all(x == x[0]):  # scipy needs two values; a constant has no spread
        return float(x.mean()), float(x.mean()), float(x.mean())
    res = sps.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=1 - alpha, method="percentile",
                        rng=np.random.default_rng(seed), vectorized=True)
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_bootstrap(diffs_or_a: Sequence[float | None], scores_b: Sequence[float | None] | None = None,
                     n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high) of the difference between two models scored on the same prompts.

    Pass the per-prompt differences, or the two score lists (``a - b`` is taken). Prompts are resampled
    as pairs, so the prompt-to-prompt variation both models share cancels. A pair where either score is
    None (an invalid judgment) is left out."""
    if scores_b is None:
        diffs = [d for d in diffs_or_a if d is not None]
    else:
        if len(diffs_or_a) != len(scores_b):
            raise ValueError(f"paired scores need equal lengths, got {len(diffs_or_a)} and {len(scores_b)}")
        diffs = [a - b for a, b in zip(diffs_or_a, scores_b) if a is not None and b is not None]
    return bootstrap_mean_ci(diffs, n_boot=n_boot, seed=seed, alpha=alpha)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def length_controlled_winrate(scores: Sequence[float], len_model: Sequence[float], len_ref: Sequence[float],
                              scale: float | None = None, steps: int = 50, ridge: float = 1e-6) -> float:
    """The win-rate the model would have at equal length (the minimal logistic adjustment).

    Fits P(win) = sigmoid(a + b·x) with x = (len_model - len_ref) / scale by Newton's method (IRLS) on
    the log-likelihood; ``scores`` (1 win, 0.5 tie, 0 loss) are the targets, so a tie is half a win.
    ``scale`` defaults to the standard deviation of the length difference (1 when it is 0); it
    changes b, never a. The answer is sigmoid(a): the predicted win-rate where both responses are the
    same length. With no length variation this is the plain win-rate. When length separates wins
    from losses perfectly, the equal-length point is not identified by the data; a tiny ``ridge`` on
    b keeps the fit finite, and the answer then only says the rate lies between the two groups."""
    y = np.asarray(scores, dtype=np.float64)
    d = np.asarray(len_model, dtype=np.float64) - np.asarray(len_ref, dtype=np.float64)
    if y.size == 0:
        return math.nan
    if y.shape != d.shape:
        raise ValueError(f"scores and lengths differ in size: {y.shape} vs {d.shape}")
    scale = scale or float(d.std()) or 1.0
    X = np.stack([np.ones_like(d), d / scale], axis=1)
    penalty = np.diag([0.0, ridge * y.size])
    mean = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    w = np.array([math.log(mean / (1 - mean)), 0.0])  # start at the plain win-rate
    for _ in range(steps):
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p) - penalty @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.abs(step).max() < 1e-10:
            break
    return float(_sigmoid(np.array(w[0])))


def _counts(scores: list[float | None]) -> dict:
    valid = [s for s in scores if s is not None]
    out = {name: sum(1 for s in valid if s == v) for v, name in SCORE_NAMES.items()}
    out["invalid"] = len(scores) - len(valid)
    out["n"] = len(valid)
    return out


def _table(scores: list[float | None], len_model: list[float] | None, len_ref: list[float] | None) -> dict:
    out = _counts(scores)
    valid = [i for i, s in enumerate(scores) if s is not None]
    wins = out["wins"] + 0.5 * out["ties"]
    out["winrate"] = wins / out["n"] if out["n"] else math.nan
    out["ci_low"], out["ci_high"] = wilson_interval(wins, out["n"])
    if len_model is not None and len_ref is not None:
        lm = [len_model[i] for i in valid]
        lr = [len_ref[i] for i in valid]
        out["mean_len_model"] = float(np.mean(lm)) if lm else math.nan
        out["mean_len_reference"] = float(np.mean(lr)) if lr else math.nan
        out["lc_winrate"] = length_controlled_winrate([scores[i] for i in valid], lm, lr)
    return out


def summarize(scores: Sequence[float | None], categories: Sequence[str] | None = None,
              len_model: Sequence[float] | None = None, len_ref: Sequence[float] | None = None) -> dict:
    """The win-rate table for per-prompt ``scores`` (1, 0.5, 0, or None for an invalid prompt).

    Returns wins, ties, losses, invalid, n (valid prompts), winrate ((wins + ties/2) / n), the 95%
    Wilson interval (ci_low, ci_high), and with lengths mean_len_model, mean_len_reference and
    lc_winrate, all over the valid prompts; with ``categories``, the same table per category under
    ``by_category``. Lengths are in whatever unit the caller passes (preftune passes characters)."""
    scores = list(scores)
    for name, seq in (("categories", categories), ("len_model", len_model), ("len_ref", len_ref)):
        if seq is not None and len(seq) != len(scores):
            raise ValueError(f"{name} has {len(seq)} entries but there are {len(scores)} scores")
    lm = list(len_model) if len_model is not None else None
    lr = list(len_ref) if len_ref is not None else None
    out = _table(scores, lm, lr)
    if categories is not None:
        out["by_category"] = {}
        for cat in sorted(set(categories)):
            idx = [i for i, c in enumerate(categories) if c == cat]
            out["by_category"][cat] = _table(
                [scores[i] for i in idx],
                [lm[i] for i in idx] if lm is not None else None,
                [lr[i] for i in idx] if lr is not None else None,
            )
    return out
