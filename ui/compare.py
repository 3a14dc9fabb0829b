"""What the Compare page computes: one image through two models, and their two unit atlases side by
side. Plain functions of :class:`~deepminer.explanation.Explanation` and :class:`~deepminer.atlas.Atlas`
(no Streamlit; the page lays the answers out, the tests call these directly).

* :func:`pair_problem`: why two picks cannot be compared (the same model twice, a model the server
  does not host), in one line;
* :func:`model_column`: one model's side of the image comparison (probabilities, the CAM of the
  compared class, its top units with their labels, DeepMiner's sentence);
* :func:`concept_rows`: per concept, the best unit and its IoU in each atlas and how many units pass
  Network Dissection's IoU >= 0.04;
* :func:`size_rows`, :func:`size_verdict`: the distribution of unit mask sizes (Peck et al.: the
  fine-tuned model's units cover smaller regions than the baseline's);
* :func:`coverage_rows`: DeepMiner's top-20 coverage per class.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deepminer.defaults import MIN_LABEL_IOU
from deepminer.explanation import Explanation


def pair_problem(a: str | None, b: str | None, served: Sequence[str]) -> str | None:
    """One line saying why models ``a`` and ``b`` cannot be compared, or None when they can."""
    if not a or not b:
        return "Pick two models to compare."
    for name in (a, b):
        if name not in served:
            return f"The server does not host model '{name}' (it serves {', '.join(served) or 'none'})."
    if a == b:
        return f"'{a}' compared with itself: pick two different models."
    return None


def model_column(result: Explanation, labels: Mapping[int, str], cls: str, *, top: int = 8) -> dict[str, Any]:
    """One model's side: ``probabilities``, ``prediction``, ``cam`` (the normalized CAM of ``cls``, the
    class both sides show), ``units`` (the top units for ``cls`` with influence and label) and
    ``sentence`` (DeepMiner's explanation of the model's own prediction with its labels)."""
    from ui.logic import explanation, top_unit_rows

    rows = top_unit_rows(result, cls, labels)[:top]
    return {"model": dict(result.model or {}), "probabilities": dict(result.probabilities),
            "prediction": result.prediction, "cam": result.cam_normalized(cls), "units": rows,
            "sentence": explanation(result, labels)["sentence"]}


def _concepts(atlas) -> list[str]:
    return list(atlas.concepts) if atlas is not None else []


def concept_rows(a, b, *, min_iou: float = MIN_LABEL_IOU) -> list[dict[str, Any]]:
    """For every concept of either atlas (in the order first seen): ``concept``, and per side ``a_``/
    ``b_``: ``unit`` (the unit with the highest IoU with it), ``iou`` (that IoU) and ``units`` (how many
    units have IoU >= ``min_iou`` with it). A concept an atlas was not dissected with has None."""
    names = list(dict.fromkeys([*_concepts(a), *_concepts(b)]))
    rows = []
    for name in names:
        row: dict[str, Any] = {"concept": name}
        for side, atlas in (("a", a), ("b", b)):
            if name in _concepts(atlas):
                col = np.asarray(atlas.iou[:, atlas.concepts.index(name)], dtype=np.float64)
                best = int(np.argmax(col))
                row.update({f"{side}_unit": best, f"{side}_iou": float(col[best]),
                            f"{side}_units": int((col >= min_iou).sum())})
            else:
                row.update({f"{side}_unit": None, f"{side}_iou": None, f"{side}_units": None})
        rows.append(row)
    return rows


def detector_units(atlas, *, min_iou: float = MIN_LABEL_IOU) -> np.ndarray:
    """Ids of the units whose best concept IoU is at least ``min_iou`` (Network Dissection's detectors)."""
    if not atlas.concepts:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.asarray(atlas.iou).max(axis=1) >= min_iou)


def _quartiles(v: np.ndarray) -> dict[str, float | int | None]:
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "q25": None, "median": None, "q75": None, "mean": None}
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(v.size), "q25": float(q25), "median": float(med), "q75": float(q75), "mean": float(v.mean())}


def size_rows(atlas, name: str) -> list[dict[str, Any]]:
    """The mask-size distribution of one atlas as rows ``{model, measure, units, n, q25, median, q75,
    mean}``: ``roi_fraction`` (share of each unit's top-k gallery patches in its mask, Peck's ROI) and
    ``mask_fraction`` (share of all reference patches; None for an atlas dissected before it was
    stored), over all units and over the detector units (:func:`detector_units`)."""
    det = detector_units(atlas)
    rows = []
    for measure in ("roi_fraction", "mask_fraction"):
        v = getattr(atlas, measure)
        for which, idx in (("all", None), (f"detectors (IoU >= {MIN_LABEL_IOU:g})", det)):
            vals = None if v is None else (np.asarray(v) if idx is None else np.asarray(v)[idx])
            q = _quartiles(vals) if vals is not None else {"n": None, "q25": None, "median": None, "q75": None,
                                                           "mean": None}
            rows.append({"model": name, "measure": measure, "units": which, **q})
    return rows


def size_verdict(a, b, name_a: str, name_b: str) -> str:
    """One sentence answering Peck's question on these two atlases: whose units cover smaller
    regions (median ROI fraction over all units; "smaller" only when a one-sided Mann-Whitney U gives
    p < 0.05; the units of one model are not independent samples, so the p-value is descriptive)."""
    from scipy.stats import mannwhitneyu

    ra, rb = np.asarray(a.roi_fraction, np.float64), np.asarray(b.roi_fraction, np.float64)
    ma, mb = float(np.median(ra)), float(np.median(rb))
    if ma == mb:
        return f"Median ROI fraction equal ({ma:.3f}): neither model's units cover smaller regions."
    if ma < mb:
        small, big, ms, mbig, vs, vb = name_a, name_b, ma, mb, ra, rb
    else:
        small, big, ms, mbig, vs, vb = name_b, name_a, mb, ma, rb, ra
    p = float(mannwhitneyu(vs, vb, alternative="less").pvalue)
    test = f"one-sided Mann-Whitney U over units, p = {p:.2g}"
    if p < 0.05:
        return (f"{small}'s units cover smaller regions: median ROI fraction {ms:.3f} vs {mbig:.3f} for {big} "
                f"({test}).")
    return (f"No clear difference: {small}'s median ROI fraction is {ms:.3f} vs {mbig:.3f} for {big}, "
            f"but not significantly smaller ({test}).")


def coverage_rows(a, b) -> list[dict[str, Any]]:
    """Per class (of either atlas): DeepMiner's top-20 coverage in each (None: no patch predicted as the
    class, or no such class)."""
    classes = list(dict.fromkeys([*(a.classes if a else []), *(b.classes if b else [])]))
    rows = []
    for c in classes:
        row: dict[str, Any] = {"class": c}
        for side, atlas in (("a", a), ("b", b)):
            row[f"{side}_coverage"] = atlas.coverage(c) if atlas is not None and c in atlas.classes else None
            row[f"{side}_top"] = len(atlas.top_units(c)) if atlas is not None and c in atlas.classes else None
        rows.append(row)
    return rows


def same_references(a, b) -> bool:
    """Whether both atlases were dissected over the same reference set (same data folder name, split,
    number of patches): only then are their IoUs and sizes directly comparable."""
    da, db = a.meta.get("data", {}), b.meta.get("data", {})
    from pathlib import PurePath

    return (PurePath(str(da.get("folder", ""))).name == PurePath(str(db.get("folder", ""))).name
            and da.get("split") == db.get("split")
            and a.meta.get("counts", {}).get("references") == b.meta.get("counts", {}).get("references"))


__all__ = ["concept_rows", "coverage_rows", "detector_units", "model_column", "pair_problem",
           "same_references", "size_rows", "size_verdict"]
