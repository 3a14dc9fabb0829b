"""Classification metrics used by training, evaluation and the model card.

* :func:`per_class_auc` — one-vs-rest ROC AUC per class (scikit-learn ``roc_auc_score``).
* :func:`pauc_at_tpr` — DeepMiner's "pAUC @ TPR 0.8": the area under the ROC curve restricted to
  the high-sensitivity band ``TPR in [tpr, 1]``, normalised to ``[0, 1]``.
* :func:`histogram_baseline` — the trivial baseline of the model card: logistic regression on each
  patch's intensity histogram.
* :func:`image_level_metrics` — the whole-image classification report (issue 21): per-class and
  abnormal-vs-normal AUC and 3-class accuracy with 95% bootstrap intervals, the confusion matrix,
  ECE with its reliability table, NLL and Brier score;
  :func:`expected_calibration_error` (with :func:`ece_rows` for resamples and
  :func:`ece_if_calibrated`, the ECE a calibrated model would show on as many images),
  :func:`reliability_bins`, :func:`fit_temperature`, :func:`fit_calibration` and
  :func:`calibrated_probabilities` (temperature scaling, Guo et al. 2017, plus a benign/malignant
  mixing rate for look-alikes) and :func:`softmax`. Numpy/scipy only, no torch.

**pAUC definition.** With the ROC curve ``FPR(t)`` written as a function of the true-positive rate
``t`` (the piecewise-linear curve through scikit-learn's ``roc_curve`` points), the partial area is

    pAUC_raw = integral over t in [tpr, 1] of (1 - FPR(t)) dt

i.e. the part of the usual AUC that lies in the horizontal band ``TPR >= tpr``. Its maximum is
``1 - tpr`` (0.2 at the default), reached by a perfect classifier; a random classifier gets
``(1 - tpr)**2 / 2`` (0.02). We report ``pauc = pAUC_raw / (1 - tpr)`` in ``[0, 1]`` (perfect 1.0,
random ``(1 - tpr) / 2`` = 0.1). DeepMiner's paper prints the raw value (e.g. 0.144 for malignant
with AUC 0.872, max 0.2); multiply ours by ``1 - tpr`` to compare.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from deepminer import CLASSES

# One-vs-rest needs both classes present; a metric that cannot be computed is reported as NaN
# (JSON: null) rather than an exception, so an epoch with no benign val patch still logs.
_NAN = float("nan")


def _binary_ok(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def roc_points(y_true_binary: Sequence[int] | np.ndarray,
               score: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC curve (scikit-learn), both non-decreasing, from (0,0) to (1,1)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true_binary).astype(int), np.asarray(score, dtype=np.float64),
                            drop_intermediate=False)
    return fpr, tpr


def pauc_at_tpr(y_true_binary: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray, tpr: float = 0.8,
                *, normalized: bool = True) -> float:
    """Partial AUC over the sensitivity band ``TPR in [tpr, 1]`` (see module docstring).

    ``normalized=True`` divides by ``1 - tpr`` (result in [0, 1]); ``False`` gives DeepMiner's raw
    area (at most ``1 - tpr``). NaN when only one class is present.
    """
    if not 0.0 <= tpr < 1.0:
        raise ValueError(f"tpr must be in [0, 1), got {tpr}")
    y = np.asarray(y_true_binary).astype(int)
    if not _binary_ok(y):
        return _NAN
    fpr_pts, tpr_pts = roc_points(y, score)
    # First ROC vertex at or above the band's lower edge; the curve enters the band on the segment
    # ending there (interpolate), and the integral of (1 - fpr) d(tpr) is a trapezoid sum above it.
    i = int(np.searchsorted(tpr_pts, tpr, side="left"))
    if tpr_pts[i] > tpr and i > 0:
        t0, t1 = tpr_pts[i - 1], tpr_pts[i]
        f0, f1 = fpr_pts[i - 1], fpr_pts[i]
        f_at = f0 + (f1 - f0) * (tpr - t0) / (t1 - t0)
        t = np.concatenate([[tpr], tpr_pts[i:]])
        f = np.concatenate([[f_at], fpr_pts[i:]])
    else:
        t, f = tpr_pts[i:], fpr_pts[i:]
    raw = float(np.sum(np.diff(t) * (1.0 - (f[1:] + f[:-1]) / 2.0)))
    return raw / (1.0 - tpr) if normalized else raw


def per_class_auc(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                  classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """One-vs-rest ROC AUC per class: ``{class: auc}`` (NaN where the class is absent or alone).

    ``y_true`` holds class indices, ``probs`` is ``(N, C)`` scores (column ``c`` for ``classes[c]``).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    out: dict[str, float] = {}
    for c, name in enumerate(classes):
        yb = (y == c).astype(int)
        out[name] = float(roc_auc_score(yb, p[:, c])) if _binary_ok(yb) else _NAN
    return out


