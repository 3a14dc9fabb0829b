"""Small builders the engine tests share: a seeded tiny model, a seeded random grey image, a
rectangular sketch."""
from __future__ import annotations

import numpy as np
import torch

from deepminer.models import build_model


def tiny_model(seed: int = 0):
    """The registry's ``tiny`` FCN (32 units, stride 16), random weights from ``seed``, eval mode."""
    torch.manual_seed(seed)
    return build_model("tiny", pretrained=False).eval()


def random_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A float32 grey image of uniform noise in [0, 1)."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def box_sketch(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    """A bool mask of ``shape``, True on ``[rows, cols]``."""
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask
