"""Dissection math, NetDissect-Lite style: short pure functions and two small streaming accumulators.

Everything here works on torch tensors of unit activations and never holds all maps of a data set:

* :class:`TailQuantile` — the per-unit ``q`` quantile over a stream of known length, **exact** (equal
  to ``np.quantile(values, q)``, linear interpolation) by keeping only the largest
  :func:`tail_length` values per unit. Memory ``4 * K * ((1-q) * n + 2)`` bytes. When that exceeds a
  budget, every item contributes the same number ``s`` of randomly chosen positions instead of all of
  them and the result is the exact quantile of that stratified sample (see :func:`sample_per_item`
  for the error bound).
* :class:`TopItems` — per-unit top-``M`` heap of reference items by their maximum activation, with the
  items' small unit maps as payload (the top-k galleries, and the maps that IoU needs).
* :func:`influence_counts`, :func:`rank_by_frequency`, :func:`coverage` — DeepMiner's influence ranking.
* :func:`iou_from_counts` — Network Dissection IoU from intersection and area counts summed over a
  set (the unit masks themselves come from :func:`deepminer.explain.units.unit_masks`).
* :func:`pca_2d` — the unit embedding projected to two dimensions.
"""
from __future__ import annotations

import math

import numpy as np
import torch


# --------------------------------------------------------------------------------------- quantiles
def tail_length(n: int, q: float) -> int:
    """How many of the largest of ``n`` values ``np.quantile(v, q)`` (linear) depends on:
    ``n - floor(q * (n - 1))``; 0 when ``n == 0``."""
    if n <= 0:
        return 0
    return int(n - math.floor(q * (n - 1)))


def quantile_from_tail(tail: torch.Tensor, n: int, q: float) -> torch.Tensor:
    """The linear-interpolation ``q`` quantile of ``n`` values per row, from the row's largest
    ``tail_length(n, q)`` values sorted in descending order (``tail``: ``(K, >= m)``). Same
    arithmetic as NumPy's default method."""
    if n <= 0:
        return torch.full((tail.shape[0],), float("nan"), dtype=torch.float64)
    h = q * (n - 1)
    lo = math.floor(h)
    hi = min(lo + 1, n - 1)
    frac = h - lo
    a = tail[:, n - 1 - lo].double()
    b = tail[:, n - 1 - hi].double()
    diff = b - a
    return b - diff * (1.0 - frac) if frac >= 0.5 else a + diff * frac


def sample_per_item(positions: int, items: int, units: int, q: float, max_bytes: int) -> int:
    """Positions per item to keep so that :class:`TailQuantile` stays within ``max_bytes``.

    Returns ``positions`` (exact quantiles) when the full tail fits, else the largest ``s`` whose
    tail fits. With ``n = items * s`` sampled positions the estimate is the exact quantile of a
    sample drawn item by item; its rank ``r`` within the full set obeys Hoeffding's bound for the
    ``items`` independent per-item counts: ``P(|r - q| > eps) <= 2 exp(-2 * items * eps**2)``
    (e.g. 20,000 patches: ``|r - q| <= 0.012`` with 99% probability; in practice the error is
    about ``sqrt(q (1 - q) / n)``, far smaller).
    """
    def fits(s: int) -> bool:
        return 4 * units * tail_length(items * s, q) <= max_bytes

    if fits(positions):
        return positions
    lo, hi = 1, positions
    while lo < hi:  # largest s that fits (at least 1)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


