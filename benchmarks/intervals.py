"""95 % intervals for the reproduction's rates and means: Wilson for accuracies, a seeded percentile bootstrap for
the rest (ROUGE, perplexity, per-request means). Plain Python/numpy, used by reproduce.py and report_reproduce.py."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (k successes in n trials); (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] | None = None,
              n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of ``stat`` (default: the mean) over the rows of ``values`` (resampled
    with replacement, ``seed`` fixed so reruns give the same interval); (nan, nan) for fewer than 2 rows."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return math.nan, math.nan
    stat = stat or (lambda x: float(np.mean(x, axis=0)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_resamples, len(v)))
    draws = np.array([stat(v[i]) for i in idx])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): Wilson when every value is 0 or 1 (a rate), else the bootstrap of the mean."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if np.isin(v, (0.0, 1.0)).all():
        return (m, *wilson(float(v.sum()), len(v)))
    return (m, *bootstrap(v))


def perplexity_interval(nll_sums: Sequence[float], counts: Sequence[int]) -> tuple[float, float, float]:
    """(exp(Σ nll / Σ tokens), lo, hi) with the bootstrap over texts (each text's sum and count resampled together)."""
    pairs = np.stack([np.asarray(nll_sums, np.float64), np.asarray(counts, np.float64)], 1)
    ppl = math.exp(pairs[:, 0].sum() / pairs[:, 1].sum())
    return (ppl, *bootstrap(pairs, lambda x: math.exp(x[:, 0].sum() / x[:, 1].sum())))
