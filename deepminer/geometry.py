"""Image geometry shared by the engine, the tissue mask, the sketch IoU, the CLI and the workbench.

One formula, one place: fitting an image so its long side is at most some number of pixels. No
torch here (the workbench and the CLI import it without the model stack).
"""
from __future__ import annotations

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
