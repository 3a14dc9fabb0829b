"""What the pages compute, as plain functions of an :class:`~deepminer.explanation.Explanation` and arrays.

No Streamlit here: the pages call these and only lay out the answers, and the tests call them
directly. Math that belongs to the library (unit masks, IoU, thresholds, patch grid, tissue) is
imported from :mod:`deepminer`, never rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from deepminer.explain.sketch import MATCH_IOU
from deepminer.explanation import Explanation

#: how many suspicious patches the Explain page lists
SUSPICIOUS_TOP = 5
#: the sketch page lists this many units ranked by IoU
RANKED_TOP = 12


class ModelKey(NamedTuple):
    """What labels are keyed by: the model name and the sha256 of its weights."""

    name: str
    weights_hash: str

    @property
    def short(self) -> str:
        return f"{self.name} @ {self.weights_hash[:12]}"


@dataclass(frozen=True)
class Patch:
    """A window of the image: ``box`` = (x0, y0, x1, y1) in original pixels, x1/y1 exclusive."""

    box: tuple[int, int, int, int]
    score: float  #: the patch's malignant probability

    @property
    def name(self) -> str:
        x0, y0, x1, y1 = self.box
        return f"x {x0}-{x1}, y {y0}-{y1}"


def suspicious_patches(class_maps: np.ndarray, pixels: np.ndarray, classes: Sequence[str], *,
                       target: str = "malignant", top: int = SUSPICIOUS_TOP, min_tissue: float = 0.5,
                       shape: Sequence[int] | None = None) -> list[Patch]:
    """The patches of a whole image most likely to be ``target`` (Lu & Perer's suspicious patches).

    Windows follow DeepMiner's patch grid (:func:`deepminer.data.patches.patch_boxes`: side 25% of
    the width, stride 50% of the side) and keep those with at least ``min_tissue`` breast tissue.
    A patch's probability is what the FCN says for that patch alone: the softmax of its class
    logits averaged over the patch (the GAP head's pooling restricted to the window). The API
    sends per-cell probabilities ``p = softmax(z)``; ``log p = z - logsumexp(z)`` differs from the
    logits by a per-cell constant shared by all classes, so the softmax of the window mean of
    ``log p`` equals the softmax of the window mean of ``z`` exactly.

    ``pixels`` may be a scaled-down copy of the image when ``shape`` gives the image's ``(height,
    width)``: the boxes are in the image's pixels either way. The tissue mask is taken on a copy of
    at most :data:`deepminer.data.tissue.WORK_SIDE` pixels (where the mask works anyway), never on
    the full resolution.
    """
    import cv2

    from deepminer.data.patches import patch_boxes
    from deepminer.data.tissue import WORK_SIDE, tissue_mask
    from deepminer.geometry import fit_scale, fit_size
    from deepminer.overlay import resize_map

    h_img, w_img = (int(shape[0]), int(shape[1])) if shape is not None else pixels.shape[:2]
    boxes = patch_boxes(h_img, w_img)
    if len(boxes) < 2 or target not in classes:
        return []
    # work on a grid of at most 256 px: log-probabilities resized bilinearly, tissue by area
    f = fit_scale(h_img, w_img, 256)
    gh, gw = fit_size(h_img, w_img, 256)
    logp = np.log(np.clip(np.asarray(class_maps, dtype=np.float32), 1e-7, 1.0))
    logits = np.stack([resize_map(m, (gh, gw)) for m in logp])
    px = np.asarray(pixels, dtype=np.float32)
    th, tw = fit_size(px.shape[0], px.shape[1], WORK_SIDE, min_side=8)
    small = px if (th, tw) == px.shape[:2] else np.asarray(cv2.resize(px, (tw, th), interpolation=cv2.INTER_AREA))
    tissue = resize_map(tissue_mask(small).astype(np.float32), (gh, gw))
    c = list(classes).index(target)
    out = []
    for x0, y0, x1, y1 in boxes:
        gx0, gy0 = int(x0 * f), int(y0 * f)
        gx1, gy1 = max(gx0 + 1, int(round(x1 * f))), max(gy0 + 1, int(round(y1 * f)))
        if tissue[gy0:gy1, gx0:gx1].mean() < min_tissue:
            continue
        mean = logits[:, gy0:gy1, gx0:gx1].mean(axis=(1, 2)).astype(np.float64)
        p = np.exp(mean - mean.max())
        out.append(Patch((x0, y0, x1, y1), float(p[c] / p.sum())))
    out.sort(key=lambda p: -p.score)
    return out[:top]


def crop_png(pixels: np.ndarray, box: Sequence[int]) -> bytes:
    """The crop of a grey float image as a 16-bit PNG (what is sent to the model for a patch)."""
    from deepminer.data.io import png16_of_pixels

    x0, y0, x1, y1 = (int(v) for v in box)
    return png16_of_pixels(np.asarray(pixels)[y0:y1, x0:x1])


def canvas_mask(image_data: np.ndarray | None, shape: Sequence[int]) -> np.ndarray | None:
    """The sketch as a bool mask of ``shape`` from the canvas's RGBA drawing layer (anything drawn
    has alpha > 0); None when nothing is drawn."""
    from PIL import Image

    if image_data is None:
        return None
    rgba = np.asarray(image_data)
    if rgba.ndim != 3 or rgba.shape[2] < 4:
        return None
    drawn = rgba[:, :, 3] > 0
    if not drawn.any():
        return None
    h, w = int(shape[0]), int(shape[1])
    return np.asarray(Image.fromarray(drawn.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127


def rect_mask(shape: Sequence[int], box: Sequence[float]) -> np.ndarray:
    """A filled rectangle ``(x0, y0, x1, y1)`` as a bool mask (for tests and box queries)."""
    m = np.zeros((int(shape[0]), int(shape[1])), dtype=bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return m


@dataclass(frozen=True)
class RankedUnit:
    unit: int
    iou: float
    label: str
    matches: bool  #: IoU above :data:`MATCH_IOU`


def rank_by_iou(iou: np.ndarray, labels: Mapping[int, str], top: int = RANKED_TOP) -> list[RankedUnit]:
    """Units ranked by IoU with the sketch, best first (ties: lower unit id first)."""
    v = np.asarray(iou, dtype=np.float64)
    order = np.lexsort((np.arange(v.size), -v))[:top]
    return [RankedUnit(int(u), float(v[u]), labels.get(int(u), ""), bool(v[u] > MATCH_IOU)) for u in order]


def unit_mask_on(result: Explanation, unit: int, thresholds: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """The binarized response of ``unit`` on this image at ``shape`` (None: its map was not sent)."""
    from deepminer.explain.units import unit_masks

    m = result.unit_maps.get(int(unit))
    if m is None:
        return None
    return unit_masks(m[None], np.asarray(thresholds)[[int(unit)]], shape)[0]


def top_unit_rows(result: Explanation, cls: str, labels: Mapping[int, str]) -> list[dict]:
    """The most influential units for ``cls`` (as the server ranked them) with influence and label."""
    infl = result.influence_of(cls)
    return [{"unit": int(u), "influence": float(infl[u]), "max activation": float(result.unit_max[u]),
             "label": labels.get(int(u), "")}
            for u in result.top_units.get(cls, [])]


def survey_progress(top_units: Mapping[str, Iterable[int]], answered: Iterable[int]) -> tuple[int, int]:
    """(answered, total) over the distinct top units of all classes ("23 of 60 labelled")."""
    units = {int(u) for us in top_units.values() for u in us}
    return len(units & {int(u) for u in answered}), len(units)


def label_options(vocabulary: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Label choices for a dropdown: labels already used first, then the project's concepts, then every
    BI-RADS term in pydicom (CID 6004-6015), each once (case-insensitively)."""
    from deepminer.concepts import CONCEPTS, birads_terms

    seen: set[str] = set()
    out: list[str] = []
    for name in [*vocabulary, *extra, *(c.display for c in CONCEPTS), *(t[1] for t in birads_terms())]:
        key = " ".join(str(name).split()).casefold()
        if key and key not in seen:
            seen.add(key)
            out.append(str(name))
    return out


def trained_on_phantoms(model: Mapping | None) -> bool:
    """Whether the model says it was trained on synthetic phantoms (its ``trained_on``)."""
    t = str((model or {}).get("trained_on") or "").lower()
    return "phantom" in t or "synthetic" in t


def scale_note(result: Explanation) -> str:
    """The scale the image was explained at and how it was chosen, one line next to the prediction
    (:func:`deepminer.model_scale.describe_scale`)."""
    from deepminer.model_scale import describe_scale

    return describe_scale(result.input)[:1].upper() + describe_scale(result.input)[1:] + "."


def trained_on_note(model: Mapping | None) -> str:
    """What the model was trained on, said next to every prediction: a model trained on synthetic
    phantoms says plainly that its output on a real mammogram is not meaningful."""
    trained_on = str((model or {}).get("trained_on") or "").strip()
    if trained_on_phantoms(model):
        return ("Trained on synthetic phantoms only: on a real mammogram this output is not meaningful "
                "(a demonstration of the method, not a diagnosis).")
    if not trained_on or trained_on.startswith("not recorded"):
        return "What this model was trained on is not recorded: treat its output as unvalidated."
    return f"Trained on {trained_on}; not validated for diagnosis."


def domain_banner(model: Mapping | None, domain: Mapping | None) -> str | None:
    """The warning shown above one image's explanation when the image lies outside the model's
    training domain (``input.domain.in_domain`` false, :mod:`deepminer.domain`), worded from what
    the model was trained on; None when the image is in domain or the model has no domain summary."""
    if not domain or domain.get("in_domain", True):
        return None
    try:
        numbers = (f"(out-of-domain score {float(domain['score']):.4g} > threshold {float(domain['threshold']):.4g}, "
                   f"the {float(domain.get('percentile') or 0):g}th percentile of its validation images)")
    except (KeyError, TypeError, ValueError):
        numbers = ""
    trained_on = str((model or {}).get("trained_on") or "").strip()
    if trained_on_phantoms(model):
        why = "The model was trained on synthetic phantoms, so its output on this image is not meaningful."
    elif not trained_on or trained_on.startswith("not recorded"):
        why = "What the model was trained on is not recorded: do not rely on its output on this image."
    else:
        why = f"The model was trained on {trained_on}, so its output on this image is not reliable."
    return " ".join(f"Out of the model's domain: this image lies far from the images the model was trained on "
                    f"{numbers}. {why}".split())


def model_key(name: str, atlas_meta: Mapping | None, result_model: Mapping | None = None) -> ModelKey | None:
    """The key labels are stored under: the configured model ``name`` and the sha256 of its weights,
    taken from the explanation when the server sends one (``weights_sha256``), else from the atlas
    built for the model; None when neither knows it."""
    res = dict(result_model or {})
    atl = dict((atlas_meta or {}).get("model") or {})
    digest = res.get("weights_sha256") or res.get("weights_hash") or atl.get("weights_sha256")
    return ModelKey(str(name), str(digest)) if digest else None


def explanation(result: Explanation, labels: Mapping[int, str]) -> dict:
    """DeepMiner's explanation of ``result`` with the current ``labels`` (``sentence``, ``units``...):
    :func:`deepminer.explain.reports.deepminer_explanation`."""
    from deepminer.explain.reports import deepminer_explanation

    return deepminer_explanation(result, dict(labels))


def label_report_rows(result: Explanation, labels: Mapping[int, str],
                      sketch_result: Explanation | None = None) -> list[dict]:
    """Lu & Perer's two reports as rows ``{label, units, activation, iou}``: per label the mean max
    activation of its units on this image and, given an explanation with a sketch, their mean IoU
    with it (None without): :func:`deepminer.explain.label_report`."""
    from deepminer.explain.reports import label_report

    if not labels:
        return []
    rows = label_report(result, dict(labels))
    ious = {}
    if sketch_result is not None and sketch_result.sketch_iou is not None:
        ious = {r["label"]: r["mean_sketch_iou"] for r in label_report(sketch_result, dict(labels))}
    return [{"label": r["label"], "units": list(r["units"]), "activation": float(r["mean_max_activation"]),
             "iou": ious.get(r["label"])} for r in rows]


def matching_unit_ids(iou: np.ndarray, limit: int | None = None) -> list[int]:
    """The units whose IoU with the sketch is above :data:`MATCH_IOU`, best first, at most ``limit``
    (default: the ``ablate`` option's maximum, :data:`deepminer.options.MAX_ABLATE`)."""
    from deepminer.options import MAX_ABLATE

    v = np.asarray(iou, dtype=np.float64)
    return [r.unit for r in rank_by_iou(v, {}, top=v.size) if r.matches][:MAX_ABLATE if limit is None else limit]


def units_with_label(labels: Mapping[int, str], label: str) -> list[int]:
    """The unit ids that carry ``label`` (the user's labels for this model), ascending."""
    return sorted(int(u) for u, v in labels.items() if v == label)


def ablation_rows(result: Explanation) -> list[dict]:
    """The ``ablate`` answer of ``result`` as rows ``{class, before, after, change}`` (probabilities;
    change = after - before); empty when it carries none."""
    ab = result.ablation
    if ab is None:
        return []
    return [{"class": c, "before": round(float(result.probabilities[c]), 4),
             "after": round(float(ab.probabilities[c]), 4), "change": round(float(ab.delta[c]), 4)}
            for c in result.classes]


def job_progress(row: Mapping[str, Any] | None, waited_s: float = 0.0) -> tuple[float, str]:
    """``(fraction, words)`` of a long job's row (:meth:`deepminer.jobs.JobStore.get`) for a progress
    bar: its method, steps done of all and seconds so far; no row yet: sent, ``waited_s`` ago."""
    if not row:
        return 0.0, f"Sent to the model server · {waited_s:.0f} s"
    if row.get("state") == "queued":
        return 0.0, f"Waiting for the model server (another long job runs) · {row.get('elapsed_s', 0):.0f} s"
    step = str(row.get("step") or "")
    names = {"explain": "the explanation pass", "integrated_gradients": "integrated gradients",
             "smoothgrad": "SmoothGrad", "guided_backprop": "guided backprop", "gradcam": "Grad-CAM",
             "gradcam++": "Grad-CAM++"}
    done, total = int(row.get("done") or 0), int(row.get("total") or 0)
    return (float(row.get("fraction") or 0.0),
            f"{names.get(step, step) or 'Working'} · step {done} of {total} · {row.get('elapsed_s', 0):.0f} s")
