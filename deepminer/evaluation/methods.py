"""The explanation methods an evaluation compares, each as a map on the CAM grid ``(h, w)``.

One explanation pass (:func:`deepminer.explain.engine.explain_image`) gives three of them for the
cost of a forward: ``cam`` (GAP head: FC weights x unit maps), ``class_map`` (the per-cell
probability of the explained class) and ``top_units`` (the union of the masks of the explained
class's most influential units, on the cell grid: a cell is in when any of those units exceeds its
threshold there). ``wildcat`` is the head's own class map when the model has a WILDCAT head (it
replaces ``cam``, which such a model does not have). The post-hoc peers (``gradcam``, ``gradcam++``,
``guided_backprop``, ``integrated_gradients``, ``smoothgrad``) come from
:func:`deepminer.explain.peers.saliency` on the same grid. Two baselines that every honest table
needs: ``random`` (uniform noise, seeded per image) and ``tissue_prior`` (the breast mask blurred:
a map that knows where the breast is and nothing else).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepminer.defaults import INFLUENCE_TOP, QUANTILE
from deepminer.evaluation.catalog import ALL_METHODS, BASELINES, ONE_PASS
from deepminer.errors import InputError
from deepminer.explanation import Explanation

TISSUE_PRIOR_SIGMA = 0.05  #: blur of the tissue prior, as a fraction of the image's long side
PRIOR_WORK_SIDE = 128  #: long side (px) the tissue prior is blurred at


def available_methods(model: Any) -> list[str]:
    """The methods that exist for ``model``: ``cam`` for a GAP head, ``wildcat`` for a WILDCAT head."""
    wildcat = getattr(model, "head_type", "gap") == "wildcat"
    return [m for m in ALL_METHODS if not (m == "cam" and wildcat) and not (m == "wildcat" and not wildcat)]


def resolve_methods(model: Any, names: Sequence[str] | None) -> list[str]:
    """``names`` checked against :data:`ALL_METHODS` and what ``model`` has (None: all it has), the
    baselines (:data:`BASELINES`) always added: every table carries its floor. A one-line error lists
    the known ones."""
    have = available_methods(model)
    if not names:
        return have
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown:
        raise InputError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(ALL_METHODS)}")
    missing = [n for n in names if n not in have]
    if missing:
        raise InputError(f"--methods: {', '.join(missing)} not available for a {model.head_type} head "
                         f"(available: {', '.join(have)})")
    return list(dict.fromkeys([*names, *BASELINES]))


def reference_method(methods: Sequence[str]) -> str:
    """The method every other is compared with (paired differences): CAM, else WILDCAT's map."""
    for m in ("cam", "wildcat"):
        if m in methods:
            return m
    return methods[0]


def top_units_map(exp: Explanation, target: int, thresholds: np.ndarray | None, k: int = INFLUENCE_TOP) -> np.ndarray:
    """Union of the masks of the ``k`` most influential units of class ``target`` on the cell grid:
    1 where any of them exceeds its threshold (the atlas's, else its :data:`QUANTILE` over this
    image's cells), else 0."""
    units = [u for u in exp.ranked_units(target, k) if u in exp.unit_maps]
    out = np.zeros(exp.map_size, np.float32)
    for u in units:
        m = np.asarray(exp.unit_maps[u], dtype=np.float32)
        thr = float(thresholds[u]) if thresholds is not None else float(np.quantile(m, QUANTILE))
        out = np.maximum(out, (m > thr).astype(np.float32))
    return out


def tissue_prior_map(tissue: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The breast mask blurred (Gaussian, sigma :data:`TISSUE_PRIOR_SIGMA` x the long side) and
    averaged over each cell of the grid.

    The blur runs on the mask area-averaged to at most :data:`PRIOR_WORK_SIDE` px (sigma scaled
    with it; border: reflect, SciPy's default): a blur this wide is smooth at that resolution, so
    the cell means differ from blurring every original pixel by < 0.005 (tested against SciPy's
    ``gaussian_filter`` at full resolution) for ~1/20 of the cost (a full-resolution kernel grows with
    the image: 8 ms at 512 px, 0.4 ms at the working side)."""
    import cv2

    from deepminer.geometry import fit_size

    h, w = tissue.shape
    sh, sw = fit_size(h, w, PRIOR_WORK_SIDE)
    small: np.ndarray = tissue.astype(np.float32)
    if (sh, sw) != (h, w):
        small = cv2.resize(small, (sw, sh), interpolation=cv2.INTER_AREA)
    sigma = TISSUE_PRIOR_SIGMA * max(sh, sw)
    blurred = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(blurred, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)


def random_map(grid: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(grid).astype(np.float32)


def one_pass_map(method: str, exp: Explanation, target: int, thresholds: np.ndarray | None) -> np.ndarray:
    """``cam``/``wildcat`` (the engine's ``cam``), ``class_map`` or ``top_units`` of ``target``."""
    if method in ("cam", "wildcat"):
        return np.asarray(exp.cam[target], dtype=np.float32)
    if method == "class_map":
        return np.asarray(exp.class_maps[target], dtype=np.float32)
    if method == "top_units":
        return top_units_map(exp, target, thresholds)
    raise InputError(f"not a one-pass method: {method}")


def method_map(method: str, model: Any, pixels: np.ndarray, tissue: np.ndarray, exp: Explanation, target: int,
               *, thresholds: np.ndarray | None, seed: int, max_side: int | None,
               input_side: int | None = None) -> np.ndarray:
    """The ``(h, w)`` map of ``method`` for class ``target`` on ``exp``'s grid (a gradient method's
    input resized as ``exp``'s was: long side at most ``max_side``, or exactly ``input_side``)."""
    if method in ONE_PASS:
        return one_pass_map(method, exp, target, thresholds)
    if method == "random":
        return random_map(exp.map_size, seed)
    if method == "tissue_prior":
        return tissue_prior_map(tissue, exp.map_size)
    from deepminer.explain.peers import saliency

    m = saliency(model, pixels, method, target, max_side=max_side, input_side=input_side)
    if m.shape != exp.map_size:
        raise InputError(f"{method}: map {m.shape} is not on the CAM grid {exp.map_size}")
    return m
