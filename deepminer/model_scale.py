"""The scale a model works at, and bringing an image to it (issue 21).

A whole-image model (``deepminer train-whole``) records in its checkpoint ``meta["scale"]``::

    {"long_side": 512,           # model-input long side of a training phantom (px)
     "mm_per_px": 0.46875,       # the physical size of one model-input pixel at that scale
     "breast_extent_px": 290.1}  # median breast extent (:func:`breast_extent`) of the training
                                 # images at that scale, in model-input px

An image is brought to that scale, in this order of preference (:func:`input_side`):

1. ``max_side`` asked by the caller: its long side fitted to at most that (the old behaviour);
2. the image's pixel spacing (DICOM Pixel Spacing / Imager Pixel Spacing or a PNG text chunk
   ``PixelSpacing``: :attr:`deepminer.data.io.LoadedImage.spacing_mm`; a dataset folder's:
   :func:`deepminer.data.dataset.pixel_spacing`): resized by ``spacing_mm / mm_per_px``;
3. the breast's extent (the tissue mask): resized so its extent matches the training median, but to
   at most :data:`EXTENT_MAX_FACTOR` x the model's ``long_side`` (a breast that small for its
   image is not one the rule can trust: noise, a photograph's specks; enlarging it further costs
   memory quadratically: the guard's test judged a noise image at 4096 px with about 4 GB more than
   at 2048);
4. neither: the model's ``long_side``;

and a model without a recorded scale: at most :data:`~deepminer.geometry.DEFAULT_MAX_SIDE` as before.
The engine takes the result as ``explain_image(..., input_side=(side, how))`` (an exact long side,
enlarging too); ``how`` comes back as ``input.scale_source`` (:func:`describe_scale` says it in words).

Recording a scale (the training side): ``long_side`` = the model-input long side of the training
images, ``mm_per_px`` = their :func:`phantom_spacing_mm` (or DICOM spacing) x original long side /
``long_side``, ``breast_extent_px`` = the median :func:`breast_extent` of their tissue masks
(:func:`deepminer.data.tissue.tissue_mask`) x ``long_side`` / original long side.

Torch-free (the CLI and the workbench import it).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from deepminer.geometry import DEFAULT_MAX_SIDE, MAX_SIDE_RANGE

#: the physical height (mm) of a phantom of any generator size: a phantom of ``size`` px high has a
#: pixel spacing of ``PHANTOM_HEIGHT_MM / size`` mm (a 24 x 30 cm detector's long side is 300 mm; the
#: phantoms are drawn a little smaller)
PHANTOM_HEIGHT_MM = 240.0


def phantom_spacing_mm(size: int) -> float:
    """The pixel spacing (mm) of a phantom ``size`` px high."""
    return PHANTOM_HEIGHT_MM / float(size)


def model_scale(model_or_meta: Any) -> dict | None:
    """The ``meta["scale"]`` of a model (or of a checkpoint's meta dict), or None when not recorded."""
    meta = model_or_meta if isinstance(model_or_meta, dict) else (getattr(model_or_meta, "meta", None) or {})
    scale = meta.get("scale")
    return dict(scale) if isinstance(scale, dict) and scale.get("long_side") else None


EXTENT_MAX_FACTOR = 2.0  #: the breast-extent rule enlarges to at most this x the model's long side


def breast_extent(mask: np.ndarray) -> float:
    """The breast's extent (px) in a boolean tissue mask: the square root of its area (0 when empty).
    Less sensitive to the view and to the chest-wall cut than a bounding box."""
    return float(math.sqrt(float(np.count_nonzero(mask))))


def _clamp(side: float) -> int:
    return int(min(MAX_SIDE_RANGE[1], max(MAX_SIDE_RANGE[0], round(side))))


def input_side(model_or_meta: Any, height: int, width: int, *, max_side: int | None = None,
               spacing_mm: float | None = None, tissue: np.ndarray | None = None) -> tuple[int, str]:
    """``(long side of the model input, how it was chosen)`` for an image of ``height x width``.

    See the module docstring for the order. The long side may be larger than the image's (a small
    image is enlarged to the model's scale) except for an asked ``max_side``, which only shrinks.
    """
    long = max(int(height), int(width))
    if max_side is not None:
        return min(long, int(max_side)), f"asked: long side at most {int(max_side)} px"
    scale = model_scale(model_or_meta)
    if scale is None:
        return min(long, DEFAULT_MAX_SIDE), f"default: long side at most {DEFAULT_MAX_SIDE} px (the model records no scale)"
    mm = scale.get("mm_per_px")
    if spacing_mm is not None and mm and float(spacing_mm) > 0:
        return _clamp(long * float(spacing_mm) / float(mm)), f"pixel spacing {float(spacing_mm):.4g} mm -> {float(mm):.4g} mm/px"
    target = scale.get("breast_extent_px")
    if tissue is not None and target:
        ext = breast_extent(tissue)
        if ext > 0:
            side = long * float(target) / ext
            cap = EXTENT_MAX_FACTOR * float(scale["long_side"])
            if side > cap:
                return _clamp(cap), (f"breast extent, capped at {EXTENT_MAX_FACTOR:g} x the model's long side "
                                     "(the breast found is small for the image)")
            return _clamp(side), "breast extent"
    return _clamp(float(scale["long_side"])), f"model long side {int(scale['long_side'])} px (no spacing, no breast found)"


def describe_scale(inp: dict) -> str:
    """One line on the scale an explanation's ``input`` was computed at, for the CLI and the workbench:
    ``"explained at 409 x 241 px (breast extent; the model's scale: long side 512 px)"``."""
    side = f"{inp.get('model_height', '?')} x {inp.get('model_width', '?')} px"
    how = inp.get("scale_source") or "not recorded"
    ms = inp.get("model_scale")
    if isinstance(ms, dict) and ms.get("long_side"):
        own = f"; the model's scale: long side {int(ms['long_side'])} px"
    else:
        own = "" if "records no scale" in how else "; the model records no scale"
    return f"explained at {side} ({how}{own})"
