"""Faithfulness of an explanation map: deletion and insertion curves (Petsiuk et al. 2018, RISE).

:func:`deletion_insertion` ranks the cells of a map on the CAM grid ``(h, w)`` (cell ``(i, j)``
covers rows ``[i*H/h, (i+1)*H/h)`` and columns ``[j*W/w, (j+1)*W/w)`` of the image, the engine's
convention) and perturbs the image cell by cell, most relevant first:

* **deletion** replaces the pixels of the most relevant cells by a blurred copy of the image and
  tracks the explained class's probability as it falls; a faithful map makes it fall fast (low AUC);
* **insertion** starts from the blurred image and puts back the original pixels of the most
  relevant cells; a faithful map makes the probability rise fast (high AUC).

**Progress is counted in breast area**, not in cells: step ``k`` of ``steps`` perturbs the ranked
cells that hold tissue, in order, until their cumulative tissue pixels reach ``k/steps`` of the
breast (the smallest such prefix). Cells holding no tissue are never perturbed, so a map cannot
score by pointing at the background. "The blurred image" is therefore the image with every
tissue-holding cell blurred (100% deletion = 0% insertion); cells without tissue keep their pixels.

**Fill**: a Gaussian blur for both curves. RISE inserts into a blurred copy but deletes to a
constant; we blur for both so the two curves share their end points (0% deletion = 100% insertion =
the original, 100% deletion = 0% insertion = the blurred image) and are comparable. A constant
(black) fill would also plant a sharp, out-of-distribution edge at every cell border, which a CNN
responds to. ``blur_sigma`` is in ORIGINAL pixels; the default is half a cell side
(``0.5 * max(H/h, W/w)``), strong enough to wipe out what lies inside a cell (calcifications,
spicules, a mass's margin) while keeping the local mean brightness. ``fill="constant"`` (the
image's median tissue value) is offered for RISE's deletion variant.

**Where the pixels are replaced**: on the model input, i.e. the image resized exactly as the
engine resizes it (:func:`deepminer.explain.method_base.prepare_image`); the blur there has sigma
``blur_sigma x scale`` model-input px and a cell is the model-input pixels of its box. For an image
that is not resized (``scale`` 1) this is exactly replacing original pixels; otherwise it differs
only within about one original pixel of a cell border (where the antialiased resize mixes the two
cells) and in that the blur follows the resize (the two nearly commute for ``sigma >> 1/scale``).
It keeps the cost to one blur of the model input instead of the full-resolution mammogram.

**Probability**: the explained class's image-level probability, the rule the product shows
(:func:`deepminer.explain.engine.image_probabilities`: a GAP model's most abnormal patch-sized
window, a WILDCAT model's own pooling), at ``0, 1/steps, ..., 1`` of the breast; AUC by the
trapezoid rule over the fractions in ``[0, 1]``.

**Cost**: at most ``2 * steps`` forward passes (20 for 10 steps): the 0% deletion and the 100%
insertion images are the original (one pass), the 100% deletion and the 0% insertion images are
the blurred image (one pass), and steps that perturb the same cells (one cell holding more than a
step of tissue) share a pass. The images go through the model in batches of at most
:data:`CHUNK`, under ``torch.inference_mode()``, in eval mode (restored after), on the model's
device. ``Faithfulness.forwards`` says how many images were passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepminer.errors import InputError
from deepminer.explain.engine import image_probabilities
from deepminer.explain.method_base import prepare_image
from deepminer.geometry import DEFAULT_MAX_SIDE
from deepminer.models.fcn import FCN

STEPS = 10  #: steps of breast area (10% each)
CHUNK = 8  #: most images per batched forward pass
BLUR_CELLS = 0.5  #: default blur sigma, in cell sides
FILLS = ("blur", "constant")


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion curves of one map for one image and one class.

    ``fractions`` ``[steps+1]``: breast fraction perturbed (0, 0.1, ..., 1); ``deletion`` /
    ``insertion`` ``[steps+1]``: the explained class's probability there; ``*_auc``: trapezoid
    areas over ``fractions``; ``forwards``: images passed through the model; ``cells`` ``[steps+1]``:
    ranked cells perturbed at each step; ``tissue_fraction`` ``[steps+1]``: breast fraction those
    cells actually hold (``>= fractions``); ``blur_sigma``: in original px.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: float
    insertion_auc: float
    forwards: int
    target: int
    cells: np.ndarray
    tissue_fraction: np.ndarray
    fill: str
    blur_sigma: float


def auc(fractions: Any, values: Any) -> float:
    """Trapezoid area under ``values`` over ``fractions``."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def cell_index(shape: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` int: the flat index ``i * w + j`` of the grid cell holding each pixel
    (row ``r`` is in cell ``floor(r * h / H)``, the engine's tiling)."""
    height, width = shape
    h, w = grid
    rows = (np.arange(height) * h) // height
    cols = (np.arange(width) * w) // width
    return rows[:, None] * w + cols[None, :]


def schedule(cell_map: Any, tissue: Any, steps: int = STEPS
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The perturbation order and how far each step goes.

    Returns ``(order, counts, achieved)``: ``order`` the flat indices of the cells holding tissue,
    by descending map value (ties: lower cell index first); ``counts[k]`` (``k = 0..steps``) the
    number of leading cells of ``order`` perturbed at step ``k``, the smallest prefix whose tissue
    pixels reach ``k/steps`` of the breast; ``achieved[k]`` the breast fraction that prefix holds.
    """
    values = np.asarray(cell_map, dtype=np.float64)
    mask = np.asarray(tissue, dtype=bool)
    if values.ndim != 2 or min(values.shape) < 1:
        raise InputError(f"cell_map: expected a 2-D (h, w) map, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise InputError("cell_map: contains NaN or infinite values")
    if mask.ndim != 2 or mask.shape[0] < values.shape[0] or mask.shape[1] < values.shape[1]:
        raise InputError(f"tissue: a {mask.shape} mask cannot hold a {values.shape} grid of cells")
    if steps < 1:
        raise InputError(f"steps: must be at least 1, got {steps}")
    h, w = values.shape
    per_cell = np.bincount(cell_index(mask.shape, (h, w))[mask], minlength=h * w)
    total = int(per_cell.sum())
    if total == 0:
        raise InputError("tissue: the mask holds no tissue pixel")
    ranked = np.argsort(-values.reshape(-1), kind="stable")  # ties: lower cell index first
    order = ranked[per_cell[ranked] > 0]
    cum = np.concatenate([[0], np.cumsum(per_cell[order])])  # tissue px of the first n cells
    # smallest n with cum[n] * steps >= k * total (integers: no rounding at the step boundaries)
    counts = np.searchsorted(cum * steps, np.arange(steps + 1) * total, side="left")
    return order, counts.astype(np.int64), cum[counts] / total


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` (mode ``reflect``, truncated at 4 sigma), float32."""
    from scipy import ndimage

    if sigma <= 0:
        return np.asarray(image, dtype=np.float32).copy()
    return ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma, mode="reflect")


def deletion_insertion(model: FCN, image: Any, cell_map: Any, target: int, tissue: Any, *,
                       steps: int = STEPS, max_side: int | None = DEFAULT_MAX_SIDE, input_side: int | None = None,
                       fill: str = "blur",
                       blur_sigma: float | None = None, patch_px: int | None = None) -> Faithfulness:
    """Deletion and insertion curves of ``cell_map`` for class ``target`` (module docstring).

    ``image`` ``(H, W)`` float in [0, 1]; ``cell_map`` ``(h, w)`` on the CAM grid (any real
    values, higher = more relevant); ``tissue`` ``(H, W)`` bool breast mask; ``fill`` ``blur``
    (Gaussian, ``blur_sigma`` original px, default half a cell side) or ``constant`` (the median of
    the image's tissue pixels); ``max_side`` (at most) or ``input_side`` (exactly: the model's scale) resizes as the engine does; ``patch_px`` the GAP
    window rule's patch side (default: the model's).
    """
    if fill not in FILLS:
        raise InputError(f"fill: unknown {fill!r}; known: {', '.join(FILLS)}")
    device = next(model.parameters()).device
    x, scale = prepare_image(image, max_side, device, input_side=input_side)  # validates image; (1, 1, hi, wi)
    height, width = np.shape(image)[:2]
    mask = np.asarray(tissue)
    if mask.shape != (height, width):
        raise InputError(f"tissue: shape {mask.shape} differs from the image's {(height, width)}")
    order, counts, achieved = schedule(cell_map, mask.astype(bool), steps)
    h, w = np.shape(cell_map)
    hi, wi = int(x.shape[-2]), int(x.shape[-1])
    target = int(target)
    if not 0 <= target < len(model.classes):
        raise InputError(f"target: class index {target} out of range 0..{len(model.classes) - 1}")

    # the fill, on the model input
    x_np = x[0, 0].float().cpu().numpy()
    if fill == "blur":
        sigma = float(blur_sigma) if blur_sigma is not None else BLUR_CELLS * max(height / h, width / w)
        if sigma < 0 or not np.isfinite(sigma):
            raise InputError(f"blur_sigma: must be a finite value >= 0, got {blur_sigma}")
        filled = torch.from_numpy(gaussian_blur(x_np, sigma * scale))
    else:
        sigma = 0.0
        pixels = np.asarray(image, dtype=np.float32)
        filled = torch.full((hi, wi), float(np.median(pixels[mask.astype(bool)])))
    filled = filled.to(device=device, dtype=x.dtype)

    # rank of each model-input pixel's cell in the perturbation order (cells off it: n_cells)
    n_cells = len(order)
    rank_of_cell = np.full(h * w, n_cells, dtype=np.int64)
    rank_of_cell[order] = np.arange(n_cells)
    rank = torch.from_numpy(rank_of_cell[cell_index((hi, wi), (h, w))]).to(device)

    # unique images: ("del", n) = first n cells filled; ("ins", n) = first n cells put back.
    # del 0 == ins N == original; del N == ins 0 == the filled image.
    def key(kind: str, n: int) -> tuple[str, int]:
        if (kind == "del" and n == 0) or (kind == "ins" and n == n_cells):
            return ("orig", 0)
        if (kind == "del" and n == n_cells) or (kind == "ins" and n == 0):
            return ("fill", 0)
        return (kind, n)

    wanted = [key("del", int(n)) for n in counts] + [key("ins", int(n)) for n in counts]
    unique = list(dict.fromkeys(wanted))

    def variant(k: tuple[str, int]) -> torch.Tensor:
        kind, n = k
        if kind == "orig":
            return x[0, 0]
        if kind == "fill":
            return torch.where(rank < n_cells, filled, x[0, 0])
        if kind == "del":
            return torch.where(rank < n, filled, x[0, 0])
        return torch.where((rank >= n) & (rank < n_cells), filled, x[0, 0])

    probs: dict[tuple[str, int], float] = {}
    # a whole-image model pools over the breast cells of the ORIGINAL image (a deleted cell is still breast)
    from deepminer.explain.engine import image_level
    from deepminer.models.fcn import breast_cells

    cells = breast_cells(x[:, :1], (h, w))[0] if image_level(model) is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(unique), CHUNK):
                keys = unique[start:start + CHUNK]
                batch = torch.stack([variant(k) for k in keys])[:, None]
                logits = model.class_logits(model.forward_features(batch))
                if tuple(logits.shape[-2:]) != (h, w):
                    raise InputError(f"cell_map: a {h}x{w} map, but the model's maps of this image "
                                     f"are {logits.shape[-2]}x{logits.shape[-1]} cells")
                for b, k in enumerate(keys):
                    p, _, _ = image_probabilities(model, logits[b:b + 1], (hi, wi), patch_px, cells)
                    probs[k] = float(p[target])
    finally:
        model.train(was_training)

    n_steps = steps + 1
    deletion = np.array([probs[k] for k in wanted[:n_steps]])
    insertion = np.array([probs[k] for k in wanted[n_steps:]])
    fractions = np.arange(n_steps) / steps
    return Faithfulness(fractions=fractions, deletion=deletion, insertion=insertion,
                        deletion_auc=auc(fractions, deletion), insertion_auc=auc(fractions, insertion),
                        forwards=len(unique), target=target, cells=counts, tissue_fraction=achieved,
                        fill=fill, blur_sigma=sigma)
