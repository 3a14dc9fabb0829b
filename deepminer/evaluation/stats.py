"""Bootstrap confidence intervals of per-item scores (one score per image).

* :func:`bootstrap_ci` - percentile bootstrap of the mean over items (Efron & Tibshirani 1993);
* :func:`paired_bootstrap_ci` - the same for the mean difference of two methods scored on the same
  items, each resample drawing the same items for both;
* :func:`excludes_zero` - whether a difference's interval lies strictly on one side of 0.

NaN scores (a metric undefined on an item) are dropped; resampling is vectorised (one
``rng.integers`` matrix of ``n_resamples x n`` item indices) and seeded, so equal inputs give
equal intervals.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from deepminer.errors import InputError

_NAN = float("nan")


class Interval(NamedTuple):
    """The sample mean, the percentile-bootstrap interval ``[lo, hi]``, and the number of items."""

    mean: float
    lo: float
    hi: float
    n: int


def _bootstrap(x: np.ndarray, n_resamples: int, seed: int, level: float) -> Interval:
    if not 0.0 < level < 1.0 or n_resamples < 1:
        raise InputError(f"bootstrap: level {level} must be in (0, 1) and n_resamples {n_resamples} >= 1")
    if x.size == 0:
        return Interval(_NAN, _NAN, _NAN, 0)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(x.mean()), float(lo), float(hi), int(x.size))


def bootstrap_ci(values, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` (NaNs dropped; ``n`` counts the
    others; no value left: a NaN interval with ``n=0``)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    return _bootstrap(x[~np.isnan(x)], n_resamples, seed, level)


def paired_bootstrap_ci(a, b, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile-bootstrap interval of ``mean(a - b)`` over paired items: a resample draws the same
    items for both (resampling the differences), pairs where either score is NaN dropped."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"paired_bootstrap_ci: a has {x.size} items and b {y.size}; they must pair up")
    keep = ~(np.isnan(x) | np.isnan(y))
    return _bootstrap(x[keep] - y[keep], n_resamples, seed, level)


def excludes_zero(interval: Interval) -> bool:
    """Whether ``[lo, hi]`` lies strictly above or strictly below 0 (False for a NaN interval)."""
    return bool(interval.lo > 0.0 or interval.hi < 0.0)
