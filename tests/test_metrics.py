"""Per-class AUC, pAUC at TPR 0.8 (hand-worked ROCs + numerical integration), histogram baseline."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deepminer.metrics import (classification_report, histogram_baseline, intensity_histograms,
                               nan_to_none, pauc_at_tpr, per_class_auc, roc_points)


def test_pauc_hand_worked_vertical_step():
    # 5 positives, 4 negatives, no ties. Sorted by score the ROC visits
    # (0,.2) (0,.4) (.25,.4) (.5,.4) (.5,.6) (.5,.8) (.75,.8) (.75,1) (1,1):
    # inside the band TPR in [.8, 1] the curve is the vertical segment FPR = .75, so
    # raw = .2 * (1 - .75) = .05 and normalised = .05 / .2 = .25.
    pos = [0.9, 0.8, 0.4, 0.3, 0.1]
    neg = [0.7, 0.5, 0.2, 0.05]
    y = [1] * 5 + [0] * 4
    s = pos + neg
    assert pauc_at_tpr(y, s, normalized=False) == pytest.approx(0.05)
    assert pauc_at_tpr(y, s) == pytest.approx(0.25)


def test_pauc_hand_worked_tie_interpolated():
    # positives .9, .5 ; negatives .5, .1 : the tie at .5 gives the diagonal (0,.5) -> (.5,1),
    # FPR(t) = t - .5, so raw = integral_.8^1 (1.5 - t) dt = .3 - .18 = .12, normalised .6.
    y = [1, 1, 0, 0]
    s = [0.9, 0.5, 0.5, 0.1]
    assert pauc_at_tpr(y, s, normalized=False) == pytest.approx(0.12)
    assert pauc_at_tpr(y, s) == pytest.approx(0.6)


def test_pauc_extremes_and_random_level():
    y = np.array([0] * 50 + [1] * 50)
    assert pauc_at_tpr(y, y.astype(float)) == pytest.approx(1.0)          # perfect
    assert pauc_at_tpr(y, -y.astype(float)) == pytest.approx(0.0)         # perfectly wrong
    rng = np.random.default_rng(0)
    yr = rng.integers(0, 2, 200_000)
    assert pauc_at_tpr(yr, rng.random(yr.size)) == pytest.approx(0.1, abs=0.01)  # random: (1-.8)/2
    assert math.isnan(pauc_at_tpr([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        pauc_at_tpr(y, y, tpr=1.0)


def _numeric_pauc(fpr, tpr, lo, n=400_001):
    """Trapezoid sum of 1 - FPR(t) on a dense grid of the band [lo, 1], where FPR(t)
    is the smallest FPR at which the piecewise-linear ROC reaches TPR t."""
    t = np.linspace(lo, 1.0, n)
    f = np.full_like(t, np.inf)
    for j in range(len(fpr) - 1):
        t0, t1, f0, f1 = tpr[j], tpr[j + 1], fpr[j], fpr[j + 1]
        if t1 > t0:
            sel = (t >= t0) & (t <= t1)
            f[sel] = np.minimum(f[sel], f0 + (f1 - f0) * (t[sel] - t0) / (t1 - t0))
    return float(np.trapezoid(1.0 - f, t)) / (1.0 - lo)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lo", [0.8, 0.5])
def test_pauc_matches_numerical_integration_of_sklearn_roc(seed, lo):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + 0.8 * y, 1)  # rounding makes ties (diagonal segments)
    fpr, tpr = roc_points(y, s)
    assert pauc_at_tpr(y, s, tpr=lo) == pytest.approx(_numeric_pauc(fpr, tpr, lo), abs=2e-4)


def test_pauc_at_zero_is_the_full_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)
    assert pauc_at_tpr(y, s, tpr=0.0) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_per_class_auc_one_vs_rest_by_hand():
    # class 2 scores: positives (idx 2,5) get .9 and .4; negatives .1 .2 .3 .5 -> pairs won 4 + 3 = 7 of 8
    y = [0, 1, 2, 0, 1, 2]
    p2 = [0.1, 0.2, 0.9, 0.3, 0.5, 0.4]
    probs = np.zeros((6, 3))
    probs[:, 2] = p2
    probs[:, 0] = [0.8, 0.1, 0.0, 0.6, 0.3, 0.2]   # class 0 perfectly separated
    probs[:, 1] = 1 - probs[:, 0] - probs[:, 2]
    auc = per_class_auc(y, probs)
    assert auc["malignant"] == pytest.approx(7 / 8)
    assert auc["normal"] == pytest.approx(1.0)
    assert set(auc) == {"normal", "benign", "malignant"}
    # a class absent from y_true -> NaN, not an exception; JSON-safe after nan_to_none
    auc2 = per_class_auc([0, 0, 2, 2], probs[:4])
    assert math.isnan(auc2["benign"])
    assert nan_to_none({"a": [auc2["benign"], 1.0]}) == {"a": [None, 1.0]}
    rep = classification_report(y, probs)
    assert rep["n"] == 6 and rep["counts"] == {"normal": 2, "benign": 2, "malignant": 2}
    assert rep["accuracy"] == pytest.approx(np.mean(np.argmax(probs, 1) == np.array(y)))


def test_histogram_baseline_sees_brightness_not_shape():
    rng = np.random.default_rng(0)

    def make(n, bright):
        out = []
        for _ in range(n):
            p = rng.random((16, 16)) * 0.4
            if bright:
                p[4:12, 4:12] += 0.5                 # a brighter blob
            out.append(p)
        return out

    tr = make(60, False) + make(60, True)
    te = make(40, False) + make(40, True)
    ytr = [0] * 60 + [2] * 60
    yte = [0] * 40 + [2] * 40
    rep = histogram_baseline(tr, ytr, te, yte)
    assert rep["auc"]["malignant"] > 0.95                # intensity differs: the baseline sees it
    assert math.isnan(rep["auc"]["benign"])              # no benign test patches
    # same intensities, different arrangement: the histogram can't tell them apart
    def shuffled(n, bright):
        return [rng.permutation(p.ravel()).reshape(16, 16) for p in make(n, bright)]

    te2 = make(40, True) + shuffled(40, True)
    rep2 = histogram_baseline(tr, ytr, te2, [0] * 40 + [2] * 40)
    assert 0.3 < rep2["auc"]["malignant"] < 0.7
    h = intensity_histograms([np.array([[0.0, 0.49], [0.51, 1.0]])], bins=2)
    assert h.tolist() == [[0.5, 0.5]]
