"""Localization metrics: how well one saliency map points at one lesion.

Every metric takes a saliency map already at image resolution ``(H, W)`` (:func:`to_image` brings a
cell map there with the engine's geometry), the lesion mask ``(H, W)`` bool and a ``region`` mask
``(H, W)`` bool: the breast tissue. Metrics are computed over region pixels only, since background
pixels are trivial negatives (``region=None``: every pixel). The map is min-max normalised over the
region first; a constant map normalises to ones (a flat explanation spreads its mass evenly).

A metric that needs a lesion is NaN when the lesion has no pixel in the region.

* :func:`auprc` (and :func:`pr_curve`) - average precision of the map as a pixel classifier of the
  lesion (Arun et al. 2021, "localization utility"; Aggarwal et al.);
* :func:`roc_auc` - the ROC counterpart (Quantus's ``AUC``), less telling for small lesions;
* :func:`pointing_game` - the map's peak within ``tolerance_px`` of the lesion (Zhang et al. 2018);
* :func:`otsu_iou_dice` - the map binarised at Otsu's threshold vs the lesion (CheXlocalize mIoU);
* :func:`relevance_mass` - the share of the map's mass inside the lesion (Arras et al. 2022);
* :func:`localization_metrics` - all of them as one dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepminer.errors import InputError

_NAN = float("nan")
RECALL_GRID = np.linspace(0.0, 1.0, 101)
POINTING_TOLERANCE_PX = 15.0  # Zhang et al. 2018


def to_image(cell_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` cell map -> ``(H, W)`` float32 with the engine's geometry: bilinear,
    ``align_corners=False`` (cell ``(i, j)`` covers rows ``[i*H/h, (i+1)*H/h)``, cols likewise);
    the same map as :func:`deepminer.explain.units.upsample_maps` (float32; no torch)."""
    import cv2

    m = np.asarray(cell_map, dtype=np.float32)
    if m.ndim != 2 or len(shape) != 2 or min(shape) < 1:
        raise InputError(f"to_image: cell map {m.shape} must be 2-D and shape {tuple(shape)} two positive sizes")
    # OpenCV's bilinear resize samples at half-pixel centres like align_corners=False (equal to
    # deepminer.explain.units.upsample_maps within 1e-5, tested) at a fraction of the cost
    return cv2.resize(m, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)


