"""Image-level evaluation of a classifier (issue 21): one prediction per whole image of a dataset
folder, made the way the server makes it, and the image-level report
(:func:`deepminer.metrics.image_level_metrics`). Used by ``deepminer evaluate`` beside the patch
level (:mod:`deepminer.patch_eval`).

One image, as :meth:`deepminer.explain.service.ExplainService.explain` does it: decode
(:func:`deepminer.data.io.load_image`), keep the breast (:func:`deepminer.data.tissue.tissue_region`:
pixels outside the tissue mask set to 0), choose the model-input long side
(:func:`deepminer.model_scale.input_side`: an asked ``max_side``, else the folder's pixel spacing,
else the breast's extent, else the default), one forward pass (:func:`deepminer.explain.engine.explain_image`
with no unit maps), its ``probabilities``.

Silencing (``silence`` = N > 0, issue 21): on the same pass's unit maps, the ``N`` units most influential
on the predicted class (DeepMiner: max activation x weight, :meth:`deepminer.explanation.Explanation.ranked_units`)
set to zero and the head run again (:func:`deepminer.explain.engine.ablate_features`, what the server's
``ablate`` option answers), and how far the predicted class's probability fell. The report counts it on
the abnormal images (truth benign or malignant): does the model's answer rest on its top units, or is
it saturated (:func:`silencing_summary`)?
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.errors import InputError

SILENCE_MOVED = 0.05  #: a silencing "moves" the predicted class's probability when it falls by at least this (issue 21)


def image_rows(folder: str | os.PathLike, split: str = "test", limit: int | None = None) -> list[dict]:
    """The manifest rows of ``split`` (``all``: every row), in manifest order, the first ``limit``:
    the one selection of ``deepminer evaluate`` (image level) and ``evaluate-explanations``
    (:func:`deepminer.evaluation.context.split_rows`); one-line errors for an empty split."""
    from deepminer.data.dataset import read_manifest

    rows = [r for r in read_manifest(folder) if split == "all" or r["split"] == split]
    if not rows:
        raise InputError(f"{folder}: split {split!r} is empty (no image)")
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit: must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


def predict_pixels(model: Any, pixels: np.ndarray, *, max_side: int | None = None,
                   spacing_mm: float | None = None, tissue: bool = True, silence: int = 0) -> dict[str, Any]:
    """The whole-image prediction of one decoded grey image (float ``(H, W)`` in [0, 1]):
    ``{"probabilities" {class: p}, "prediction", "height", "width", "side", "side_rule",
    "tissue_fraction"}``; with ``silence`` = N > 0 also ``"silenced": {"units" (the N most influential
    on the prediction), "probability" (the prediction's after silencing them), "drop"}``."""
    from deepminer.data.tissue import tissue_region
    from deepminer.explain.cache import ExplanationCache
    from deepminer.explain.engine import explain_image
    from deepminer.model_scale import input_side

    if isinstance(silence, bool) or not isinstance(silence, (int, np.integer)) or silence < 0:
        raise InputError(f"silence: must be a whole number >= 0, got {silence!r}")
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    fraction, mask = None, None
    if tissue:
        pixels, fraction, mask = tissue_region(pixels)
    side, rule = input_side(model, h, w, max_side=max_side, spacing_mm=spacing_mm,
                            tissue=mask if fraction else None)
    cache = ExplanationCache() if silence else None  # the second call reuses the pass's unit maps
    exp = explain_image(model, pixels, max_side=max_side, input_side=(side, rule), unit_maps="none",
                        top_units=int(silence), cache=cache, cache_key="image" if cache else None)
    out: dict[str, Any] = {
        "probabilities": {c: float(p) for c, p in exp.probabilities.items()}, "prediction": exp.prediction,
        "height": h, "width": w, "side": int(side), "side_rule": rule,
        "tissue_fraction": None if fraction is None else round(float(fraction), 4)}
    if silence:
        units = exp.ranked_units(exp.prediction, int(silence))
        ab = explain_image(model, pixels, max_side=max_side, input_side=(side, rule), unit_maps="none",
                           top_units=0, cache=cache, cache_key="image", ablate=units).ablation
        if ab is None:  # only when no unit was ranked (a model without units)
            raise InputError("silence: the model has no units to silence")
        out["silenced"] = {"units": [int(u) for u in units], "probability": float(ab.probabilities[exp.prediction]),
                           "drop": -float(ab.delta[exp.prediction])}  # delta = after - before, per class
    return out


def predict_images(model: Any, folder: str | os.PathLike, split: str = "test", *, max_side: int | None = None,
                   limit: int | None = None, progress: bool = True, silence: int = 0) -> list[dict[str, Any]]:
    """One whole-image prediction per image of ``split`` (see the module docstring): per image
    ``{"image_id", "label", "y" (index of the label in model.classes), "probabilities" {class: p},
    "prediction", "height", "width", "side", "side_rule", "tissue_fraction", "seconds"}``.
    ``max_side``: the model-input long side at most this (None: the model's scale,
    :func:`deepminer.model_scale.input_side`); ``limit``: the first images only; ``silence``: see
    :func:`predict_pixels`."""
    from tqdm import tqdm

    from deepminer.data.dataset import pixel_spacing
    from deepminer.data.io import load_image

    rows = image_rows(folder, split, limit)
    classes = list(model.classes)
    missing = sorted({r["label"] for r in rows} - set(classes))
    if missing:
        raise InputError(f"{folder}: labels {', '.join(missing)} are not classes of the model ({', '.join(classes)})")
    out = []
    for row in tqdm(rows, desc="images", unit="img", disable=not progress, leave=False, file=sys.stderr):
        t0 = time.perf_counter()
        loaded = load_image(Path(folder) / row["image"])
        spacing = loaded.spacing_mm or pixel_spacing(folder, row)  # the file's own, else the folder's
        got = predict_pixels(model, loaded.pixels, max_side=max_side, spacing_mm=spacing, silence=silence)
        out.append({"image_id": row["image_id"], "label": row["label"], "y": classes.index(row["label"]), **got,
                    "seconds": round(time.perf_counter() - t0, 4)})
    return out


def probability_matrix(predictions: Sequence[dict[str, Any]], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(y (N,), probs (N, C))`` of :func:`predict_images`' answers (columns in ``classes`` order)."""
    y = np.array([list(classes).index(p["label"]) for p in predictions], dtype=int)
    probs = np.array([[p["probabilities"][c] for c in classes] for p in predictions], dtype=np.float64)
    return y, probs.reshape(len(predictions), len(classes))


def image_level_report(model: Any, folder: str | os.PathLike, split: str = "test", *, max_side: int | None = None,
                       limit: int | None = None, n_boot: int = 2000, seed: int = 0,
                       progress: bool = True, silence: int = 0) -> dict[str, Any]:
    """:func:`predict_images` and their :func:`deepminer.metrics.image_level_metrics`, plus how the
    input sides were chosen and the time: ``{"images", "max_side", "spacing_mm", "side_rules"
    {rule: n}, "sides" {"min", "max"}, "seconds", "seconds_per_image", "metrics", "predictions"}``;
    with ``silence`` = N > 0 also ``"silencing"`` (:func:`silencing_summary`)."""
    from deepminer.data.dataset import pixel_spacing
    from deepminer.metrics import image_level_metrics

    t0 = time.perf_counter()
    preds = predict_images(model, folder, split, max_side=max_side, limit=limit, progress=progress, silence=silence)
    seconds = time.perf_counter() - t0
    y, probs = probability_matrix(preds, model.classes)
    rules: dict[str, int] = {}
    for p in preds:
        rules[p["side_rule"]] = rules.get(p["side_rule"], 0) + 1
    sides = [p["side"] for p in preds]
    return {"images": len(preds), "max_side": max_side, "spacing_mm": pixel_spacing(folder),
            "side_rules": rules, "sides": {"min": min(sides), "max": max(sides)},
            "seconds": round(seconds, 2), "seconds_per_image": round(seconds / max(1, len(preds)), 3),
            "metrics": image_level_metrics(y, probs, list(model.classes), n_boot=n_boot, seed=seed),
            **({"silencing": silencing_summary(preds, model.classes, n_boot=n_boot, seed=seed)} if silence else {}),
            "predictions": preds}


def silencing_summary(predictions: Sequence[dict[str, Any]], classes: Sequence[str], *, n_boot: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """How far silencing the top units moved the answer (:func:`predict_pixels` with ``silence``), over
    the images whose truth is not ``classes[0]`` (normal): ``{"units" N, "images", "threshold"
    (:data:`SILENCE_MOVED`), "moved" (how many fell by >= it), "share" {"value", "lo", "hi"} (95%
    percentile bootstrap over images; no interval with ``n_boot`` 0), "median_drop", "drops"}``."""
    from deepminer.evaluation.stats import bootstrap_ci

    rows = [p for p in predictions if p["label"] != classes[0] and "silenced" in p]
    drops = np.array([p["silenced"]["drop"] for p in rows], dtype=np.float64)
    moved = drops >= SILENCE_MOVED
    share: dict[str, Any] = {"value": float(moved.mean()) if rows else None}
    if rows and n_boot:
        ci = bootstrap_ci(moved.astype(np.float64), n_resamples=n_boot, seed=seed)
        share.update(lo=ci.lo, hi=ci.hi)
    return {"units": len(rows[0]["silenced"]["units"]) if rows else 0, "images": len(rows),
            "threshold": SILENCE_MOVED, "moved": int(moved.sum()), "share": share,
            "median_drop": float(np.median(drops)) if rows else None,
            "drops": [round(float(d), 6) for d in drops]}


def format_silencing(summary: dict[str, Any], classes: Sequence[str]) -> str:
    """:func:`silencing_summary` as one line."""
    from deepminer.model_card import fmt_number

    if not summary["images"]:
        return f"silencing: no {'/'.join(classes[1:])} image to silence units on"
    sh = summary["share"]
    ci = f" [{sh['lo']:.0%}, {sh['hi']:.0%}]" if "lo" in sh else ""
    return (f"silencing the top {summary['units']} units of the predicted class (DeepMiner influence) on the "
            f"{summary['images']} {'/'.join(classes[1:])} images: its probability fell by >= {summary['threshold']:g} "
            f"on {summary['moved']} ({sh['value']:.0%}{ci}), median fall {fmt_number(summary['median_drop'])}")


def _ci(est: dict[str, Any] | None) -> str:
    from deepminer.model_card import fmt_interval

    return fmt_interval(est)


def format_metrics(metrics: dict[str, Any]) -> list[str]:
    """:func:`deepminer.metrics.image_level_metrics` as text lines: per class n and AUC [95% CI], the
    abnormal-vs-normal AUC, accuracy, ECE / NLL / Brier, the confusion matrix."""
    from deepminer.model_card import fmt_number

    classes = list(metrics["classes"])
    boot = metrics.get("bootstrap") or {}
    has_ci = bool(boot.get("resamples"))
    width = max(10, *(len(c) + 1 for c in classes))
    lines = [f"{'class':<{width}} {'n':>5} {'predicted':>9}  AUC" + (" [95% CI]" if has_ci else "")]
    for c in classes:
        lines.append(f"{c:<{width}} {metrics['counts'][c]:>5} {metrics['predicted_counts'][c]:>9}  "
                     f"{_ci(metrics['auc'][c])}")
    ab = metrics.get("abnormal_auc") or {}
    lines.append(f"abnormal vs normal AUC (score {ab.get('score', '1 - p(normal)')}): {_ci(ab)}")
    lines.append(f"accuracy ({len(classes)} classes, argmax): {_ci(metrics['accuracy'])}; "
                 f"ECE {_ci(metrics.get('ece_interval') or {'value': metrics.get('ece')})} "
                 f"(top-label, {len(metrics.get('reliability') or [])} bins); "
                 f"NLL {fmt_number(metrics.get('nll'))}; Brier {fmt_number(metrics.get('brier'))}")
    floor = metrics.get("ece_if_calibrated") or {}
    if floor.get("draws"):
        lines.append(f"ECE a perfectly calibrated model would show on these {metrics['n']} images: "
                     f"{fmt_number(floor.get('mean'))} on average, {fmt_number(floor.get('q95'))} at the 95th percentile "
                     f"({floor['draws']} draws; {fmt_number(floor.get('share_at_least'))} of them >= the measured ECE)")
    lines.append("confusion (rows = truth, columns = predicted):")
    lines.append(" " * width + " " + " ".join(f"{c:>{max(6, len(c))}}" for c in classes))
    for c, row in zip(classes, metrics["confusion"]):
        lines.append(f"{c:<{width}} " + " ".join(f"{int(v):>{max(6, len(k))}}" for v, k in zip(row, classes)))
    if has_ci:
        lines.append(f"[95% CI]: percentile bootstrap over images, {boot['resamples']} resamples, seed {boot['seed']}")
    return lines