class TailQuantile:
    """Streaming per-unit ``q`` quantile over ``items`` reference items of ``positions`` each.

    ``update(values)`` takes ``(K, B, P)`` activations (units, items, positions). With
    ``per_item == positions`` the result equals ``np.quantile(all values of the unit, q)``; with
    fewer, each item contributes ``per_item`` random positions (see :func:`sample_per_item`). New
    values wait in a pending list and are merged with one ``topk`` once they outnumber the tail, so
    the cost per value is constant.
    """

    def __init__(self, units: int, q: float, items: int, positions: int, *, per_item: int | None = None,
                 seed: int = 0, device: torch.device | str = "cpu"):
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {q}")
        self.units, self.q, self.positions = int(units), float(q), int(positions)
        self.per_item = int(per_item or positions)
        self.n_expected = int(items) * self.per_item
        self.m = tail_length(self.n_expected, self.q)
        self.n = 0
        self._tail = torch.empty(self.units, 0, device=device)
        self._pending: list[torch.Tensor] = []
        self._pending_cols = 0
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def exact(self) -> bool:
        return self.per_item >= self.positions

    def update(self, values: torch.Tensor) -> None:
        k, b, p = values.shape
        if p != self.positions:
            raise ValueError(f"expected {self.positions} positions per item, got {p}")
        if not self.exact:
            idx = torch.rand(b, p, generator=self._gen).argsort(dim=1)[:, : self.per_item].to(values.device)
            values = values.gather(2, idx.unsqueeze(0).expand(k, -1, -1))
        flat = values.reshape(k, -1).float()
        self.n += flat.shape[1]
        self._pending.append(flat)
        self._pending_cols += flat.shape[1]
        if self._pending_cols >= max(self.m, 1):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        allv = torch.cat([self._tail, *self._pending], dim=1)
        self._pending, self._pending_cols = [], 0
        keep = min(self.m, allv.shape[1])
        self._tail = allv.topk(keep, dim=1, sorted=False).values if keep < allv.shape[1] else allv

    def result(self) -> torch.Tensor:
        """``(K,)`` float64 quantiles of everything seen (NaN before any update)."""
        self._merge()
        if self.n > self.n_expected:
            raise ValueError(f"saw {self.n} values per unit, more than the {self.n_expected} announced")
        tail = self._tail.sort(dim=1, descending=True).values
        return quantile_from_tail(tail.cpu(), self.n, self.q)


