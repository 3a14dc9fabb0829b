"""Image geometry shared by the engine, the tissue mask, the sketch IoU, the CLI and the workbench.

One formula, one place: fitting an image so its long side is at most some number of pixels
(:func:`fit_scale`, :func:`fit_size`), and shrinking an image array to it (:func:`fit_image`). No
torch here (the workbench and the CLI import it without the model stack).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MAX_SIDE_RANGE = (64, 4096)  #: the long sides an image may be explained at (the ``max_side`` option)
DEFAULT_MAX_SIDE = 1024      #: the long side an image is explained at when nobody says otherwise


def fit_scale(height: int, width: int, max_side: int | None) -> float:
    """The factor (<= 1) that brings the long side of ``height x width`` to at most ``max_side``
    (None: 1, unchanged); images are never enlarged."""
    if max_side is None or max(height, width) <= max_side:
        return 1.0
    return max_side / max(height, width)


def fit_size(height: int, width: int, max_side: int | None, *, min_side: int = 1) -> tuple[int, int]:
    """``(height, width)`` scaled by :func:`fit_scale` (aspect kept, rounded, each side at least
    ``min_side``); unchanged when it already fits."""
    f = fit_scale(height, width, max_side)
    if f == 1.0:
        return int(height), int(width)
    return max(min_side, round(height * f)), max(min_side, round(width * f))


def side_size(height: int, width: int, side: int, *, min_side: int = 1) -> tuple[int, int]:
    """``(height, width)`` scaled so the long side is exactly ``side`` (aspect kept, rounded, each
    side at least ``min_side``): enlarged too, unlike :func:`fit_size` (a model's own scale,
    :func:`deepminer.model_scale.input_side`)."""
    long = max(height, width)
    if long == side:
        return int(height), int(width)
    f = side / long
    return max(min_side, round(height * f)), max(min_side, round(width * f))


def fit_image(img: np.ndarray, max_side: int | None, *, reduce_first: bool = False) -> np.ndarray:
    """``img`` (grey float, or uint8 grey/RGB) scaled down by area (PIL's BOX filter) to
    :func:`fit_size` so its long side is at most ``max_side``; never enlarged (the array itself when
    it fits). Float images come back float32. ``reduce_first``: an integer box reduction first, then
    BOX for the rest (about the same mean, several times cheaper on a 13.5 MP image; the values
    differ slightly from one BOX resize where the ratio is not an integer)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img)
    h, w = a.shape[:2]
    nh, nw = fit_size(h, w, max_side)
    if (nh, nw) == (h, w):
        return a
    im = Image.fromarray(a) if a.dtype == np.uint8 else Image.fromarray(a.astype(np.float32), mode="F")
    factor = min(h // nh, w // nw)
    if reduce_first and factor >= 2:
        im = im.reduce(factor)
    return np.asarray(im.resize((nw, nh), Image.Resampling.BOX))
