"""The WILDCAT head (Durand et al. 2017; used as a trainable saliency head by Aggarwal et al.).

A 1x1 convolution gives ``M`` maps per class (``C*M`` channels, class ``c`` owning channels
``c*M .. c*M+M-1``); a class's map is the mean of its ``M`` maps; the image score of a class is the
mean of its ``k`` highest positions plus ``alpha`` times the mean of its ``k`` lowest positions::

    score_c = mean(top_k(map_c)) + alpha * mean(bottom_k(map_c))

(The reference implementation additionally halves the sum when ``alpha > 0``; we follow the
formula above, as in docs/models.md. A constant factor only rescales the logits.)

**Local surround** (``surround`` = beta > 0; ours, issue 21): a class map is then the local contrast of the
mean map ``m`` against its ring, ``map_c = m_c - beta * ring_mean(m_c)``, where ``ring_mean`` at a cell is the
mean of the cells at Chebyshev distance 2 from it (:data:`SURROUND_RING`: the 5 x 5 box less the 3 x 3 box;
cells beyond the map's edge are left out of the mean). WILDCAT's negative evidence (``alpha``) is global (the
k lowest positions); the surround is local: a cell counts as evidence for a class by how much more it shows
the class than its neighbourhood does. Top-k pooling of such a map scores focal findings; a GAP head could
not use it (the mean of ``m - ring_mean(m)`` is about ``(1 - beta) mean(m)``). ``beta = 0`` is plain WILDCAT.

Same interface as :class:`~deepminer.models.fcn.GAPHead`: ``maps``, ``pool``, ``unit_weights``.
Because averaging the ``M`` maps is linear, a class map is exactly a 1x1 convolution whose weights
are the mean of the ``M`` filters: ``map_c = sum_k unit_weights[c, k] * f_k + mean bias``. So
``unit_weights`` is the exact per-unit weight of the class map, and DeepMiner's influence
(max activation x weight) keeps its meaning; only the pooling (top-k/bottom-k instead of the mean)
differs from a GAP head. With a surround the class map is ``sum_k unit_weights[c, k] * contrast(f_k)
+ (1 - beta) x mean bias`` away from the map's edge (:meth:`WildcatHead.contrast` is linear): silencing unit k
subtracts ``unit_weights[:, k] * contrast(f_k)``, and influence keeps DeepMiner's definition (max
activation x weight).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SURROUND_RING = (1, 2)  #: the surround of a cell: Chebyshev distance 2 (inner box radius 1, outer 2)


def ring_mean(maps: torch.Tensor, ring: tuple[int, int] = SURROUND_RING) -> torch.Tensor:
    """``(B, C, h, w)`` -> the same shape: at each cell, the mean of the cells at Chebyshev distance
    ``ring[0] + 1 .. ring[1]`` from it that lie on the map (0 where there are none)."""
    inner, outer = ring
    ones = torch.ones_like(maps[:, :1])

    def box(x: torch.Tensor, r: int) -> torch.Tensor:  # sum over the (2r+1)^2 box, zero beyond the edge
        return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, divisor_override=1)

    count = box(ones, outer) - box(ones, inner)
    return (box(maps, outer) - box(maps, inner)) / count.clamp(min=1.0)


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
        surround: beta, weight of the ring mean subtracted from each class map (0: plain WILDCAT).
    """

    def __init__(self, in_units: int, num_classes: int, *, maps: int = 4, k: int | float = 0.1,
                 alpha: float = 0.7, surround: float = 0.0):
        super().__init__()
        if int(maps) < 1:
            raise ValueError(f"wildcat maps must be >= 1, got {maps!r}")
        resolve_k(k, 1)  # validate early
        self.num_classes = int(num_classes)
        self.num_maps = int(maps)
        self.k = k
        self.alpha = float(alpha)
        if not math.isfinite(float(surround)) or float(surround) < 0:
            raise ValueError(f"wildcat surround must be 0 or more, got {surround!r}")
        self.surround = float(surround)
        self.conv = nn.Conv2d(in_units, self.num_classes * self.num_maps, kernel_size=1, bias=True)

    def all_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, M, h, w)``: every map of every class."""
        out = self.conv(feats)
        b, _, h, w = out.shape
        return out.view(b, self.num_classes, self.num_maps, h, w)

    def contrast(self, maps: torch.Tensor) -> torch.Tensor:
        """``maps - surround x ring_mean(maps)`` (linear; ``maps`` unchanged without a surround)."""
        if not self.surround:
            return maps
        return maps - self.surround * ring_mean(maps)

    def maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Class maps ``(B, C, h, w)``: the mean of each class's M maps (its local contrast with a surround)."""
        return self.contrast(self.all_maps(feats).mean(dim=2))

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
        return {"maps": self.num_maps, "k": self.k, "alpha": self.alpha, "surround": self.surround}

    def extra_repr(self) -> str:
        return f"maps={self.num_maps}, k={self.k}, alpha={self.alpha}, surround={self.surround}"