# ---------------------------------------------------------------------------------------- top items
class TopItems:
    """Per-unit heap of the ``capacity`` reference items with the highest score (max activation),
    each with its ``(h, w)`` unit map as payload. ``update(scores (B, K), index (B,), maps (B, K, h,
    w))``; :meth:`result` gives ``scores (K, M)`` (descending), ``index (K, M)``, ``maps (K, M, h, w)``
    (stored as ``dtype``; scores stay float32).
    Pending batches are merged with one ``topk`` + ``gather`` once they outnumber the heap."""

    def __init__(self, units: int, capacity: int, map_shape: tuple[int, int], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.units, self.capacity = int(units), max(1, int(capacity))
        self.map_shape = tuple(map_shape)
        self.dtype = dtype
        hw = self.map_shape[0] * self.map_shape[1]
        self._scores = torch.empty(self.units, 0, device=device)
        self._index = torch.empty(self.units, 0, dtype=torch.long, device=device)
        self._maps = torch.empty(self.units, 0, hw, device=device, dtype=dtype)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_cols = 0

    def update(self, scores: torch.Tensor, index: torch.Tensor, maps: torch.Tensor) -> None:
        b, k = scores.shape
        self._pending.append((scores.t().float(), index.view(1, b).expand(k, b),
                              maps.reshape(b, k, -1).transpose(0, 1).to(self.dtype)))
        self._pending_cols += b
        if self._pending_cols >= self.capacity:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        s = torch.cat([self._scores] + [p[0] for p in self._pending], dim=1)
        i = torch.cat([self._index] + [p[1] for p in self._pending], dim=1)
        m = torch.cat([self._maps] + [p[2] for p in self._pending], dim=1)
        self._pending, self._pending_cols = [], 0
        keep = min(self.capacity, s.shape[1])
        top = s.topk(keep, dim=1, sorted=False).indices
        self._scores = s.gather(1, top)
        self._index = i.gather(1, top)
        self._maps = m.gather(1, top.unsqueeze(-1).expand(-1, -1, m.shape[-1]))

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._merge()
        order = self._scores.argsort(dim=1, descending=True, stable=True)
        scores = self._scores.gather(1, order)
        index = self._index.gather(1, order)
        maps = self._maps.gather(1, order.unsqueeze(-1).expand(-1, -1, self._maps.shape[-1]))
        return scores, index, maps.reshape(self.units, -1, *self.map_shape)


# ---------------------------------------------------------------------------------------- influence
def influence_counts(max_act: torch.Tensor, weights: torch.Tensor, pred: torch.Tensor, top: int = 8
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepMiner's influence for one batch of reference items.

    ``max_act (B, K)``: each unit's max activation per item; ``weights (C, K)``: FC weight of unit k
    for class c; ``pred (B,)``: the class each item is predicted as. Influence of unit k on item b =
    ``max_act[b, k] * weights[pred[b], k]``. Returns ``counts (C, K)`` (how often unit k is among
    the ``top`` most influential units of an item predicted as c) and ``sums (C, K)`` (summed
    influence over those items, for tie-breaking).
    """
    c, k = weights.shape
    infl = max_act.float() * weights.float()[pred]  # (B, K)
    top_idx = infl.topk(min(top, k), dim=1).indices  # (B, top)
    counts = torch.zeros(c, k, dtype=torch.long, device=max_act.device)
    counts.index_put_((pred[:, None].expand_as(top_idx), top_idx),
                      torch.ones_like(top_idx), accumulate=True)
    sums = torch.zeros(c, k, dtype=torch.float64, device=max_act.device)
    sums.index_add_(0, pred, infl.double())
    return counts, sums


def rank_by_frequency(counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """``(C, K)`` unit ids per class, most frequently influential first (DeepMiner: how often the
    unit is among a patch's top-8 influential units, :func:`influence_counts`); ties broken by summed
    influence (higher first), then by unit id. (The explain package ranks units by one image's
    influence instead.)"""
    counts, sums = np.asarray(counts), np.asarray(sums)
    units = np.arange(counts.shape[1])
    return np.stack([np.lexsort((units, -sums[c], -counts[c])) for c in range(counts.shape[0])])


def coverage(counts: np.ndarray, top_units: np.ndarray, items: np.ndarray, slots: int) -> np.ndarray:
    """Share of all per-item top-``slots`` places of class c held by ``top_units[c]`` (DeepMiner
    reports 59-76% for the top 20 per class): ``counts[c, top].sum() / (items[c] * slots)``; NaN for
    a class no item was predicted as."""
    counts = np.asarray(counts)
    out = np.full(counts.shape[0], np.nan)
    for c in range(counts.shape[0]):
        if items[c] > 0:
            out[c] = counts[c, np.asarray(top_units[c], dtype=np.int64)].sum() / float(items[c] * slots)
    return out


# ---------------------------------------------------------------------------------------------- IoU
def iou_from_counts(inter: np.ndarray, unit_area: np.ndarray, concept_area: np.ndarray) -> np.ndarray:
    """Network Dissection IoU summed over a set: ``I / (|U| + |C| - I)`` per (unit, concept);
    ``inter (K, n_c)``, ``unit_area (K,)``, ``concept_area (n_c,)``; 0 where the union is empty."""
    inter = np.asarray(inter, dtype=np.float64)
    union = (np.asarray(unit_area, dtype=np.float64)[:, None]
             + np.asarray(concept_area, dtype=np.float64)[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# ---------------------------------------------------------------------------------------------- PCA
def pca_2d(x: np.ndarray) -> np.ndarray:
    """Rows of ``x (K, N)`` projected on their first two principal components (``(K, 2)``, zeros
    past the rank). Same result as ``sklearn.decomposition.PCA(2).fit_transform`` (signs fixed
    the way scikit-learn fixes them: the largest-magnitude loading of each component positive)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((x.shape[0], 2))
    if x.shape[0] < 2 or x.shape[1] == 0:
        return out
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    n = min(2, len(s))
    for j in range(n):
        sign = np.sign(vt[j, np.argmax(np.abs(vt[j]))]) or 1.0
        out[:, j] = u[:, j] * s[j] * sign
    return out


def mask_sizes(unit_area: np.ndarray, items: int, iou_size: int, maps: torch.Tensor, heap: int,
               thresholds: np.ndarray, topk: int) -> dict[str, np.ndarray]:
    """How large each unit's masks are (Peck et al. compare this between a baseline and a fine-tuned
    model: "the fine-tuned model's units cover smaller regions"), as fractions of a patch:

    * ``mask_fraction [K]``: the mean share of a reference patch inside the unit's mask, over all the
      references (``unit_area`` in grid cells summed over the set, from :func:`deepminer.atlas.dissect.dissect`'s IoU pass, over
      ``items x iou_size^2`` cells); exact when the unit's ``iou_complete``, else a lower bound;
    * ``roi_fraction [K]``: the mean share on its ``topk`` gallery patches (the region a person sees
      highlighted in the gallery: Peck's "ROI"), from the stored maps at the same grid.
    """
    from deepminer.explain.units import unit_masks

    cells = iou_size * iou_size
    k = int(maps.shape[0])
    kk = max(1, min(topk, heap))
    roi = np.zeros(k)
    for u0 in range(0, k, max(1, (1 << 22) // (kk * cells))):
        part = maps[u0:u0 + max(1, (1 << 22) // (kk * cells)), :kk].float()
        n = part.shape[0]
        th = np.repeat(np.asarray(thresholds[u0:u0 + n], dtype=np.float64), kk)
        m = unit_masks(part.reshape(n * kk, *part.shape[2:]), th, (iou_size, iou_size))
        roi[u0:u0 + n] = m.reshape(n, kk * cells).mean(axis=1)
    frac = np.asarray(unit_area, dtype=np.float64) / max(1, items * cells)
    return {"mask_fraction": frac.astype(np.float32), "roi_fraction": roi.astype(np.float32)}
