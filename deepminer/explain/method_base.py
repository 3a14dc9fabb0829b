"""The small base every saliency method shares (torchcam's layout): input preparation and
:class:`SaliencyMethod`, a context manager that owns the hooks a method
registers and the model's train/eval state, and always gives both back.

Each method is a short subclass in its own module (:mod:`.cam`, :mod:`.gradcam`,
:mod:`.attribution`); :func:`deepminer.explain.peers.saliency` is the one entry point.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepminer.errors import InputError
from deepminer.geometry import fit_size, side_size
from deepminer.models.fcn import FCN

MIN_SIDE = 16  # smallest model-input side accepted (px)


def as_image(image: Any, name: str = "image") -> torch.Tensor:
    """Validate a grey image ``(H, W)`` float in [0, 1] (numpy or torch) -> float32 CPU tensor."""
    t = image.detach() if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image))
    if t.ndim != 2:
        raise InputError(f"{name}: expected a 2-D (H, W) grey image, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        dtype = str(t.dtype).replace("torch.", "")
        raise InputError(f"{name}: expected float values in [0, 1], got dtype {dtype}")
    t = t.to("cpu", torch.float32)
    if t.numel() == 0:
        raise InputError(f"{name}: empty image")
    lo, hi = (float(v) for v in torch.aminmax(t))  # one pass; NaN/inf show up here
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{name}: contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name}: values must lie in [0, 1], got {lo:.4g}..{hi:.4g}")
    return t


def prepare_image(image: Any, max_side: int | None, device: torch.device | str = "cpu", *,
                  input_side: int | None = None) -> tuple[torch.Tensor, float]:
    """``(1, 1, h, w)`` model input on ``device`` (bilinear, antialiased resize so the long side
    is at most ``max_side``; or exactly ``input_side`` when given, enlarging too: the model's own
    scale, :func:`deepminer.model_scale.input_side`) and the scale (model-input px per original
    px, long side)."""
    return resize_image(as_image(image), max_side, device, input_side=input_side)


def resize_image(t: torch.Tensor, max_side: int | None, device: torch.device | str = "cpu", *,
                 input_side: int | None = None) -> tuple[torch.Tensor, float]:
    """:func:`prepare_image` for an image already checked by :func:`as_image`."""
    height, width = t.shape
    h, w = fit_size(height, width, max_side) if input_side is None else side_size(height, width, int(input_side))
    if min(h, w) < MIN_SIDE:
        raise InputError(f"image: {height}x{width} px gives a {h}x{w} model input; "
                         f"each side must be at least {MIN_SIDE} px")
    x = t[None, None].to(device)
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x, max(h, w) / max(height, width)


class SaliencyMethod:
    """Base of every saliency method: ``with Method(model) as m: raw = m(x, target)``.

    ``x`` is the prepared model input ``(1, 1, H, W)``; the result is a raw ``(h, w)`` map on the
    CAM's grid (the model's unit maps). Hooks registered through :meth:`hook` and the model's
    train/eval state are restored on exit, also when the method raises.
    """

    name = "base"

    def __init__(self, model: FCN):
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._was_training = model.training
        self.grid: tuple[int, int] | None = None  # (h, w) of the unit maps, seen by a hook
        model.eval()
        self.hook(model.features.register_forward_hook(self._see_grid))

    def _see_grid(self, _module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        self.grid = (int(out.shape[-2]), int(out.shape[-1]))

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        """Keep ``handle`` to be removed on exit."""
        self._handles.append(handle)

    def close(self) -> None:
        """Remove every hook and restore the model's train/eval state."""
        while self._handles:
            self._handles.pop().remove()
        self.model.train(self._was_training)

    def __enter__(self) -> "SaliencyMethod":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __call__(self, x: torch.Tensor, target: int | None) -> torch.Tensor:
        """Raw ``(h, w)`` map of class ``target`` (None: the class with the highest logit)."""
        raise NotImplementedError

    def target(self, x: torch.Tensor, target: int | None) -> int:
        """``target``, or the class with the highest image logit when None (one more forward)."""
        if target is not None:
            return int(target)
        with torch.inference_mode():
            return int(self.model(x)[0].argmax())

    def to_grid(self, attribution: torch.Tensor) -> torch.Tensor:
        """A pixel attribution ``(1, 1, H, W)`` -> ``(h, w)`` on the CAM grid: absolute value,
        averaged over the input pixels of each cell (adaptive average pooling)."""
        if self.grid is None:
            raise RuntimeError(f"{self.name}: the unit maps were never computed")
        return F.adaptive_avg_pool2d(attribution.detach().abs().sum(1, keepdim=True), self.grid)[0, 0]
