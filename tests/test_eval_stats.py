"""deepminer.evaluation.stats: bootstrap intervals (coverage, pairing, NaNs, determinism)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deepminer.errors import InputError
from deepminer.evaluation.stats import Interval, bootstrap_ci, excludes_zero, paired_bootstrap_ci


def test_coverage_near_nominal_on_a_skewed_population():
    # Exponential(1): skewed, true mean 1. 200 samples of n=40, 400 resamples each; the 95 %
    # percentile interval should cover 1 about 95 % of the time (a little less for skewed data).
    rng = np.random.default_rng(2024)
    covered = 0
    for rep in range(200):
        ci = bootstrap_ci(rng.exponential(1.0, size=40), n_resamples=400, seed=rep)
        assert ci.lo <= ci.mean <= ci.hi and ci.n == 40
        covered += ci.lo <= 1.0 <= ci.hi
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_deterministic_for_a_seed_and_seed_matters():
    x = np.random.default_rng(0).random(30)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    assert paired_bootstrap_ci(x, x[::-1], seed=1) == paired_bootstrap_ci(x, x[::-1], seed=1)


def test_nans_dropped_and_all_nan():
    ci = bootstrap_ci([1.0, np.nan, 3.0, np.nan, 2.0])
    assert ci.n == 3 and ci.mean == 2.0 and 1.0 <= ci.lo <= ci.hi <= 3.0
    empty = bootstrap_ci([np.nan, np.nan])
    assert empty.n == 0 and all(math.isnan(v) for v in empty[:3])
    assert bootstrap_ci([]).n == 0
    assert not excludes_zero(empty)


def test_level_widens_the_interval():
    x = np.random.default_rng(1).normal(size=50)
    a, b = bootstrap_ci(x, level=0.5), bootstrap_ci(x, level=0.99)
    assert b.lo < a.lo < a.hi < b.hi


def test_paired_identical_is_exactly_zero():
    x = np.random.default_rng(2).random(25)
    assert paired_bootstrap_ci(x, x.copy()) == Interval(0.0, 0.0, 0.0, 25)
    assert not excludes_zero(paired_bootstrap_ci(x, x))


def test_paired_uses_the_same_items_and_drops_nan_pairs():
    rng = np.random.default_rng(3)
    base = rng.normal(size=60) * 10  # large item-to-item spread, shared by both methods
    a, b = base + 0.5 + 0.1 * rng.normal(size=60), base.copy()
    paired = paired_bootstrap_ci(a, b)
    assert excludes_zero(paired) and paired.lo > 0  # the pairing removes the shared spread
    ia, ib = bootstrap_ci(a), bootstrap_ci(b)
    assert ia.lo < ib.hi  # unpaired, the two methods' intervals overlap
    # resampling pairs == resampling differences with the same seed
    assert paired == bootstrap_ci(a - b)
    a[0], b[1] = np.nan, np.nan
    dropped = paired_bootstrap_ci(a, b)
    assert dropped.n == 58 and dropped == bootstrap_ci((a - b)[2:])


def test_excludes_zero_and_bad_inputs():
    assert excludes_zero(Interval(1.0, 0.1, 2.0, 5)) and excludes_zero(Interval(-1.0, -2.0, -0.1, 5))
    assert not excludes_zero(Interval(0.5, 0.0, 1.0, 5))
    with pytest.raises(InputError, match="pair up"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(InputError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)
