"""Explanations built from expert unit labels, free of any storage: labels come in as a plain
mapping ``unit id -> label`` (the labels store, the UI or a JSON file provide it).

* :func:`deepminer_explanation` (Wu et al., DeepMiner): the predicted class, its CAM, and the
  labelled units among its ``among`` (8) most influential units, at most ``max_units`` (5), with
  their maps and one sentence.
* :func:`label_report` (Lu & Perer): per label, the mean max activation of its units on this
  image and, when a sketch was given, the mean IoU of its units' masks with the sketch.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from deepminer.errors import InputError


def clean_labels(labels: Mapping[Any, Any], num_units: int) -> dict[int, str]:
    """``{unit: label}`` with int unit ids (JSON gives strings) and blank labels dropped."""
    out: dict[int, str] = {}
    for unit, label in labels.items():
        try:
            u = int(unit)
        except (TypeError, ValueError):
            raise InputError(f"labels: unit id {unit!r} is not a whole number") from None
        if not 0 <= u < num_units:
            raise InputError(f"labels: unit {u} out of range 0..{num_units - 1}")
        text = "" if label is None else " ".join(str(label).split())
        if text:
            out[u] = text
    return out


def deepminer_explanation(expl: Any, labels: Mapping[Any, Any], max_units: int = 5, among: int = 8) -> dict:
    """The DeepMiner explanation of ``expl`` (a :class:`~deepminer.explanation.Explanation`).

    Returns ``{"class", "probability", "cam" (h, w) raw CAM of the class, "units": [{"unit",
    "label", "rank" (1 = most influential), "influence", "max_activation", "map" (h, w) or None}],
    "sentence"}``; units in influence order, labels as given.
    """
    cls = expl.prediction
    c = expl.class_index(cls)
    p = float(expl.probabilities[cls])
    lab = clean_labels(labels, len(expl.unit_max))
    ranked = expl.ranked_units(cls, among)
    units: list[dict[str, Any]] = []
    for rank, u in enumerate(ranked, start=1):
        if u in lab and len(units) < max_units:
            units.append({
                "unit": u, "label": lab[u], "rank": rank,
                "influence": float(expl.influence[c, u]), "max_activation": float(expl.unit_max[u]),
                "map": np.asarray(expl.unit_maps[u], dtype=np.float32) if u in expl.unit_maps else None,
            })
    head = f"{cls.capitalize()} ({p:.2f})"
    if units:
        names = list(dict.fromkeys(x["label"] for x in units))
        sentence = f"{head}: most influenced by units labelled {', '.join(names)}."
    else:
        sentence = f"{head}: none of its {len(ranked)} most influential units is labelled yet."
    return {"class": cls, "probability": p, "cam": np.asarray(expl.cam[c], dtype=np.float32),
            "units": units, "sentence": sentence}


def label_report(expl: Any, labels: Mapping[Any, Any]) -> list[dict]:
    """Lu & Perer's report: ``[{"label", "units", "mean_max_activation", "mean_sketch_iou"}]``,
    one row per label, by descending mean max activation (``mean_sketch_iou`` None without a
    sketch)."""
    lab = clean_labels(labels, len(expl.unit_max))
    groups: dict[str, list[int]] = {}
    for u, label in sorted(lab.items()):
        groups.setdefault(label, []).append(u)
    rows: list[dict[str, Any]] = []
    for label, units in groups.items():
        idx = np.asarray(units)
        rows.append({
            "label": label, "units": units,
            "mean_max_activation": float(np.mean(expl.unit_max[idx], dtype=np.float64)),
            "mean_sketch_iou": None if expl.sketch_iou is None
            else float(np.mean(expl.sketch_iou[idx], dtype=np.float64)),
        })
    rows.sort(key=lambda r: (-r["mean_max_activation"], r["label"]))
    return rows
