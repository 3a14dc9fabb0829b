"""Units of the last convolutional layer as masks: quantile thresholds, upsampling, mask IoU.

The one place for these ideas (docs/architecture.md, "one home per idea"):

* **threshold** of unit k = the ``q`` quantile of its activations over a reference set
  (:data:`QUANTILE` 0.99 as Lu & Perer; :data:`QUANTILE_DISSECTION` 0.995 as Network Dissection);
  :func:`quantile_thresholds` is the pure function, :func:`unit_thresholds` feeds it from batches;
* **unit mask** = the unit map upsampled bilinearly (``align_corners=False``, PyTorch's
  ``F.interpolate``) to a size, ``> threshold`` (:func:`upsample_maps`, :func:`unit_masks`);
* the **sketch IoU** of every unit's mask with a sketch lives in :mod:`deepminer.explain.sketch`.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deepminer.defaults import QUANTILE



def as_cpu_tensor(a, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """CPU tensor of ``a`` (float16 widened to float32; ``dtype`` casts)."""
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
    else:
        arr = np.asarray(a)
        with warnings.catch_warnings():  # a read-only array is only ever read here
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if t.dtype == torch.float16:
        t = t.float()  # torch widens float16 several times faster than numpy
    return t if dtype is None else t.to(dtype)


def as_numpy(a, dtype) -> np.ndarray:
    """``a`` (numpy, torch on any device, or a list) as a numpy array of ``dtype``."""
    return np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=dtype)


# -- thresholds -----------------------------------------------------------------------------------

def quantile_thresholds(values, q: float = QUANTILE) -> np.ndarray:
    """Per-unit thresholds ``[K]``: the ``q`` quantile (linear interpolation) of ``values (N, K)``,
    N activation samples of each of K units."""
    v = as_numpy(values, np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"quantile_thresholds: values must be (N, K) with N > 0, got shape {v.shape}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile_thresholds: q must be in [0, 1], got {q}")
    return np.quantile(v, q, axis=0).astype(np.float32)


def unit_thresholds(batches: Iterable, q: float = QUANTILE, *, max_samples: int = 1_000_000,
                    seed: int = 0) -> np.ndarray:
    """Thresholds ``[K]`` from unit maps arriving in batches (``(B, K, h, w)`` or ``(K, h, w)``).

    Every position of every map is a sample of each unit; when the total would exceed
    ``max_samples`` per unit, each batch keeps a fixed-seed random subset of its positions in
    proportion, so memory stays bounded (the quantile is then estimated from that subset).
    """
    rng = np.random.default_rng(seed)
    chunks: list[np.ndarray] = []
    kept = 0
    for b in batches:
        a = as_numpy(b, np.float32)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise ValueError(f"unit_thresholds: expected (B, K, h, w) maps, got shape {a.shape}")
        samples = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])  # (B*h*w, K)
        room = max_samples - kept
        if room <= 0:
            continue
        if samples.shape[0] > room:
            samples = samples[np.sort(rng.choice(samples.shape[0], room, replace=False))]
        chunks.append(samples)
        kept += samples.shape[0]
    if not chunks:
        raise ValueError("unit_thresholds: no activation samples")
    return quantile_thresholds(np.concatenate(chunks), q)


# -- masks ----------------------------------------------------------------------------------------

def upsample_maps(maps, size: Sequence[int]) -> np.ndarray:
    """``(K, h, w)`` -> ``(K, H, W)`` bilinear, ``align_corners=False``; float64 (exact masks)."""
    m = as_cpu_tensor(maps)
    return F.interpolate(m[None], size=(int(size[0]), int(size[1])), mode="bilinear",
                         align_corners=False)[0].numpy()


def unit_masks(maps, thresholds, size: Sequence[int]) -> np.ndarray:
    """``(K, H, W)`` bool: each unit map upsampled to ``size`` and kept above its threshold."""
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1, 1, 1)
    return upsample_maps(maps, size) > t


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of one shape; 0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