def per_class_pauc(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES,
                   tpr: float = 0.8) -> dict[str, float]:
    """One-vs-rest :func:`pauc_at_tpr` per class (normalised)."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    return {name: pauc_at_tpr((y == c).astype(int), p[:, c], tpr) for c, name in enumerate(classes)}


def classification_report(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES,
                          tpr: float = 0.8) -> dict:
    """``{"n", "counts", "accuracy", "auc", "pauc"}`` for class indices and ``(N, C)`` probabilities."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    return {
        "n": int(y.size),
        "counts": {name: int((y == c).sum()) for c, name in enumerate(classes)},
        "accuracy": float((p.argmax(1) == y).mean()) if y.size else _NAN,
        "auc": per_class_auc(y, p, classes),
        "pauc": per_class_pauc(y, p, classes, tpr),
    }


def intensity_histograms(patches: Sequence[np.ndarray] | np.ndarray, bins: int = 32) -> np.ndarray:
    """``(N, bins)``: the normalised grey-level histogram over [0, 1] of each patch."""
    rows = []
    for patch in patches:
        h, _ = np.histogram(np.asarray(patch, dtype=np.float32).ravel(), bins=bins, range=(0.0, 1.0))
        rows.append(h / max(1, h.sum()))
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), bins)


def histogram_baseline(train_patches: Sequence[np.ndarray], train_labels: Sequence[int],
                       test_patches: Sequence[np.ndarray], test_labels: Sequence[int],
                       classes: Sequence[str] = CLASSES, bins: int = 32, seed: int = 0) -> dict:
    """The trivial baseline: multinomial logistic regression on each patch's intensity histogram.

    Fitted on the training patches (standardised features, balanced class weights), scored on the
    test patches; returns :func:`classification_report` of the test predictions plus ``"bins"``.
    A model that only learns "brighter means lesion" scores about as well as this.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = intensity_histograms(train_patches, bins), intensity_histograms(test_patches, bins)
    ytr = np.asarray(train_labels).astype(int)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced",
                                                             random_state=seed))
    clf.fit(xtr, ytr)
    probs = np.zeros((len(xte), len(classes)))
    probs[:, clf.classes_] = clf.predict_proba(xte)
    report = classification_report(test_labels, probs, classes)
    report["bins"] = bins
    return report


# -- image level: calibration ---------------------------------------------------------------------

ECE_BINS = 15  #: equal-width confidence bins of the ECE and the reliability table (Guo et al. 2017)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll_at(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    from scipy.special import logsumexp

    s = z / temperature
    return float(np.mean(logsumexp(s, axis=1) - s[np.arange(y.size), y]))


TEMPERATURE_BOUNDS = (0.05, 20.0)  #: the temperatures :func:`fit_temperature` and :func:`fit_calibration` search


def fit_temperature(logits: np.ndarray, y: Sequence[int] | np.ndarray, *,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T > 0`` that minimises the mean negative log-likelihood of
    ``softmax(logits / T)`` on ``(logits (N, C), y (N,) class indices)``: a bounded 1-D search over
    ``log T`` in ``log(bounds)`` (Brent, ``scipy.optimize.minimize_scalar``, x tolerance 1e-7).

    Temperature scaling (Guo et al. 2017) keeps every argmax (accuracy and AUCs unchanged) and only
    changes how confident the probabilities are. Fit it on validation logits, never on the test set.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    yy = np.asarray(y).astype(int).ravel()
    if z.ndim != 2 or z.shape[0] != yy.size or yy.size == 0:
        raise ValueError(f"fit_temperature: logits {z.shape} and y ({yy.size},) must be (N, C) and (N,), N > 0")
    if yy.min() < 0 or yy.max() >= z.shape[1]:
        raise ValueError(f"fit_temperature: class indices must be in [0, {z.shape[1]})")
    lo, hi = (math.log(b) for b in bounds)
    res = minimize_scalar(lambda t: _nll_at(z, yy, math.exp(t)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-7})
    return float(math.exp(res.x))


#: the classes whose probabilities the calibration mixes (:func:`calibrated_probabilities`)
MIX_CLASSES = ("benign", "malignant")


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0, mix: float = 0.0,
                             pair: tuple[int, int] | None = (1, 2)) -> np.ndarray:
    """``softmax(logits / T)``, then the two classes of ``pair`` mixed at rate ``mix``:
    ``p'_a = (1 - mix) p_a + mix p_b`` and ``p'_b = (1 - mix) p_b + mix p_a``; every other class
    keeps its probability and every row still sums to 1.

    The mix is the calibration's model of look-alikes (label noise between two classes): an image
    whose findings look malignant is benign at some rate, and the other way round, so a calibrated
    model can never be surer of one of the pair than ``1 - mix``, however clear the image. A
    temperature cannot say that: it sharpens or flattens every image alike (measured on the bundled
    models: docs/evaluation.md, "Calibration"). ``mix`` < 0.5 keeps the order of the two classes; an
    image nearly tied between another class and one of the pair can change its argmax."""
    p = softmax(logits, temperature)
    if mix and pair is not None:
        a, b = pair
        pa, pb = p[:, a].copy(), p[:, b].copy()
        p[:, a] = (1.0 - mix) * pa + mix * pb
        p[:, b] = (1.0 - mix) * pb + mix * pa
    return p


MAX_MIX = 0.45  #: the largest rate :func:`fit_calibration` considers (0.5 would erase the pair's order)


def fit_calibration(logits: np.ndarray, y: Sequence[int] | np.ndarray, *, pair: tuple[int, int] | None = (1, 2),
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> dict:
    """The temperature and the pair's mixing rate (:func:`calibrated_probabilities`) that together
    minimise the mean negative log-likelihood on ``(logits (N, C), y (N,))``: L-BFGS-B over
    ``(log T, mix)`` in ``log(bounds) x [0, MAX_MIX]``, started from :func:`fit_temperature` and
    mix 0.01. ``pair`` None: the temperature alone. Returns ``{"temperature", "mix", "nll"}``.
    Fit it on validation logits, never on the test set."""
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    yy = np.asarray(y).astype(int).ravel()
    t0 = fit_temperature(z, yy, bounds=bounds)
    if pair is None:
        return {"temperature": t0, "mix": 0.0, "nll": _nll_at(z, yy, t0)}
    rows = np.arange(yy.size)

    def nll(x: np.ndarray) -> float:
        p = calibrated_probabilities(z, math.exp(x[0]), float(x[1]), pair)
        return float(-np.mean(np.log(np.clip(p[rows, yy], 1e-300, None))))

    lo, hi = (math.log(b) for b in bounds)
    start = np.array([math.log(t0), 0.01])
    res = minimize(nll, start, method="L-BFGS-B", bounds=[(lo, hi), (0.0, MAX_MIX)])
    x = res.x if nll(res.x) <= nll(start) else start
    return {"temperature": float(math.exp(x[0])), "mix": float(x[1]), "nll": nll(x)}


def reliability_bins(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """The top-label reliability table: ``n_bins`` equal-width bins of the confidence
    ``max_c p_c`` over ``[0, 1]``, bin ``b`` holding ``b/n < conf <= (b+1)/n`` (the first bin also
    holds 0). Per bin ``{"lo", "hi", "count", "confidence" (mean), "accuracy" (share whose argmax
    is the truth)}``; an empty bin has NaN confidence and accuracy."""
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1) if p.size else np.zeros(0)
    right = (p.argmax(axis=1) == y) if p.size else np.zeros(0, dtype=bool)
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    out = []
    for i in range(n_bins):
        m = b == i
        k = int(m.sum())
        out.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "count": k,
                    "confidence": float(conf[m].mean()) if k else _NAN,
                    "accuracy": float(right[m].mean()) if k else _NAN})
    return out


def expected_calibration_error(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (Guo et al. 2017; Naeini et al. 2015):
    ``sum_b (n_b / N) * |accuracy_b - confidence_b|`` over the bins of :func:`reliability_bins`
    (empty bins contribute 0). NaN when there is no item."""
    bins = reliability_bins(y_true, probs, n_bins)
    n = sum(b["count"] for b in bins)
    if not n:
        return _NAN
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def ece_rows(conf: np.ndarray, right: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """:func:`expected_calibration_error` of every row of ``conf`` and ``right`` ``(R, N)`` (top-label
    confidences and whether the argmax was right), vectorised for resamples and draws: with the
    bins of :func:`reliability_bins`, ``sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum right - sum conf| / N``."""
    c = np.atleast_2d(np.asarray(conf, dtype=np.float64))
    r = np.atleast_2d(np.asarray(right, dtype=np.float64))
    rows, n = c.shape
    if not n:
        return np.full(rows, _NAN)
    b = np.clip(np.ceil(c * n_bins).astype(int) - 1, 0, n_bins - 1) + n_bins * np.arange(rows)[:, None]
    size = rows * n_bins
    sum_c = np.bincount(b.ravel(), weights=c.ravel(), minlength=size).reshape(rows, n_bins)
    sum_r = np.bincount(b.ravel(), weights=r.ravel(), minlength=size).reshape(rows, n_bins)
    return np.abs(sum_r - sum_c).sum(axis=1) / n


def ece_if_calibrated(probs: np.ndarray, *, draws: int = 1000, seed: int = 0, n_bins: int = ECE_BINS) -> np.ndarray:
    """The ECE a perfectly calibrated model with these very probabilities would show on these N
    images: each draw takes every image's label from its own ``probs`` row (consistency resampling,
    Vaicenavicius et al. 2019) and measures the ECE against it. Returns the ``draws`` ECEs. Binned ECE
    is biased upwards on few images (each bin's accuracy is a noisy share); on 200 images it is
    rarely near 0 even for a calibrated model, so a measured ECE means little without this floor."""
    p = np.asarray(probs, dtype=np.float64)
    n = p.shape[0]
    if not n or draws < 1:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(p, axis=1)
    cum[:, -1] = np.inf  # rounding never leaves a draw past the last class
    pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    out = []
    for s in range(0, draws, 250):  # chunks keep the (draws, N, C) comparison small
        u = rng.random((min(250, draws - s), n))
        drawn = (u[:, :, None] >= cum[None]).sum(axis=2)
        out.append(ece_rows(np.broadcast_to(conf, drawn.shape), drawn == pred[None], n_bins))
    return np.concatenate(out)


# -- image level: the report -----------------------------------------------------------------------

CI_LEVEL = 0.95


def rank_auc(y_binary: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC along the last axis by the Mann-Whitney statistic with mid-ranks (ties count half):
    the same number as ``roc_auc_score`` for each row; NaN for a row with one class only.
    ``y_binary`` and ``score`` are ``(..., N)``; vectorised over the leading axes (bootstrap)."""
    from scipy.stats import rankdata

    yb = np.asarray(y_binary).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    ranks = rankdata(s, axis=-1)  # average method: ties get their mid-rank
    n_pos = yb.sum(axis=-1).astype(np.float64)
    n_neg = yb.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * yb).sum(axis=-1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _interval(value: float, samples: np.ndarray, level: float) -> dict:
    """``{"value", "lo", "hi", "resamples"}``: the percentile interval of the finite ``samples``
    (resamples where the statistic is undefined are skipped and not counted)."""
    ok = samples[np.isfinite(samples)]
    if not ok.size or not math.isfinite(value):
        return {"value": value, "lo": _NAN, "hi": _NAN, "resamples": int(ok.size)}
    lo, hi = np.quantile(ok, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {"value": value, "lo": float(lo), "hi": float(hi), "resamples": int(ok.size)}


def image_level_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES,
                        *, n_boot: int = 2000, seed: int = 0, level: float = CI_LEVEL, n_bins: int = ECE_BINS,
                        negative: str = "normal", ece_draws: int | None = None) -> dict:
    """The image-level classification report of ``probs (N, C)`` (column ``c`` = ``classes[c]``)
    against ``y_true (N,)`` class indices.

    Returns (JSON-able, NaN where undefined)::

        {"n", "classes", "counts" {class: n true}, "predicted_counts" {class: n predicted},
         "auc" {class: {"value", "lo", "hi", "resamples"}},   # one-vs-rest, score p_class
         "abnormal_auc" {"value", "lo", "hi", "resamples", "score"},  # truth != negative, score 1 - p_negative
         "accuracy" {"value", "lo", "hi", "resamples"},       # argmax == truth
         "confusion" [[...]] (rows = truth, columns = predicted, counts, in ``classes`` order),
         "ece", "ece_interval" {"value", "lo", "hi", "resamples"}, "reliability" [bins, :func:`reliability_bins`],
         "ece_if_calibrated" {"draws", "mean", "q95", "share_at_least"},  # :func:`ece_if_calibrated`
         "nll", "brier",
         "bootstrap" {"resamples", "seed", "level", "method"}}

    Intervals: percentile bootstrap over images (``n_boot`` resamples of N images drawn with
    replacement, one seeded index matrix shared by every statistic, as
    :func:`deepminer.evaluation.stats.bootstrap_ci` draws it). A resample in which an AUC is
    undefined (its class, or every other class, absent) is skipped for that AUC, not redrawn;
    ``resamples`` says how many were used. ``n_boot=0``: no intervals (lo/hi NaN). Point AUCs are
    scikit-learn's ``roc_auc_score`` (:func:`per_class_auc`); the bootstrap ones the same statistic
    by mid-ranks (:func:`rank_auc`). ``ece_if_calibrated``: the ECE a perfectly calibrated model with
    these probabilities would show on these images (``ece_draws`` draws, default ``min(n_boot, 1000)``;
    seed ``seed + 1``; it needs no class to be present):
    its mean, its 95th percentile, and the share of draws at least the measured ECE (a small share:
    the miscalibration is more than the noise of N images). NLL: mean ``-log p_truth`` (p clipped at 1e-12); Brier: mean
    over images of ``sum_c (p_c - [c == truth])^2`` (0 to 2).
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=np.float64)
    names = list(classes)
    C = len(names)
    if p.ndim != 2 or p.shape != (y.size, C):
        raise ValueError(f"image_level_metrics: probs {p.shape} must be (N, {C}) for {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"image_level_metrics: class indices must be in [0, {C})")
    n = y.size
    pred = p.argmax(axis=1) if n else np.zeros(0, dtype=int)
    right = (pred == y).astype(np.float64)
    neg = names.index(negative) if negative in names else None
    rng_idx = (np.random.default_rng(seed).integers(0, n, size=(n_boot, n)) if n_boot > 0 and n
               else np.zeros((0, n), dtype=int))

    auc_point = per_class_auc(y, p, names)
    auc: dict[str, dict] = {}
    for c, name in enumerate(names):
        yb = (y == c)
        samples = rank_auc(yb[rng_idx], p[:, c][rng_idx]) if rng_idx.size else np.zeros(0)
        auc[name] = _interval(auc_point[name], samples, level)
    abnormal: dict = {"value": _NAN, "lo": _NAN, "hi": _NAN, "resamples": 0}
    if neg is not None:
        yb = y != neg
        score = 1.0 - p[:, neg]
        point = float(roc_auc_score(yb.astype(int), score)) if _binary_ok(yb.astype(int)) else _NAN
        samples = rank_auc(yb[rng_idx], score[rng_idx]) if rng_idx.size else np.zeros(0)
        abnormal = _interval(point, samples, level)
    abnormal["score"] = f"1 - p({negative})"
    acc = _interval(float(right.mean()) if n else _NAN,
                    right[rng_idx].mean(axis=1) if rng_idx.size else np.zeros(0), level)
    conf = confusion_matrix(y, pred, labels=list(range(C))) if n else np.zeros((C, C), dtype=int)
    onehot = np.eye(C)[y] if n else np.zeros((0, C))
    ece = expected_calibration_error(y, p, n_bins)
    top = p.max(axis=1) if n else np.zeros(0)
    ece_samples = ece_rows(top[rng_idx], right[rng_idx], n_bins) if rng_idx.size else np.zeros(0)
    draws = min(int(n_boot), 1000) if ece_draws is None else int(ece_draws)
    floor = ece_if_calibrated(p, draws=draws, seed=seed + 1, n_bins=n_bins) if draws > 0 and n else np.zeros(0)
    calibrated: dict = {"draws": int(floor.size), "mean": _NAN, "q95": _NAN, "share_at_least": _NAN}
    if floor.size and math.isfinite(ece):
        calibrated.update(mean=float(floor.mean()), q95=float(np.quantile(floor, 0.95)),
                          share_at_least=float((floor >= ece - 1e-12).mean()))
    return {
        "n": int(n), "classes": names,
        "counts": {name: int((y == c).sum()) for c, name in enumerate(names)},
        "predicted_counts": {name: int((pred == c).sum()) for c, name in enumerate(names)},
        "auc": auc, "abnormal_auc": abnormal, "accuracy": acc,
        "confusion": conf.astype(int).tolist(),
        "ece": ece, "ece_interval": _interval(ece, ece_samples, level), "ece_if_calibrated": calibrated,
        "reliability": reliability_bins(y, p, n_bins),
        "nll": float(np.mean(-np.log(np.clip(p[np.arange(n), y], 1e-12, None)))) if n else _NAN,
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))) if n else _NAN,
        "bootstrap": {"resamples": int(n_boot), "seed": int(seed), "level": float(level),
                      "method": "percentile, images resampled with replacement; a resample where an AUC "
                                "is undefined is skipped for that AUC"},
    }


def nan_to_none(obj):
    """Recursively turn NaN floats into ``None`` so JSON output is standard (``null``)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, Mapping):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj
