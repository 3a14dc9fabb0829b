"""Peer saliency for comparison, behind one interface with CAM's output shape.

``saliency(model, image, method)`` -> ``(h, w)`` float32 in [0, 1]: every method's map is on the
CAM's grid (the unit maps' ``h x w`` cells, which tile the original image as described in
:mod:`deepminer.explain.engine`) and min-max normalised like torchcam's CAM. Grad-CAM/Grad-CAM++
are computed there by pytorch-grad-cam; the pixel attributions of captum (Guided Backprop,
Integrated Gradients, SmoothGrad) are brought there by averaging their absolute value over each
cell's pixels. Every method runs as a context manager that removes its hooks, also on error.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from deepminer.errors import InputError
from deepminer.explain.attribution import GuidedBackprop, IntegratedGradients, SmoothGrad
from deepminer.explain.cam import CAM
from deepminer.explain.gradcam import GradCAM, GradCAMPlusPlus
from deepminer.explain.method_base import SaliencyMethod, prepare_image
from deepminer.explanation import class_index, normalize_map
from deepminer.models.fcn import FCN

METHODS: dict[str, type[SaliencyMethod]] = {
    m.name: m for m in (CAM, GradCAM, GradCAMPlusPlus, GuidedBackprop, IntegratedGradients, SmoothGrad)
}


def saliency(model: FCN, image: Any, method: str = "cam", target_class: int | str | None = None,
             *, max_side: int | None = 1024, input_side: int | None = None, **options: Any) -> np.ndarray:
    """The ``method`` map ``(h, w)`` of ``target_class`` (index or name; None: the class with the
    highest image logit, the output the gradient methods explain) for a grey image ``(H, W)`` in
    [0, 1], resized as :func:`~deepminer.explain.engine.explain_image` does (long side at most
    ``max_side``, or exactly ``input_side``: the model's scale). ``options`` go to the
    method (e.g. ``steps`` for integrated_gradients, ``samples``/``noise`` for smoothgrad)."""
    if method not in METHODS:
        raise InputError(f"method: unknown {method!r}; known: {', '.join(METHODS)}")
    x, _ = prepare_image(image, max_side, next(model.parameters()).device, input_side=input_side)
    target = None if target_class is None else class_index(model.classes, target_class, what="target_class")
    with METHODS[method](model, **options) as m:
        return normalize_map(m(x, target))


