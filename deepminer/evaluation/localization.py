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

import numpy as np

from deepminer.errors import InputError

_NAN = float("nan")
RECALL_GRID = np.linspace(0.0, 1.0, 101)
POINTING_TOLERANCE_PX = 15.0  # Zhang et al. 2018


def to_image(cell_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` cell map -> ``(H, W)`` float32 with the engine's geometry: bilinear,
    ``align_corners=False`` (cell ``(i, j)`` covers rows ``[i*H/h, (i+1)*H/h)``, cols likewise);
    :func:`deepminer.explain.units.upsample_maps` (imported on use: importing this module loads no torch)."""
    from deepminer.explain.units import upsample_maps

    m = np.asarray(cell_map, dtype=np.float64)
    if m.ndim != 2 or len(shape) != 2 or min(shape) < 1:
        raise InputError(f"to_image: cell map {m.shape} must be 2-D and shape {tuple(shape)} two positive sizes")
    return upsample_maps(m[None], shape)[0].astype(np.float32)


def _inputs(saliency, lesion, region) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(normalised map, lesion, region)``; the map min-max normalised over the region."""
    s, les = np.asarray(saliency, dtype=np.float64), np.asarray(lesion, dtype=bool)
    reg = np.ones(s.shape, dtype=bool) if region is None else np.asarray(region, dtype=bool)
    if s.ndim != 2 or s.shape != les.shape or s.shape != reg.shape:
        raise InputError(f"saliency {s.shape}, lesion {les.shape} and region {reg.shape} must be one 2-D shape")
    if not reg.any():
        raise InputError("region mask is empty: no pixel to evaluate")
    if not np.isfinite(s[reg]).all():
        raise InputError("saliency map has NaN or infinite values in the region")
    lo, hi = s[reg].min(), s[reg].max()
    return ((s - lo) / (hi - lo) if hi > lo else np.ones_like(s)), les, reg


def _counts(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tps, fps)``: true and false positives at each distinct score threshold, highest first
    (scikit-learn's ``_binary_clf_curve``): tied pixels enter together."""
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    return tps, last + 1.0 - tps


def _pr_points(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(precision, recall)`` at each distinct threshold, highest first (scikit-learn's
    ``precision_recall_curve`` without its appended ``(1, 0)`` point)."""
    tps, fps = _counts(score, positive)
    return tps / (tps + fps), tps / tps[-1]


def auprc(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """Average precision of the normalised map against the lesion over region pixels.

    The "localization utility" of Arun et al. 2021 (Radiology: AI, "Assessing the trustworthiness
    of saliency maps for localizing abnormalities in medical imaging"); also Aggarwal et al. AP is
    scikit-learn's step-wise sum ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds (no
    interpolation; tied pixels enter together). NaN when the lesion has no pixel in the region.
    """
    s, les, reg = _inputs(saliency, lesion, region)
    y = les[reg]
    if not y.any():
        return _NAN
    precision, recall = _pr_points(s[reg], y)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def roc_auc(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """Area under the ROC curve of the map as a pixel classifier of the lesion over region pixels
    (trapezoidal through the distinct thresholds, so ties count half): what Quantus's ``AUC``
    (Fawcett 2006) computes over all pixels. NaN without a lesion pixel, or without a non-lesion
    pixel, in the region. Prefer :func:`auprc` for small lesions: ROC AUC is dominated by the easy
    negatives."""
    s, les, reg = _inputs(saliency, lesion, region)
    y = les[reg]
    if not y.any() or y.all():
        return _NAN
    tps, fps = _counts(s[reg], y)
    return float(np.trapezoid(np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]))


def pr_curve(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None,
             recall_grid: np.ndarray = RECALL_GRID) -> np.ndarray:
    """Interpolated precision at each recall of ``recall_grid``: the maximum precision at recall
    ``>= r`` (as in the PASCAL VOC curves), for averaging PR curves over images; NaNs without a
    lesion pixel in the region."""
    s, les, reg = _inputs(saliency, lesion, region)
    grid = np.asarray(recall_grid, dtype=np.float64)
    y = les[reg]
    if not y.any():
        return np.full(grid.shape, _NAN)
    precision, recall = _pr_points(s[reg], y)
    best = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at this recall or beyond
    k = np.searchsorted(recall, np.clip(grid, 0.0, 1.0) - 1e-12, side="left")
    return best[np.minimum(k, best.size - 1)]


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
    from scipy.ndimage import distance_transform_edt

    s, les, reg = _inputs(saliency, lesion, region)
    if not les.any():
        raise InputError("pointing_game: lesion mask is empty")
    peak = reg & (s == s[reg].max())
    dist = distance_transform_edt(~les)  # distance of each pixel to the nearest lesion pixel
    return bool((dist[peak] <= float(tolerance_px)).any())


def otsu_iou_dice(saliency: np.ndarray, lesion: np.ndarray,
                  region: np.ndarray | None = None) -> tuple[float, float]:
    """``(iou, dice)`` of the map binarised at Otsu's threshold (computed over region pixels,
    ``skimage.filters.threshold_otsu``; foreground ``> threshold``) against the lesion, within the
    region: the mIoU protocol of CheXlocalize (Saporta et al. 2022, Nature Machine Intelligence).
    NaNs when the lesion has no pixel in the region."""
    from skimage.filters import threshold_otsu

    s, les, reg = _inputs(saliency, lesion, region)
    truth = les & reg
    if not truth.any():
        return _NAN, _NAN
    pred = reg & (s > threshold_otsu(s[reg]))
    inter, total = float((pred & truth).sum()), float(pred.sum() + truth.sum())
    return inter / (total - inter), 2.0 * inter / total


def relevance_mass(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """Share of the normalised map's (non-negative) mass within the region that lies inside the
    lesion: the relevance mass accuracy of Arras et al. 2022 ("CLEVR-XAI: a benchmark dataset for
    the ground truth evaluation of neural network explanations", Information Fusion). A constant
    map scores the lesion's area share; NaN when the lesion has no pixel in the region."""
    s, les, reg = _inputs(saliency, lesion, region)
    if not (les & reg).any():
        return _NAN
    return float(s[les & reg].sum() / s[reg].sum())


def localization_metrics(saliency: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None, *,
                         tolerance_px: float = POINTING_TOLERANCE_PX) -> dict[str, float]:
    """``{auprc, pointing, iou, dice, relevance_mass}`` of one map, all floats (``pointing`` 1.0 or
    0.0, so means are hit rates); every value NaN when the lesion has no pixel in the region."""
    _, les, reg = _inputs(saliency, lesion, region)
    if not (les & reg).any():
        return dict.fromkeys(("auprc", "pointing", "iou", "dice", "relevance_mass"), _NAN)
    iou, dice = otsu_iou_dice(saliency, lesion, region)
    return {"auprc": auprc(saliency, lesion, region),
            "pointing": float(pointing_game(saliency, lesion, region, tolerance_px=tolerance_px)),
            "iou": iou, "dice": dice,
            "relevance_mass": relevance_mass(saliency, lesion, region)}
