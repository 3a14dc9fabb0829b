"""Overlays of maps on images, shared by the CLI (``deepminer explain --out``) and the workbench.

Pure numpy/Pillow: images are ``uint8`` RGB ``(H, W, 3)``; grey inputs are float ``[0, 1]``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Grey float ``(H, W)`` in [0, 1] (or uint8 grey/RGB) -> uint8 RGB."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return a[:, :, :3]


def resize_map(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A float map ``(h, w)`` resized (bilinear) to ``shape`` ``(H, W)``."""
    v = np.asarray(values, dtype=np.float32)
    if v.shape == tuple(shape[:2]):
        return v
    return np.asarray(Image.fromarray(v, mode="F").resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR))


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def colorize(values: np.ndarray, *, vmin: float | None = None, vmax: float | None = None,
             cmap: str = "jet") -> np.ndarray:
    """A float map -> uint8 RGB through ``cmap``, scaled to ``[vmin, vmax]`` (default: its range)."""
    v = np.asarray(values, dtype=np.float32)
    lo = float(np.nanmin(v)) if vmin is None else vmin
    hi = float(np.nanmax(v)) if vmax is None else vmax
    norm = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
    idx = (np.clip(np.nan_to_num(norm), 0, 1) * 255).astype(np.uint8)
    return _lut(cmap)[idx]


def heat_overlay(base: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45, vmin: float | None = None,
                 vmax: float | None = None, cmap: str = "jet") -> np.ndarray:
    """``heat`` (any size, resized bilinearly) blended over ``base`` (grey float or RGB)."""
    rgb = to_rgb(base)
    h = resize_map(heat, rgb.shape[:2])
    col = colorize(h, vmin=vmin, vmax=vmax, cmap=cmap).astype(np.float32)
    return (rgb.astype(np.float32) * (1 - alpha) + col * alpha + 0.5).astype(np.uint8)
