"""Concept discovery: how well a unit atlas found the concepts planted in a data set with concept
masks (the phantoms), from the atlas's Network Dissection IoU alone (no forward pass).

:func:`concept_discovery` answers three questions:

* **per concept**: the unit with the highest IoU and that IoU (``argmax`` over units of the atlas's
  ``iou[:, c]``; ties: the lowest unit id; None when no unit overlaps the concept at all), and
  whether it reaches the atlas's ``min_label_iou`` (0.04, Network Dissection's detector cut-off,
  :data:`deepminer.defaults.MIN_LABEL_IOU`);
* **detected share**: the share of concepts with some unit at IoU >= ``min_label_iou``;
* **per class agreement**: among the class's top units (the atlas's DeepMiner ranking, 20 by
  default, :data:`deepminer.defaults.TOP_UNITS`) that carry a suggested label
  (:meth:`deepminer.atlas.Atlas.suggested_label`: the unit's best concept, when its IoU is at least
  ``min_label_iou``), the share whose suggested concept is one the phantom generator plants for that
  class (:func:`planted_concepts`). ``specific_agreement`` counts only concepts planted for that
  class and no other (``mass``, ``calcification`` and the round / oval / lobular shapes are drawn for
  both benign and malignant findings). A class with no labelled top unit has agreement None; normal
  images carry no finding, so every labelled top unit of ``normal`` disagrees.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np

from deepminer.defaults import MIN_LABEL_IOU, TOP_UNITS
from deepminer.errors import InputError

PLANTED_SOURCE = ("deepminer.data.phantoms: the generator's draw tables (BENIGN_SHAPES, BENIGN_MARGINS, "
                  "MALIGNANT_MARGINS, BENIGN_CALCS, MALIGNANT_CALCS, the calcification distributions) "
                  "through Finding.concepts(), by appearance (Finding.looks); normal images have no finding")


@lru_cache(maxsize=1)
def _planted() -> dict[str, frozenset[str]]:
    from deepminer import CLASSES
    from deepminer.data import phantoms as ph

    dist = ph._CALC_DISTRIBUTION  # the generator's calcification type -> distributions table
    findings = (
        # masses: benign-looking = benign shape + benign margin; malignant-looking = irregular or a
        # benign shape, with a malignant margin (phantom_findings._draw_finding)
        [ph.Finding("mass", "benign", 0.1, 0.5, 0.0, 0, shape=s, margin=m)
         for s in ph.BENIGN_SHAPES for m in ph.BENIGN_MARGINS]
        + [ph.Finding("mass", "malignant", 0.1, 0.5, 0.0, 0, shape=s, margin=m)
           for s in ("irregular", *ph.BENIGN_SHAPES) for m in ph.MALIGNANT_MARGINS]
        + [ph.Finding("calcification", "benign", 0.1, 0.5, 0.0, 0, calc_type=t, distribution=d)
           for t in ph.BENIGN_CALCS for d in dist[t]]
        + [ph.Finding("calcification", "malignant", 0.1, 0.5, 0.0, 0, calc_type=t, distribution=d)
           for t in ph.MALIGNANT_CALCS for d in dist[t]]
        + [ph.Finding("architectural_distortion", "malignant", 0.1, 0.5, 0.0, 0)]
    )
    out: dict[str, set[str]] = {c: set() for c in CLASSES}
    for f in findings:
        if f.looks != f.pathology:  # the tables above and the label rule disagree: a bug, not data
            raise AssertionError(f"phantoms: {f} is drawn as {f.pathology}-looking but looks {f.looks}")
        out[f.looks].update(f.concepts())
    return {c: frozenset(v) for c, v in out.items()}


def planted_concepts() -> dict[str, frozenset[str]]:
    """Class -> the concepts the phantom generator draws in images of that class (by appearance:
    ``overlap``'s mimic patients, 5% by default, are not counted). Derived from
    :mod:`deepminer.data.phantoms` (see :data:`PLANTED_SOURCE`): benign -> round / oval / lobular
    masses with circumscribed or obscured margins, coarse / rod-like / vascular / round calcifications
    (regional, segmental, linear or clustered), plus ``mass`` and ``calcification``; malignant ->
    irregular (or round / oval / lobular) masses with microlobulated, ill-defined or spiculated margins
    and ``spicules``, clustered fine pleomorphic or fine-linear branching calcifications, architectural
    distortion, plus ``mass`` and ``calcification``; normal -> none."""
    return dict(_planted())


def _min_iou(atlas) -> float:
    try:
        return float(atlas.meta["iou"]["min_label_iou"])
    except (KeyError, TypeError, ValueError):
        return MIN_LABEL_IOU


def concept_discovery(atlas, planted: dict[str, Iterable[str]] | None = None,
                      top: int = TOP_UNITS) -> dict[str, Any]:
    """Concept discovery of a unit atlas (:class:`deepminer.atlas.Atlas` or anything with its
    ``concepts``, ``classes``, ``iou``, ``meta["iou"]["min_label_iou"]``, ``num_units``,
    ``suggested_label(unit)`` and ``top_units(cls)``). ``planted``: class -> planted concepts
    (default :func:`planted_concepts`); ``top``: top units per class considered. Returns::

        {"min_label_iou": 0.04, "units": K,
         "concepts": {concept: {"unit": u (None if x == 0), "iou": x, "detected": x >= min_label_iou}},
         "detected_share": share of concepts detected, "detected": [names],
         "labelled_units": units with a suggested label (of all K),
         "labelled_concepts": distinct suggested concepts (Network Dissection's "unique detectors"),
         "classes": {cls: {"top_units": n, "labelled": k, "agreeing": j, "agreement": j / k or None,
                           "specific": i, "specific_agreement": i / k or None,
                           "labels": {unit: concept}, "planted": [names]}},
         "planted_source": where ``planted`` comes from}
    """
    concepts = list(atlas.concepts)
    if not concepts:
        raise InputError("concept discovery: the atlas has no concept IoU (its data set had no concept masks)")
    iou = np.asarray(atlas.iou, dtype=np.float64)
    if iou.ndim != 2 or iou.shape[1] != len(concepts) or iou.shape[0] == 0:
        raise InputError(f"concept discovery: atlas IoU has shape {iou.shape} for {len(concepts)} concepts")
    cut = _min_iou(atlas)
    best_units = np.argmax(iou, axis=0)
    per_concept = {}
    for j, name in enumerate(concepts):
        u = int(best_units[j])
        best = float(iou[u, j])
        per_concept[name] = {"unit": u if best > 0 else None, "iou": best, "detected": bool(best >= cut)}
    detected = [n for n, d in per_concept.items() if d["detected"]]

    source = PLANTED_SOURCE if planted is None else "given"
    plant = {c: frozenset(v) for c, v in (planted if planted is not None else planted_concepts()).items()}
    labels = {u: lab[0] for u in range(int(atlas.num_units)) if (lab := atlas.suggested_label(u)) is not None}

    classes: dict[str, dict[str, Any]] = {}
    for cls in atlas.classes:
        mine = plant.get(cls, frozenset())
        others = frozenset().union(*(v for c, v in plant.items() if c != cls))
        units = [int(u) for u in atlas.top_units(cls)][:top]
        lab = {u: labels[u] for u in units if u in labels}
        agreeing = sum(c in mine for c in lab.values())
        specific = sum(c in mine and c not in others for c in lab.values())
        k = len(lab)
        classes[cls] = {"top_units": len(units), "labelled": k, "agreeing": agreeing,
                        "agreement": agreeing / k if k else None, "specific": specific,
                        "specific_agreement": specific / k if k else None, "labels": lab,
                        "planted": sorted(mine)}
    return {"min_label_iou": cut, "units": int(atlas.num_units), "concepts": per_concept,
            "detected_share": len(detected) / len(concepts), "detected": detected,
            "labelled_units": len(labels), "labelled_concepts": len(set(labels.values())),
            "classes": classes, "planted_source": source}


__all__ = ["PLANTED_SOURCE", "concept_discovery", "planted_concepts"]
