"""The sketch IoU: every unit's mask against a sketch at once (Lu & Perer's sketch query).

A unit *matches* a sketch when its IoU exceeds :data:`MATCH_IOU` (0.2); :func:`matching_units` lists
them. Unit masks follow :mod:`deepminer.explain.units` (bilinear upsampling, quantile thresholds).

Working resolution of the sketch IoU: the sketch (original image pixels) is reduced so that its long
side is at most ``work_side`` (:data:`IOU_SIDE`, 256 px; never enlarged) by area averaging, a
working pixel belonging to the sketch when at least half of it is covered. Unit masks are the unit
maps upsampled to that working size. The result equals a plain per-unit loop
``mask_iou(unit_masks(maps[k:k+1], t[k:k+1], size)[0], sketch_at(sketch, size))`` (float64) up to
pixels whose value ties the threshold within rounding: :func:`sketch_iou` interpolates in the maps'
own precision (float32 for float16/32 maps), treats a stretch of equal values as exactly that
value (``F.interpolate`` may round ``v*(1-a) + v*a`` above ``v``), and never materialises the K
upsampled maps.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from deepminer.explain.units import as_numpy
from deepminer.defaults import MATCH_IOU
from deepminer.geometry import fit_size

IOU_SIDE = 256
_CHUNK = 1 << 21  # sub-pixels evaluated per step in sketch_iou (bounds memory)


def iou_work_size(shape: Sequence[int], work_side: int | None = IOU_SIDE) -> tuple[int, int]:
    """The working size of a sketch of ``shape``: long side at most ``work_side`` (None: as is)."""
    return fit_size(int(shape[0]), int(shape[1]), work_side)


def _box_sums(mask: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray
              ) -> np.ndarray:
    """``(len(y0), len(x0))`` pixel counts of ``mask`` in the boxes rows ``[y0[i], y1[i])`` x
    columns ``[x0[j], x1[j])``, from an integral image."""
    cs = np.zeros((mask.shape[0] + 1, mask.shape[1]), np.int64)  # column sums above each row
    np.cumsum(mask, axis=0, out=cs[1:])
    rows = np.zeros((len(y0), mask.shape[1] + 1), np.int64)  # of each row range, then across
    np.cumsum(cs[y1] - cs[y0], axis=1, out=rows[:, 1:])
    return rows[:, x1] - rows[:, x0]


def _area_windows(n: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input ranges ``[start, end)`` of each output pixel of area resampling (adaptive average
    pooling, ``F.interpolate(mode="area")``): ``floor(i*n/n_out)`` .. ``ceil((i+1)*n/n_out)``."""
    i = np.arange(n_out)
    return (i * n) // n_out, -((-(i + 1) * n) // n_out)


def sketch_at(sketch, size: Sequence[int]) -> np.ndarray:
    """The sketch (bool ``(H, W)``) at ``size``: area average (as ``F.interpolate(mode="area")``),
    a pixel is in when at least half covered. Only the sketch's bounding box is summed."""
    s = np.asarray(sketch, dtype=bool)
    hs, ws = int(size[0]), int(size[1])
    if s.shape == (hs, ws):
        return s.copy()
    out = np.zeros((hs, ws), dtype=bool)
    rows, cols = np.flatnonzero(s.any(1)), np.flatnonzero(s.any(0))
    if rows.size == 0:
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    ys, ye = _area_windows(s.shape[0], hs)
    xs, xe = _area_windows(s.shape[1], ws)
    iy = np.flatnonzero((ye > y0) & (ys < y1))  # output rows / columns whose window meets the box
    ix = np.flatnonzero((xe > x0) & (xs < x1))
    r0, r1 = np.clip(ys[iy] - y0, 0, y1 - y0), np.clip(ye[iy] - y0, 0, y1 - y0)
    c0, c1 = np.clip(xs[ix] - x0, 0, x1 - x0), np.clip(xe[ix] - x0, 0, x1 - x0)
    inside = _box_sums(s[y0:y1, x0:x1], r0, r1, c0, c1)
    area = (ye[iy] - ys[iy])[:, None] * (xe[ix] - xs[ix])[None, :]
    out[np.ix_(iy, ix)] = 2 * inside >= area
    return out


