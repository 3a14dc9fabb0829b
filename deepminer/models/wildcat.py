"""The WILDCAT head (Durand et al. 2017; used as a trainable saliency head by Aggarwal et al.).

A 1x1 convolution gives ``M`` maps per class (``C*M`` channels, class ``c`` owning channels
``c*M .. c*M+M-1``); a class's map is the mean of its ``M`` maps; the image score of a class is the
mean of its ``k`` highest positions plus ``alpha`` times the mean of its ``k`` lowest positions::

    score_c = mean(top_k(map_c)) + alpha * mean(bottom_k(map_c))

(The reference implementation additionally halves the sum when ``alpha > 0``; we follow the
formula above, as in docs/models.md. A constant factor only rescales the logits.)

Same interface as :class:`~deepminer.models.fcn.GAPHead`: ``maps``, ``pool``, ``unit_weights``.
Because averaging the ``M`` maps is linear, a class map is exactly a 1x1 convolution whose weights
are the mean of the ``M`` filters: ``map_c = sum_k unit_weights[c, k] * f_k + mean bias``. So
``unit_weights`` is the exact per-unit weight of the class map, and DeepMiner's influence
(max activation x weight) keeps its meaning; only the pooling (top-k/bottom-k instead of the mean)
differs from a GAP head.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def resolve_k(k: int | float, positions: int) -> int:
    """Number of positions pooled for ``k`` over ``positions`` positions.

    A float strictly between 0 and 1 is a fraction of the positions (rounded, at least 1); a value
    >= 1 is a count (it must be a whole number), clamped to ``positions``.
    """
    if positions < 1:
        raise ValueError("WILDCAT pooling needs at least one position")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
        raise ValueError(f"wildcat k must be a positive count or a fraction in (0, 1), got {k!r}")
    if k < 1:
        return max(1, min(positions, int(round(k * positions))))
    if float(k) != int(k):
        raise ValueError(f"wildcat k >= 1 must be a whole number of positions, got {k!r}")
    return min(int(k), positions)


def wildcat_pool(maps: torch.Tensor, k: int | float, alpha: float,
                 cells: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C)``: mean of the k highest + alpha x mean of the k lowest positions.
    With ``cells`` (bool ``(B, h, w)``) only those positions count, and a fractional ``k`` is a share
    of them (image by image)."""
    if cells is not None:
        out = []
        for b in range(maps.shape[0]):
            sel = maps[b][:, cells[b]]  # (C, n)
            if sel.shape[1] == 0:
                sel = maps[b].flatten(1)
            out.append(wildcat_pool(sel[None, :, :, None], k, alpha))
        return torch.cat(out, 0)
    flat = maps.flatten(2)
    kk = resolve_k(k, flat.shape[2])
    score = flat.topk(kk, dim=2).values.mean(dim=2)
    if alpha != 0:
        score = score + alpha * (-(-flat).topk(kk, dim=2).values).mean(dim=2)
    return score


class WildcatHead(nn.Module):
    """WILDCAT head: ``maps`` M per class from a 1x1 conv, class-wise mean, top-k/bottom-k pooling.

    Args:
        in_units: number of units K of the feature map.
        num_classes: number of classes C.
        maps: M, maps per class.
        k: positions pooled at each end (a fraction in (0, 1) of the positions, or a count).
        alpha: weight of the k lowest positions.
    """

    def __init__(self, in_units: int, num_classes: int, *, maps: int = 4, k: int | float = 0.1,
                 alpha: float = 0.7):
        super().__init__()
        if int(maps) < 1:
            raise ValueError(f"wildcat maps must be >= 1, got {maps!r}")
        resolve_k(k, 1)  # validate early
        self.num_classes = int(num_classes)
        self.num_maps = int(maps)
        self.k = k
        self.alpha = float(alpha)
        self.conv = nn.Conv2d(in_units, self.num_classes * self.num_maps, kernel_size=1, bias=True)

    def all_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, M, h, w)``: every map of every class."""
        out = self.conv(feats)
        b, _, h, w = out.shape
        return out.view(b, self.num_classes, self.num_maps, h, w)

    def maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Class maps ``(B, C, h, w)``: the mean of each class's M maps."""
        return self.all_maps(feats).mean(dim=2)

    def pool(self, maps: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Image logits ``(B, C)`` by WILDCAT spatial pooling (over ``cells`` only, when given)."""
        return wildcat_pool(maps, self.k, self.alpha, cells)

    @property
    def unit_weights(self) -> torch.Tensor:
        """``(C, K)``: mean over the M maps of the 1x1 conv weights (the exact class-map weight)."""
        w = self.conv.weight[:, :, 0, 0]
        return w.view(self.num_classes, self.num_maps, -1).mean(dim=1)

    @property
    def head_kwargs(self) -> dict:
        """Keyword arguments (beyond units and classes) that rebuild this head."""
        return {"maps": self.num_maps, "k": self.k, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"maps={self.num_maps}, k={self.k}, alpha={self.alpha}"
