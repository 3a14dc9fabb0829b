"""Mask images (lesion masks, concept masks, an outline uploaded on the Evaluate page): the one reader.

A mask is an image PIL reads (PNG, TIFF...): grey as it is, an RGBA image by its alpha, an RGB image
by its brightest channel; a pixel is inside where its value is above 0. Lesion masks of a dataset
folder hold 1 (benign) and 2 (malignant) (docs/data.md): :func:`read_mask` keeps the values (the
patch table needs them), :func:`read_lesion` gives the bool mask the metrics score against.
``deepminer evaluate-explanations``, the patch table, dissection and the Evaluate page all read masks
here.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepminer.errors import InputError

Source = bytes | str | os.PathLike[str]


def mask_values(image: np.ndarray) -> np.ndarray:
    """The 2-D values of a decoded mask image: grey as it is, RGBA its alpha, RGB the brightest channel."""
    m = np.asarray(image)
    if m.ndim == 3:
        m = m[:, :, 3] if m.shape[2] == 4 else m.max(axis=2)
    return m


def fit_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``mask`` (any 2-D or image array; see :func:`mask_values`) as a bool ``shape`` mask, resized
    nearest when its size differs."""
    from PIL import Image

    on = mask_values(mask) > 0
    h, w = int(shape[0]), int(shape[1])
    if on.shape != (h, w):
        on = np.asarray(Image.fromarray(on.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
    return on


def read_mask(source: Source, shape: Sequence[int] | None = None, *, name: str | None = None) -> np.ndarray:
    """The values of a mask file (a path, or its bytes), 2-D (:func:`mask_values`); a one-line
    :class:`InputError` naming ``name`` (default: the path; ``the mask`` for bytes) when it is missing
    or not an image, or when ``shape`` is given and the mask's size differs from it."""
    from PIL import Image

    opened: io.BytesIO | Path
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, opened = name or "the mask", io.BytesIO(bytes(source))
    else:
        label, opened = name or str(source), Path(source)
        if not opened.is_file():
            raise InputError(f"{label}: no such mask file")
    try:
        with Image.open(opened) as im:
            im.load()
            values = mask_values(np.asarray(im))
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a broken file
        raise InputError(f"{label}: not an image ({type(err).__name__})") from None
    if shape is not None and values.shape != (int(shape[0]), int(shape[1])):
        raise InputError(f"{label}: mask is {values.shape[1]}x{values.shape[0]}; it differs from its image "
                         f"{int(shape[1])}x{int(shape[0])} (width x height)")
    return values


def read_lesion(source: Source, shape: Sequence[int], *, resize: bool = False, name: str | None = None) -> np.ndarray:
    """A mask file as a bool ``shape`` mask (lesion: value above 0). ``resize``: a mask of another size
    is resized (nearest; an outline uploaded for a preview); else that size is a one-line error."""
    values = read_mask(source, None if resize else shape, name=name)
    return fit_mask(values, shape)