# -- vectorised sketch IoU -------------------------------------------------------------------------

class _Axis(NamedTuple):
    """PyTorch's bilinear resampling (``align_corners=False``) of one axis, ``n`` cells -> ``n_out``.

    Output pixel p reads source position ``real = (p + .5) * n / n_out - .5``. It lies in band
    ``j = floor(real) + 1`` (0..n), between cell ``max(j-1, 0)`` (weight ``1 - lam``) and cell
    ``min(j, n-1)`` (weight ``lam = real - floor(real)``); in bands 0 and n (beyond the first /
    last cell centre) PyTorch clamps, so ``lam = 0`` and the value is that cell's exactly.
    ``idx``/``lam``: ``(R, n+1)`` tables of each band's pixels, R the largest band (padding:
    index 0, ``lam`` NaN); band j is pixels ``start[j] .. start[j] + counts[j] - 1``.
    """

    start: np.ndarray
    counts: np.ndarray
    idx: np.ndarray
    lam: np.ndarray


def _axis(n: int, n_out: int) -> _Axis:
    real = (np.arange(n_out) + 0.5) * (n / n_out) - 0.5
    band = np.clip(np.floor(real).astype(np.int64) + 1, 0, n)
    lam = np.where((band == 0) | (band == n), 0.0, real - np.floor(real))
    count = np.bincount(band, minlength=n + 1)
    offs = np.arange(max(1, int(count.max())))[:, None]
    valid = offs < count[None, :]
    start = np.cumsum(count) - count
    idx = np.where(valid, start[None, :] + offs, 0)
    return _Axis(start, count, idx, np.where(valid, lam[idx], np.nan))


def _threshold_in(t: np.ndarray, dtype: Any) -> np.ndarray:
    """Thresholds (float64) in ``dtype`` such that for x of that dtype ``x > result`` iff ``x > t``:
    for float32, the largest float32 <= t."""
    if dtype == np.float64:
        return t
    t32 = t.astype(np.float32)
    return np.where(t32 > t, np.nextafter(t32, np.float32(-np.inf)), t32)