def _counts(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tps, fps)``: true and false positives at each distinct score threshold, highest first
    (scikit-learn's ``_binary_clf_curve``): tied pixels enter together."""
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    return tps, last + 1.0 - tps


def _positive_steps(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(precision, recall, P)`` at each distinct score that some positive holds, highest first.

    The only thresholds where recall moves, so the step-wise AP and the interpolated PR curve need no
    others. One sort of the scores (no argsort) and a search per distinct positive score: the counts
    of :func:`_counts` at those thresholds, for a fraction of its cost (tested equal)."""
    values, tied = np.unique(score[positive], return_counts=True)  # ascending
    values, tied = values[::-1], tied[::-1]
    above = score.size - np.searchsorted(np.sort(score), values, side="left")  # pixels with score >= v
    tps = np.cumsum(tied).astype(np.float64)
    return tps / above, tps / tps[-1], int(tps[-1])


@dataclass(frozen=True)
class LesionTarget:
    """A lesion and the region it is scored in, prepared once per image for many maps: the region's
    lesion labels, the lesion's pixel coordinates, and (on first need) its distance transform."""

    lesion: np.ndarray
    region: np.ndarray
    labels: np.ndarray  #: ``lesion[region]``
    coords: np.ndarray  #: ``(n, 2)`` lesion pixel coordinates (row, col)
    index: np.ndarray  #: flat indices of the region's pixels (row-major)
    _edt: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def make(cls, lesion: np.ndarray, region: np.ndarray | None, shape: tuple[int, ...] | None = None) -> LesionTarget:
        les = np.asarray(lesion, dtype=bool)
        reg = np.ones(les.shape, dtype=bool) if region is None else np.asarray(region, dtype=bool)
        if les.ndim != 2 or les.shape != reg.shape or (shape is not None and tuple(shape) != les.shape):
            raise InputError(f"saliency {tuple(shape) if shape is not None else les.shape}, lesion {les.shape} and "
                             f"region {reg.shape} must be one 2-D shape")
        if not reg.any():
            raise InputError("region mask is empty: no pixel to evaluate")
        return cls(les, reg, les[reg], np.argwhere(les), np.flatnonzero(reg))

    @property
    def scorable(self) -> bool:
        """The lesion has a pixel in the region (else every metric is NaN)."""
        return bool(self.labels.any())

    def distance(self) -> np.ndarray:
        """Each pixel's Euclidean distance to the nearest lesion pixel (computed once)."""
        if not self._edt:
            from scipy.ndimage import distance_transform_edt

            self._edt.append(distance_transform_edt(~self.lesion))
        return self._edt[0]


def _normalised(saliency: np.ndarray, t: LesionTarget) -> np.ndarray:
    """The map's region pixels (row-major), min-max normalised over the region (a constant map: ones)."""
    s = np.asarray(saliency)
    if s.shape != t.lesion.shape:
        raise InputError(f"saliency {s.shape}, lesion {t.lesion.shape} and region {t.region.shape} must be one "
                         "2-D shape")
    inside = s.ravel()[t.index].astype(np.float64)
    if not np.isfinite(inside).all():
        raise InputError("saliency map has NaN or infinite values in the region")
    lo, hi = inside.min(), inside.max()
    return (inside - lo) / (hi - lo) if hi > lo else np.ones_like(inside)


def _auprc(steps: tuple[np.ndarray, np.ndarray, int]) -> float:
    precision, recall, _ = steps
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _pr_curve(steps: tuple[np.ndarray, np.ndarray, int], grid: np.ndarray) -> np.ndarray:
    precision, recall, _ = steps
    best = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at this recall or beyond
    k = np.searchsorted(recall, np.clip(grid, 0.0, 1.0) - 1e-12, side="left")
    return best[np.minimum(k, best.size - 1)]


def _pointing(inside: np.ndarray, t: LesionTarget, tolerance_px: float) -> bool:
    flat = t.index[inside == inside.max()]  # the peak's pixels (ties: all of them)
    peaks = np.stack(np.divmod(flat, t.lesion.shape[1]), axis=1)
    # only lesion pixels in the peaks' bounding box widened by the tolerance can be within it of a peak
    r = int(np.ceil(tolerance_px))
    lo, hi = peaks.min(axis=0) - r, peaks.max(axis=0) + r
    near = t.coords[((t.coords >= lo) & (t.coords <= hi)).all(axis=1)]
    if near.shape[0] == 0:
        return False
    if peaks.shape[0] * near.shape[0] <= 50_000:  # few peaks x lesion pixels: distances directly (else the
        # distance transform, computed once per target and shared by every map scored against it)
        d2 = ((peaks[:, None, :] - near[None, :, :]) ** 2).sum(-1)
        return bool(d2.min() <= float(tolerance_px) ** 2)
    return bool((t.distance()[peaks[:, 0], peaks[:, 1]] <= float(tolerance_px)).any())


def _otsu_iou_dice(inside: np.ndarray, t: LesionTarget) -> tuple[float, float]:
    from deepminer.data.tissue import otsu_threshold

    pred, truth = inside > otsu_threshold(inside), t.labels
    inter, total = float((pred & truth).sum()), float(pred.sum() + truth.sum())
    return inter / (total - inter), 2.0 * inter / total


def _relevance_mass(inside: np.ndarray, t: LesionTarget) -> float:
    return float(inside[t.labels].sum() / inside.sum())


def auprc(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """Average precision of the normalised map against the lesion over region pixels.

    The "localization utility" of Arun et al. 2021 (Radiology: AI, "Assessing the trustworthiness
    of saliency maps for localizing abnormalities in medical imaging"); also Aggarwal et al. AP is
    scikit-learn's step-wise sum ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds (no
    interpolation; tied pixels enter together). NaN when the lesion has no pixel in the region.
    """
    t = LesionTarget.make(lesion, region, np.shape(saliency))
    if not t.scorable:
        return _NAN
    return _auprc(_positive_steps(_normalised(saliency, t), t.labels))


def roc_auc(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """Area under the ROC curve of the map as a pixel classifier of the lesion over region pixels
    (trapezoidal through the distinct thresholds, so ties count half): what Quantus's ``AUC``
    (Fawcett 2006) computes over all pixels. NaN without a lesion pixel, or without a non-lesion
    pixel, in the region. Prefer :func:`auprc` for small lesions: ROC AUC is dominated by the easy
    negatives."""
    t = LesionTarget.make(lesion, region, np.shape(saliency))
    y = t.labels
    if not y.any() or y.all():
        return _NAN
    tps, fps = _counts(_normalised(saliency, t), y)
    return float(np.trapezoid(np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]))


def pr_curve(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None,
             recall_grid: np.ndarray = RECALL_GRID) -> np.ndarray:
    """Interpolated precision at each recall of ``recall_grid``: the maximum precision at recall
    ``>= r`` (as in the PASCAL VOC curves), for averaging PR curves over images; NaNs without a
    lesion pixel in the region."""
    grid = np.asarray(recall_grid, dtype=np.float64)
    t = LesionTarget.make(lesion, region, np.shape(saliency))
    if not t.scorable:
        return np.full(grid.shape, _NAN)
    return _pr_curve(_positive_steps(_normalised(saliency, t), t.labels), grid)


def pointing_game(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None, *,
                  tolerance_px: float = POINTING_TOLERANCE_PX) -> bool:
    """Whether the map's peak falls on the lesion, with a tolerance.

    Zhang et al. 2018 ("Top-down neural attention by excitation backprop", IJCV): a hit when the
    maximum lies within ``tolerance_px`` (15 px in the paper) of the annotated object, i.e. inside
    the lesion dilated by a Euclidean disc of that radius, in original pixels. The peak is taken
    over the region; with ties a hit when any maximal pixel is within (Quantus's convention). The
    pointwise localization that WILDCAT (Durand et al. 2017) reports (after Oquab et al. 2015) is the
    same hit test with its own tolerance. The lesion counts whole (also outside the region). Raises
    on an empty lesion (no hit is defined).
    """
    t = LesionTarget.make(lesion, region, np.shape(saliency))
    if not t.lesion.any():
        raise InputError("pointing_game: lesion mask is empty")
    return _pointing(_normalised(saliency, t), t, tolerance_px)


def otsu_iou_dice(saliency: np.ndarray, lesion: np.ndarray,
                  region: np.ndarray | None = None) -> tuple[float, float]:
    """``(iou, dice)`` of the map binarised at Otsu's threshold (computed over region pixels with
    the project's ``deepminer.data.tissue.otsu_threshold``, 256 bins: ``skimage.filters.threshold_otsu``'s
    threshold but for values within rounding of a bin edge; foreground ``> threshold``) against the
    lesion, within the region: the mIoU protocol of CheXlocalize (Saporta et al. 2022, Nature Machine
    Intelligence).
    NaNs when the lesion has no pixel in the region."""
    t = LesionTarget.make(lesion, region, np.shape(saliency))
    if not t.scorable:
        return _NAN, _NAN
    return _otsu_iou_dice(_normalised(saliency, t), t)


def relevance_mass(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """Share of the normalised map's (non-negative) mass within the region that lies inside the
    lesion: the relevance mass accuracy of Arras et al. 2022 ("CLEVR-XAI: a benchmark dataset for
    the ground truth evaluation of neural network explanations", Information Fusion). A constant
    map scores the lesion's area share; NaN when the lesion has no pixel in the region."""
    t = LesionTarget.make(lesion, region, np.shape(saliency))
    if not t.scorable:
        return _NAN
    return _relevance_mass(_normalised(saliency, t), t)


def localization_metrics(saliency: np.ndarray, lesion: np.ndarray | LesionTarget, region: np.ndarray | None = None,
                         *, tolerance_px: float = POINTING_TOLERANCE_PX, pr: bool = False) -> dict[str, Any]:
    """``{auprc, pointing, iou, dice, relevance_mass}`` of one map, all floats (``pointing`` 1.0 or
    0.0, so means are hit rates); every value NaN when the lesion has no pixel in the region.
    ``lesion`` may be a :class:`LesionTarget` made once per image (``region`` then unused): the map
    is normalised once and the lesion's side is reused, for many maps of one image. ``pr``: also
    ``"pr"``, :func:`pr_curve` on :data:`RECALL_GRID`."""
    t = lesion if isinstance(lesion, LesionTarget) else LesionTarget.make(lesion, region, np.shape(saliency))
    keys = ("auprc", "pointing", "iou", "dice", "relevance_mass")
    if not t.scorable:
        out: dict[str, Any] = dict.fromkeys(keys, _NAN)
        if pr:
            out["pr"] = np.full(RECALL_GRID.shape, _NAN)
        return out
    inside = _normalised(saliency, t)
    steps = _positive_steps(inside, t.labels)  # one sort for AP and the PR curve
    iou, dice = _otsu_iou_dice(inside, t)
    out = {"auprc": _auprc(steps), "pointing": float(_pointing(inside, t, tolerance_px)),
           "iou": iou, "dice": dice, "relevance_mass": _relevance_mass(inside, t)}
    if pr:
        out["pr"] = _pr_curve(steps, RECALL_GRID)
    return out
