"""Per-image results of an evaluation and their summary: one record type, one summary, for the
``deepminer evaluate-explanations`` run (:mod:`.runner`, :mod:`.report`) and the workbench's Evaluate
page (``ui/evaluate.py``) alike.

An :class:`ImageRecord` holds one image's scores as ``scores[method][view][metric]``: a *view* is the
class a map explains (``truth``: the image's label; ``predicted``: the model's prediction; the class
each view explained is in ``targets``). The run fills both views; the page fills the one its person
picked. :func:`summary_rows` turns records into means with 95% bootstrap intervals
(:func:`~deepminer.evaluation.stats.bootstrap_ci`) and, against a reference method, paired
differences.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.evaluation.catalog import BASELINES, FAITHFULNESS, LOCALIZATION, LOWER_IS_BETTER

VIEWS = ("truth", "predicted")  #: the explained class: the image's label, or the model's prediction
SUBSETS = ("abnormal", "true_positive")  #: every scored image, or those the model got right


def value(x: Any) -> float:
    """A score as a float (a missing one, None in JSON, is NaN)."""
    return math.nan if x is None else float(x)


def clean_json(x: Any) -> Any:
    """``x`` with numpy scalars/arrays as Python values, paths as strings, tuples as lists and every
    non-finite float as None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean_json(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


@dataclass
class ImageRecord:
    """One image of an evaluation: what the model said, each method's metrics per view
    (``scores[method][view]``: ``auprc``, ``pointing``... and ``pr``, the precision curve; the run
    adds faithfulness for ``truth``), or why it was not scored (``problem``; a normal image is counted
    and not scored, without a problem). ``saliency``: the reference method's map (CAM) of the first
    view's class on the CAM grid, what the best/worst gallery draws. The CLI run also keeps the
    probabilities, the report line, the lesion's size, text agreement and sanity steps."""

    image_id: str
    label: str | None = None
    prediction: str = ""
    targets: dict[str, str] = field(default_factory=dict)  #: view -> the class it explained
    scores: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    problem: str = ""
    seconds: float = 0.0
    saliency: np.ndarray | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    report: str = ""
    lesion_pixels: int | None = None
    gms: dict[str, Any] | None = None
    sanity: dict[str, list[dict[str, Any]]] | None = None

    @property
    def scored(self) -> bool:
        """Scored against a lesion (an abnormal image with its mask, the lesion inside the breast)."""
        return bool(self.scores)

    @property
    def view(self) -> str | None:
        """The first view this image was scored for (the Evaluate page scores one)."""
        return next(iter(self.targets), None)

    def score(self, method: str, view: str | None, metric: str) -> float:
        """One metric of ``view`` (None: :attr:`view`); NaN when it was not measured or is undefined."""
        return value(self.measured(method, view).get(metric))

    def measured(self, method: str, view: str | None = None) -> dict[str, Any]:
        """What was measured of ``method`` for ``view`` (None: :attr:`view`); empty when nothing was."""
        return (self.scores.get(method) or {}).get(view or self.view or "") or {}

    def to_json(self) -> dict[str, Any]:
        """The record as strict JSON (NaN as null; the saliency in the API's array encoding)."""
        from deepminer.encoding import encode_array

        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "saliency"}
        out["saliency"] = None if self.saliency is None else encode_array(self.saliency, "float32")
        return clean_json(out)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageRecord:
        from deepminer.encoding import decode_array

        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["saliency"] = None if d.get("saliency") is None else decode_array(d["saliency"])
        return cls(**kw)


def methods_of(records: Iterable[ImageRecord]) -> list[str]:
    """The methods the records were scored with, in the order first seen; the baselines last."""
    seen: dict[str, None] = {}
    for r in records:
        seen.update(dict.fromkeys(r.scores))
    return [m for m in seen if m not in BASELINES] + [m for m in BASELINES if m in seen]


def in_subset(record: ImageRecord, subset: str) -> bool:
    """``abnormal``: scored; ``true_positive``: scored and predicted as its label."""
    return record.scored and (subset != "true_positive" or record.prediction == record.label)


def values(records: Sequence[ImageRecord], method: str, view: str | None, metric: str,
           subset: str = "abnormal") -> np.ndarray:
    """One value per record of ``subset``, in record order (NaN where the method or the metric is
    missing: the images stay paired across methods); ``view`` None: each record's own."""
    return np.array([r.score(method, view, metric) for r in records if in_subset(r, subset)], dtype=np.float64)


def summary_rows(records: Sequence[ImageRecord], *, methods: Sequence[str] | None = None,
                 metrics: Sequence[str] = LOCALIZATION, views: Sequence[str] | None = None,
                 subsets: Sequence[str] = ("abnormal",), reference: str | None = None,
                 n_resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per view (default: the views the records were scored for) x subset x metric x method
    (``methods``, default :func:`methods_of`): the mean with its
    95% percentile-bootstrap interval over the images (NaNs dropped), ``n``, whether the method is a
    baseline and which way is better; with a ``reference`` method, every other method's paired
    difference against it, its interval and whether that excludes 0. Faithfulness is measured for the
    ground-truth class only (no ``predicted`` rows)."""
    from deepminer.evaluation.stats import bootstrap_ci, excludes_zero, paired_bootstrap_ci

    methods = list(methods) if methods is not None else methods_of(records)
    if views is None:
        views = list(dict.fromkeys(r.view for r in records if r.scored and r.view))
    rows = []
    for view in views:
        for subset in subsets:
            for metric in metrics:
                if metric in FAITHFULNESS and view != "truth":
                    continue
                ref = values(records, reference, view, metric, subset) if reference else None
                for method in methods:
                    vals = values(records, method, view, metric, subset)
                    ci = bootstrap_ci(vals, n_resamples=n_resamples, seed=seed)
                    row: dict[str, Any] = {"method": method, "view": view, "subset": subset, "metric": metric,
                                           "mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "n": ci.n,
                                           "baseline": method in BASELINES,
                                           "better": "lower" if metric in LOWER_IS_BETTER else "higher"}
                    if ref is not None and method != reference and len(vals):
                        d = paired_bootstrap_ci(vals, ref, n_resamples=n_resamples, seed=seed)
                        row.update(diff_vs=reference, diff=d.mean, diff_lo=d.lo, diff_hi=d.hi,
                                   diff_excludes_zero=bool(excludes_zero(d)))
                    rows.append(row)
    return rows


def curves(records: Sequence[ImageRecord], key: str, view: str | None = None, methods: Sequence[str] | None = None,
           width: int | None = None) -> dict[str, np.ndarray]:
    """Per method, the ``(n_scored_images, width)`` matrix of a per-image curve of ``view`` (None:
    each record's own): ``pr``, ``deletion_curve``, ``insertion_curve``; NaN where a value or an
    image's curve is missing."""
    scored = [r for r in records if r.scored]
    out = {}
    for m in (methods if methods is not None else methods_of(scored)):
        rows = [[value(x) for x in r.measured(m, view).get(key, ())] for r in scored]
        n = width if width is not None else max((len(x) for x in rows), default=0)
        out[m] = np.array([x if len(x) == n else [math.nan] * n for x in rows], dtype=np.float64).reshape(len(rows), n)
    return out


def best_worst(records: Sequence[ImageRecord], method: str = "cam", view: str | None = None, metric: str = "auprc",
               k: int = 2) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The ``k`` images where ``method`` scores best and the ``k`` where it scores worst on ``metric``
    of ``view`` (None: each record's own); scored images with a finite value; best first, worst
    first; no image in both."""
    scored = [r for r in records if math.isfinite(r.score(method, view, metric))]
    scored.sort(key=lambda r: -r.score(method, view, metric))
    best = scored[:min(k, max(1, len(scored) // 2))]
    return best, [r for r in scored[::-1][:min(k, len(scored) // 2)]]


#: every class needs at least this many images for the image-level intervals (fewer: point values
#: and counts only; a bootstrap over a handful of positives says little)
MIN_IMAGES_FOR_CI = 10


def classification_summary(records: Sequence[ImageRecord], classes: Sequence[str], *, n_resamples: int = 1000,
                           seed: int = 0) -> dict[str, Any] | None:
    """How right the model was on the images it explained: :func:`deepminer.metrics.image_level_metrics`
    of the probabilities each record kept (the explanation's own forward pass, no second one), with
    95% bootstrap intervals when every class has at least :data:`MIN_IMAGES_FOR_CI` images (else
    none: ``"intervals": False``, the counts and the confusion matrix say the rest), and always the
    ECE a perfectly calibrated model would show on as many images. None when no record kept its
    probabilities."""
    from deepminer.metrics import image_level_metrics

    names = list(classes)
    got = [r for r in records if r.probabilities and r.label in names
           and all(c in r.probabilities for c in names)]
    if not got:
        return None
    y = np.array([names.index(str(r.label)) for r in got], dtype=int)
    probs = np.array([[float(r.probabilities[c]) for c in names] for r in got], dtype=np.float64)
    enough = all(int((y == c).sum()) >= MIN_IMAGES_FOR_CI for c in range(len(names)))
    # the ECE a calibrated model would show here needs no class to be present: always drawn
    out = image_level_metrics(y, probs, names, n_boot=n_resamples if enough else 0, seed=seed,
                              ece_draws=min(n_resamples, 1000))
    out["intervals"] = enough
    out["min_images_for_intervals"] = MIN_IMAGES_FOR_CI
    out["images_without_probabilities"] = len(records) - len(got)
    return out