def _cols(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[..., idx]`` (``np.take``: several times faster than fancy indexing)."""
    return np.take(a, idx, axis=-1)


def _above(mn: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = mn > t[:, None, None]`` for maps ``(K, h, w)`` and float64 thresholds ``t``.

    float16 maps: x > t iff x > t16, the largest float16 <= t (x a float16); for t16 >= +0 that
    is an int16 comparison of the bit patterns (negative x have negative patterns; a NaN cell
    may come out above, harmless: its quads count no pixel)."""
    if mn.dtype != np.float16:
        np.greater(mn, _threshold_in(t, mn.dtype)[:, None, None], out=out)
        return
    t16 = t.astype(np.float16)
    t16 = np.where(t16.astype(np.float64) > t, np.nextafter(t16, np.float16(-np.inf)), t16)
    t16 = t16 + np.float16(0.0)  # -0 -> +0
    nonneg = ~np.signbit(t16)
    if nonneg.all():
        np.greater(mn.view(np.int16), t16.view(np.int16)[:, None, None], out=out)
        return
    np.greater(mn, t16[:, None, None], out=out)


def sketch_iou(sketch, maps, thresholds, *, work_side: int | None = IOU_SIDE) -> np.ndarray:
    """IoU ``[K]`` of a sketch (bool ``(H, W)``, original pixels) with the mask of every unit.

    ``maps (K, h, w)`` cover the same image as the sketch; ``thresholds [K]``. Computed at the
    working size :func:`iou_work_size` (see the module docstring) and vectorised over all units.
    Inside each quad of four neighbouring cells (edges repeated) a unit's upsampled map is a
    convex combination of the four corner values, so a quad with no corner above the threshold
    holds no mask pixel. Only the quads with a corner above are evaluated, those of all units at
    once. Within one quad and one working row the value is affine in the column weight, which
    grows by a fixed step from pixel to pixel, so the pixels above the threshold are one run at
    one end of the row: its ends are found in closed form (cost rows x quads, not pixels), and
    its overlap with the sketch comes from the sketch's row prefix sums. The cost is ``K*h*w``
    bytes plus the rows of those quads, never ``K*H*W``. Equal to the per-unit loop (float64
    :func:`unit_masks`) up to a pixel whose value ties the threshold within rounding (values are
    interpolated in the maps' precision, float32 for float16/32 maps; an exact tie, e.g. zeros
    at threshold 0 or a constant stretch, is not above). Numpy only: no parallel regions, so it
    keeps its speed on a busy machine.
    """
    if isinstance(maps, torch.Tensor):
        mt = maps.detach().cpu()
        mn = (mt if mt.dtype in (torch.float16, torch.float32, torch.float64) else mt.double()).numpy()
    else:
        mn = np.asarray(maps)
    if mn.dtype not in (np.float16, np.float32, np.float64):
        mn = mn.astype(np.float64)
    mn = np.ascontiguousarray(mn)  # float16 stays float16: only the corners used are widened
    if mn.ndim != 3:
        raise ValueError(f"sketch_iou: maps must be (K, h, w), got shape {mn.shape}")
    k, h, w = mn.shape
    t = as_numpy(thresholds, np.float64).reshape(-1)
    if t.size != k:
        raise ValueError(f"sketch_iou: {t.size} thresholds for {k} units")
    s = np.asarray(sketch, dtype=bool)
    if s.ndim != 2:
        raise ValueError(f"sketch_iou: sketch must be (H, W), got shape {s.shape}")
    hw, ww = iou_work_size(s.shape, work_side)
    sk = sketch_at(s, (hw, ww))
    ay, ax = _axis(h, hw), _axis(w, ww)

    # per quad q = j*(w+1) + c of the (h+1) x (w+1) quads: pixel and sketch counts, its four
    # corner cells (rows j-1, j and columns c-1, c, clamped) and its bands' tables
    nq = (h + 1) * (w + 1)
    jq, cq = np.divmod(np.arange(nq), w + 1)
    npix = (ay.counts[:, None] * ax.counts[None, :]).reshape(-1)
    nsk = _box_sums(sk, ay.start, ay.start + ay.counts, ax.start, ax.start + ax.counts).reshape(-1)
    r0, r1 = np.maximum(jq - 1, 0) * w, np.minimum(jq, h - 1) * w
    c0, c1 = np.maximum(cq - 1, 0), np.minimum(cq, w - 1)
    corner = np.stack([r0 + c0, r0 + c1, r1 + c0, r1 + c1])  # (4, Q) offsets in a unit's map
    # x: a band's first pixel column, weight / step and count (the weight grows by one step,
    # n/n_out, a pixel); y: each row's weight and working row; padded rows weight 0, count 0.
    # Arithmetic in the maps' precision (float32 for float16/32 maps), as F.interpolate.
    work = np.float64 if mn.dtype == np.float64 else np.float32
    tn = _threshold_in(t, work)
    x_step = w / ww
    x_start = ax.start[cq]
    x_lam0s = (np.nan_to_num(ax.lam[0]) / x_step)[cq].astype(work)
    wy_t, ry_t = np.nan_to_num(ay.lam)[:, jq].astype(work), ay.idx[:, jq]  # (R, Q)
    y_valid = np.arange(ay.idx.shape[0])[:, None] < ay.counts[jq][None, :]  # (R, Q)
    cxr_t = np.where(y_valid, ax.counts[cq][None, :], 0).astype(work)  # (R, Q) pixels in a row
    rows = np.zeros((hw, ww + 1), np.int64)  # sketch pixels in a working row left of a column
    np.cumsum(sk, axis=1, out=rows[:, 1:])
    prefix = rows.reshape(-1)

    # quads with a corner above the threshold: the only ones that can hold mask pixels. The
    # above-threshold cells go into a zero-bordered grid g (row 0 and column w empty; cell (r, c)
    # at g[r+1, c]), flat per unit; quad (j, c) reads g[j..j+1, c-1..c], i.e. flat f, f-1,
    # f+w+1, f+w: two shifted ORs (a column -1 falls on the previous row's empty column w).
    g = np.zeros((k, h + 2, w + 1), bool)
    _above(mn, t, out=g[:, 1:h + 1, :w])
    flat_g = g.reshape(-1)
    pair = flat_g[:-(w + 1)] | flat_g[w + 1:]
    pair[1:] |= pair[:-1]
    hit = np.flatnonzero(pair)
    unit_all, q_all = np.divmod(hit, (h + 2) * (w + 1))
    keep = q_all < nq  # grid row h+1 is no quad (it would reach the next unit's grid)
    unit_all, q_all = unit_all[keep], q_all[keep]

    # per quad and working row, the above pixels are one run at one end of the row. Pixel i of
    # the row has column weight lam0 + i*step and value a + b*(lam0 + i*step) (a, b: the row's
    # value and slope in the weight): with bs = b*step and y = (t - a - bs*lam0/step) / |bs|,
    # it is above iff i > y (b > 0) or i < -y (b < 0): counts cx-1-floor(y) or -floor(y),
    # clamped to [0, cx]. b == 0: y = -inf (all, a > t), +inf or NaN (none). Padded rows: cx 0.
    area, inter = np.zeros(k), np.zeros(k)
    flat = mn.reshape(-1)
    tw = tn.astype(work)
    step = max(1, _CHUNK // (4 * wy_t.shape[0]))
    for s0 in range(0, unit_all.size, step):
        unit, q = unit_all[s0:s0 + step], q_all[s0:s0 + step]
        v = np.take(flat, _cols(corner, q) + unit * (h * w)).astype(work, copy=False)  # (4, n)
        dx = v[1] - v[0]
        e = ((v[3] - v[2]) - dx) * x_step
        dx *= x_step
        wy = _cols(wy_t, q)  # (R, n)
        num = wy * (v[0] - v[2])
        num += np.take(tw, unit) - v[0]  # t - a
        bs = np.multiply(wy, e, out=wy)
        bs += dx  # b * step
        num -= bs * _cols(x_lam0s, q)
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.divide(num, np.abs(bs), out=num)
        np.floor(y, out=y)
        cxr = _cols(cxr_t, q)
        neg = np.signbit(bs)
        cnt = cxr - 1
        cnt *= ~neg  # (a multiply: np.where / copyto branch on every element)
        cnt -= y
        np.fmax(cnt, 0, out=cnt)  # NaN -> 0
        np.minimum(cnt, cxr, out=cnt)
        tot = cnt.sum(0, dtype=np.float64)
        area += np.bincount(unit, tot, minlength=k)
        # overlap: the whole count where the quad lies in the sketch, row prefix sums where partly
        ns, npq = _cols(nsk, q), _cols(npix, q)
        inter += np.bincount(unit, tot * (ns == npq), minlength=k)
        part = np.flatnonzero((ns > 0) & (ns < npq))
        if part.size:
            qp, cp, np_ = q[part], cnt[:, part].astype(np.int64), neg[:, part]
            cxp = _cols(cxr_t, qp).astype(np.int64)
            lo = np.where(np_, 0, cxp - cp)
            hi = np.where(np_, cp, cxp)
            base = _cols(ry_t, qp) * (ww + 1) + _cols(x_start, qp)  # (R, np)
            ov = (np.take(prefix, base + hi) - np.take(prefix, base + lo)).sum(0)
            inter += np.bincount(unit[part], ov, minlength=k)
    union = sk.sum() + area - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def matching_units(iou, thr: float = MATCH_IOU) -> np.ndarray:
    """Ids of units whose IoU exceeds ``thr``, best first."""
    v = np.asarray(iou, dtype=np.float64)
    ids = np.flatnonzero(v > thr)
    return ids[np.argsort(-v[ids], kind="stable")]
