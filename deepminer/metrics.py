"""Classification metrics used by training, evaluation and the model card.

* :func:`per_class_auc` — one-vs-rest ROC AUC per class (scikit-learn ``roc_auc_score``).
* :func:`pauc_at_tpr` — DeepMiner's "pAUC @ TPR 0.8": the area under the ROC curve restricted to
  the high-sensitivity band ``TPR in [tpr, 1]``, normalised to ``[0, 1]``.
* :func:`histogram_baseline` — the trivial baseline of the model card: logistic regression on each
  patch's intensity histogram.

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


def nan_to_none(obj):
    """Recursively turn NaN floats into ``None`` so JSON output is standard (``null``)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, Mapping):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj
