"""Figures of an explanation-evaluation report (PNG, matplotlib Agg).

Each function draws one figure and writes it atomically (a temporary file in the target folder,
then :func:`os.replace`), so a reader never sees half a PNG; it returns the path written
(:func:`metric_bars` also returns the order of its bars). Matplotlib is imported on first use, so
importing this module is cheap.

What was left out (a method whose values are all NaN, an empty mask) is said in a note at the
bottom of the figure and, as plain text, in the PNG's ``Description`` metadata
(``PIL.Image.open(path).text["Description"]``).

Baselines (``random``, ``tissue_prior``) are drawn in grey, dashed where they are lines; the
other methods keep one colour each across every figure of a report (tab10, by name).
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.atomic import atomic_file

BASELINES = ("random", "tissue_prior")  #: the methods every report compares against
DPI = 130                               #: resolution of every figure
MAX_GALLERY_SIDE = 512                  #: long side (px) gallery images are reduced to before plotting
OUTLINE = "#39ff14"                     #: lesion outline colour (with a dark edge, visible on grey and on heat)

_GREYS = ("#5a5a5a", "#8f8f8f", "#3a3a3a", "#b0b0b0")
_DASHES: tuple[Any, ...] = ("--", ":", "-.", (0, (5, 2, 1, 2)))


# -- plumbing ---------------------------------------------------------------------------------------

def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str], notes: Sequence[str] = ()) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file in the same folder, then ``os.replace``),
    ``notes`` in its Description metadata; the figure is closed either way."""
    out = Path(path)
    try:
        with atomic_file(out) as fh:
            fig.savefig(fh, format="png", dpi=DPI,
                        metadata={"Software": "deepminer.evaluation.figures",
                                  "Description": "\n".join(notes) if notes else "complete"})
    finally:
        _pyplot().close(fig)
    return out


def _note(fig: Any, notes: Sequence[str]) -> None:
    """``notes`` as small italic text along the bottom of ``fig``."""
    if notes:
        text = "\n".join(textwrap.fill(n, 130) for n in notes)
        fig.text(0.01, 0.005, text, ha="left", va="bottom", fontsize=8, style="italic", color="#8b0000")


def _wrap(title: str, width: int = 80) -> str:
    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def _is_baseline(method: str, baselines: Iterable[str] = BASELINES) -> bool:
    return method in tuple(baselines)


def _colours(methods: Iterable[str], baselines: Iterable[str] = BASELINES) -> dict[str, tuple[Any, Any]]:
    """``method -> (colour, linestyle)``: tab10 (grey skipped) by sorted name for methods, greys with
    dashes for baselines."""
    from matplotlib import colormaps

    base = tuple(baselines)
    tab = [colormaps["tab10"](i) for i in range(10) if i != 7]  # 7 is tab10's grey
    out: dict[str, tuple[Any, Any]] = {}
    names = sorted(set(methods))
    for i, m in enumerate(x for x in names if x not in base):
        out[m] = (tab[i % len(tab)], "-")
    for i, m in enumerate(x for x in names if x in base):
        out[m] = (_GREYS[i % len(_GREYS)], _DASHES[i % len(_DASHES)])
    return out


def _valid_rows(values: Any, width: int) -> np.ndarray:
    """The rows of ``values`` (``(n, width)``, or one row) that are finite everywhere."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"expected an (n_images, {width}) array, got shape {a.shape}")
    return a[np.isfinite(a).all(axis=1)]


def _auc(rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row over ``x``."""
    if rows.shape[1] < 2:
        return np.zeros(rows.shape[0])
    return ((rows[:, 1:] + rows[:, :-1]) / 2 * np.diff(x)[None, :]).sum(axis=1)


def _mean_curves(curves: Mapping[str, Any], x: np.ndarray) -> tuple[dict[str, tuple[np.ndarray, float, int]], list[str]]:
    """``method -> (mean curve, mean per-image AUC, n images)`` over the rows without NaN, and the
    methods left out (no such row)."""
    kept: dict[str, tuple[np.ndarray, float, int]] = {}
    skipped: list[str] = []
    for m, values in curves.items():
        rows = _valid_rows(values, len(x))
        if len(rows) == 0:
            skipped.append(m)
            continue
        kept[m] = (rows.mean(axis=0), float(_auc(rows, x).mean()), len(rows))
    return kept, skipped


def _legend_order(methods: Iterable[str], score: Mapping[str, float], baselines: Iterable[str],
                  *, descending: bool = True) -> list[str]:
    """Methods by score (best first), baselines last."""
    base = tuple(baselines)
    sign = -1.0 if descending else 1.0
    return sorted(methods, key=lambda m: (m in base, sign * score[m], m))


# -- 1. bars ----------------------------------------------------------------------------------------

def metric_bars(summary_rows: list[dict], metric: str, path: str | os.PathLike[str], *,
                title: str | None = None, higher_is_better: bool = True) -> tuple[Path, list[str]]:
    """One bar per method: its mean ``metric`` with the 95% bootstrap interval (``lo``..``hi``) as
    whiskers, ``n`` above each bar.

    ``summary_rows``: ``{"method", "metric", "mean", "lo", "hi", "n", "baseline"}`` dicts (rows of
    other metrics are ignored; a row without ``"metric"`` counts as this one). Methods are sorted by
    mean, best first (descending unless ``higher_is_better=False``); baselines (``baseline: True``, or
    named ``random``/``tissue_prior``) come last in grey, and a dashed line marks the best baseline's
    mean. Methods with a NaN mean are left out and named in a note. Returns ``(path, order)``, order
    being the methods as drawn, left to right.
    """
    plt = _pyplot()
    rows = [r for r in summary_rows if r.get("metric", metric) == metric]
    finite = [bool(np.isfinite(float(r.get("mean", np.nan)))) for r in rows]
    drawn = [r for r, ok in zip(rows, finite) if ok]
    nan_methods = [str(r["method"]) for r, ok in zip(rows, finite) if not ok]

    def is_base(r: dict) -> bool:
        return bool(r.get("baseline", False)) or _is_baseline(str(r["method"]))

    sign = -1.0 if higher_is_better else 1.0
    drawn.sort(key=lambda r: (is_base(r), sign * float(r["mean"]), str(r["method"])))
    order = [str(r["method"]) for r in drawn]
    colours = _colours(order, [str(r["method"]) for r in drawn if is_base(r)])

    notes = []
    if nan_methods:
        notes.append(f"Skipped (mean is NaN, nothing to draw): {', '.join(nan_methods)}.")
    if not rows:
        notes.append(f"No rows for metric {metric!r}.")

    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(drawn)), 4.6))
    x = np.arange(len(drawn))
    means = np.array([float(r["mean"]) for r in drawn])
    lo = np.array([float(r.get("lo", np.nan)) for r in drawn])
    hi = np.array([float(r.get("hi", np.nan)) for r in drawn])
    err = np.vstack([np.nan_to_num(np.clip(means - lo, 0, None)), np.nan_to_num(np.clip(hi - means, 0, None))])
    bar_colours = [colours[m][0] for m in order]
    if len(drawn):
        ax.bar(x, means, color=bar_colours, edgecolor="#333333", linewidth=0.6, width=0.7, zorder=2)
        ax.errorbar(x, means, yerr=err, fmt="none", ecolor="black", elinewidth=1.2, capsize=5, zorder=3)
        top = np.where(np.isfinite(hi), np.maximum(hi, means), means)
        span = float(np.nanmax(np.abs(np.concatenate([top, lo[np.isfinite(lo)], [0.0]])))) or 1.0
        for xi, t, r in zip(x, top, drawn):
            label = f"{float(r['mean']):.3f}" + (f"\nn={int(r['n'])}" if r.get("n") is not None else "")
            ax.text(xi, t + 0.02 * span, label, ha="center", va="bottom", fontsize=8)
        ax.set_ylim(min(0.0, float(np.nanmin(np.concatenate([lo[np.isfinite(lo)], means])))) * 1.1,
                    float(np.nanmax(top)) + 0.2 * span)
    base_rows = [r for r in drawn if is_base(r)]
    if base_rows:
        best = (max if higher_is_better else min)(base_rows, key=lambda r: float(r["mean"]))
        ax.axhline(float(best["mean"]), color="#555555", linestyle="--", linewidth=1.2, zorder=1,
                   label=f"best baseline ({best['method']}: {float(best['mean']):.3f})")
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_xticks(x)
    ax.set_xticklabels(order, rotation=25 if len(order) > 4 else 0, ha="right" if len(order) > 4 else "center")
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    if len(drawn) == 0:
        ax.text(0.5, 0.5, "nothing to draw", transform=ax.transAxes, ha="center", va="center", color="grey")
    default = (f"{metric}: mean per method ({'higher' if higher_is_better else 'lower'} is better)\n"
               "whiskers = 95% bootstrap interval of the mean; grey = baselines")
    ax.set_title(_wrap(title if title is not None else default, 70), fontsize=10)
    _note(fig, notes)
    fig.tight_layout(rect=(0, 0.05 if notes else 0, 1, 1))
    return _save(fig, path, notes), order


# -- 2. precision-recall ----------------------------------------------------------------------------

def pr_curves(curves: dict[str, np.ndarray], recall_grid: np.ndarray, path: str | os.PathLike[str], *,
              baselines: Sequence[str] = BASELINES) -> Path:
    """Mean precision-recall curve per method: ``curves[method]`` is ``(n_images, len(recall_grid))``
    precision at each recall; rows with a NaN are ignored, a method with none left is named in a note.
    The legend gives each method's mean per-image AUPRC (trapezoid over ``recall_grid``) and ``n``;
    baselines are grey and dashed."""
    plt = _pyplot()
    grid = np.asarray(recall_grid, dtype=np.float64)
    kept, skipped = _mean_curves(curves, grid)
    notes = [f"Skipped (every row NaN): {', '.join(skipped)}."] if skipped else []
    style = _colours(kept, baselines)

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for m in _legend_order(kept, {k: v[1] for k, v in kept.items()}, baselines):
        mean, auc, n = kept[m]
        colour, ls = style[m]
        ax.plot(grid, mean, color=colour, linestyle=ls, linewidth=1.7,
                label=f"{m} (AUPRC {auc:.3f}, n={n})")
    ax.set_xlim(float(grid.min()), float(grid.max()))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (fraction of lesion pixels found)")
    ax.set_ylabel("precision (mean over images)")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if kept:
        ax.legend(loc="best", fontsize=8, frameon=True, framealpha=0.85)
    else:
        ax.text(0.5, 0.5, "nothing to draw", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_title("Saliency vs lesion mask: mean precision-recall curve per method\n"
                 "lines = mean over images (no whiskers); legend = mean per-image AUPRC\n"
                 "grey dashed = baselines", fontsize=9)
    _note(fig, notes)
    fig.tight_layout(rect=(0, 0.05 if notes else 0, 1, 1))
    return _save(fig, path, notes)


# -- 3. deletion / insertion ------------------------------------------------------------------------

def faithfulness_curves(deletion: dict[str, np.ndarray], insertion: dict[str, np.ndarray], fractions: np.ndarray,
                        path: str | os.PathLike[str], *, baselines: Sequence[str] = BASELINES) -> Path:
    """Two panels, deletion and insertion: the mean probability of the explained class per method
    (``(n_images, len(fractions))`` arrays, rows with a NaN ignored) against the fraction of breast
    area replaced (deletion) or restored (insertion), most salient first. The legend gives each
    method's mean per-image AUC; lower is better for deletion, higher for insertion. A method with no
    usable row is named in a note."""
    plt = _pyplot()
    x = np.asarray(fractions, dtype=np.float64)
    style = _colours([*deletion, *insertion], baselines)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.8), sharey=True)
    notes: list[str] = []
    panels = (("Deletion", "replaced", deletion, "lower AUC = more faithful", False),
              ("Insertion", "restored", insertion, "higher AUC = more faithful", True))
    for ax, (name, verb, data, better, descending) in zip(axes, panels):
        kept, skipped = _mean_curves(data, x)
        if skipped:
            notes.append(f"{name}: skipped (every row NaN): {', '.join(skipped)}.")
        for m in _legend_order(kept, {k: v[1] for k, v in kept.items()}, baselines, descending=descending):
            mean, auc, n = kept[m]
            colour, ls = style[m]
            ax.plot(x, mean, color=colour, linestyle=ls, linewidth=1.7,
                    label=f"{m} (AUC {auc:.3f}, n={n})")
        ax.set_title(f"{name}: most salient breast area {verb} first\n({better})", fontsize=10)
        ax.set_xlabel(f"fraction of breast area {verb}")
        ax.set_xlim(float(x.min()), float(x.max()))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        if kept:
            ax.legend(loc="best", fontsize=8, framealpha=0.85)
        else:
            ax.text(0.5, 0.5, "nothing to draw", transform=ax.transAxes, ha="center", va="center", color="grey")
    axes[0].set_ylabel("probability of the explained class")
    fig.suptitle("Faithfulness: mean model output per method (lines = mean over images, no whiskers; "
                 "grey dashed = baselines)", fontsize=10)
    _note(fig, notes)
    fig.tight_layout(rect=(0, 0.05 if notes else 0, 1, 1))
    return _save(fig, path, notes)


# -- 4. gallery -------------------------------------------------------------------------------------

def _fit(a: np.ndarray, max_side: int = MAX_GALLERY_SIDE) -> np.ndarray:
    """A float map reduced (bilinear) so its long side is at most ``max_side``."""
    from deepminer.geometry import fit_size
    from deepminer.overlay import resize_map

    a = np.nan_to_num(np.asarray(a, dtype=np.float32))
    return resize_map(a, fit_size(a.shape[0], a.shape[1], max_side))


def _outline(ax: Any, lesion: np.ndarray) -> bool:
    """The lesion's outline (contour at 0.5 of the resized mask) in a bright colour with a dark edge;
    False when the mask is empty."""
    from matplotlib import patheffects

    if lesion.size == 0 or float(lesion.max()) < 0.5 or float(lesion.min()) >= 0.5:
        return False
    ax.contour(lesion, levels=[0.5], colors=[OUTLINE], linewidths=1.6,
               path_effects=[patheffects.withStroke(linewidth=3.2, foreground="black")])
    return True


def gallery(cases: list[dict], path: str | os.PathLike[str], *, title: str) -> Path:
    """A grid, one row per case: the image with the lesion outlined (bright green), and the saliency
    as a heat overlay (jet, 0..1, colour bar) with the same outline. Each case is
    ``{"title", "image": (H, W) float [0, 1], "lesion": (H, W) bool, "saliency": (H, W) float [0, 1],
    "subtitle"}``; images are reduced to at most 512 px long side before plotting."""
    plt = _pyplot()
    from matplotlib import cm, colors

    from deepminer.overlay import heat_overlay, resize_map

    notes: list[str] = []
    prepared = []
    for i, c in enumerate(cases):
        image = np.clip(_fit(c["image"]), 0, 1)
        lesion = _fit(np.asarray(c["lesion"], dtype=np.float32))
        saliency = np.clip(_fit(c["saliency"]), 0, 1)
        lesion = resize_map(lesion, image.shape)      # same grid as the image, whatever sizes came in
        saliency = resize_map(saliency, image.shape)
        prepared.append((str(c.get("title", f"case {i + 1}")), str(c.get("subtitle", "")), image, lesion, saliency))

    heights = [float(np.clip(3.5 * p[2].shape[0] / max(1, p[2].shape[1]), 2.0, 5.5)) + 0.5 for p in prepared]
    n = max(1, len(prepared))
    fig, axes = plt.subplots(n, 3, figsize=(8.0, 0.8 + (sum(heights) if heights else 2.0)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 0.05], "height_ratios": heights or [1.0]})
    norm = colors.Normalize(0, 1)
    for row, (name, sub, image, lesion, saliency) in zip(axes, prepared):
        ax_img, ax_sal, ax_bar = row
        ax_img.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
        has = _outline(ax_img, lesion)
        ax_sal.imshow(heat_overlay(image, saliency, vmin=0.0, vmax=1.0), interpolation="bilinear")
        _outline(ax_sal, lesion)
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap="jet"), cax=ax_bar, label="saliency")
        if not has:
            notes.append(f"{name}: empty lesion mask, no outline.")
        ax_img.set_title(_wrap(f"{name}\nimage, lesion outlined", 45), fontsize=9)
        ax_sal.set_title(_wrap(f"{sub}\nsaliency overlay" if sub else "saliency overlay", 45), fontsize=9)
        for ax in (ax_img, ax_sal):
            ax.set_xticks([])
            ax.set_yticks([])
    if not prepared:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][0].text(1.0, 0.5, "no cases", transform=axes[0][0].transAxes, ha="center", color="grey")
        notes.append("No cases.")
    fig.suptitle(_wrap(title, 70), fontsize=11)
    _note(fig, notes)
    fig.tight_layout(rect=(0, 0.03 if notes else 0, 1, 0.97))  # room for the suptitle
    return _save(fig, path, notes)


# -- 5. sanity check --------------------------------------------------------------------------------

def sanity_plot(results: dict[str, list[float]], steps: list[str], bound: float, path: str | os.PathLike[str]) -> Path:
    """Model-randomization sanity check: per method, the Spearman correlation between the saliency of
    the trained model and that after each cumulative randomization step (``steps``, e.g.
    ``["original", "head", "+block -1", ...]``), the pass bound dashed. A method passes when its
    correlation falls below the bound. NaN points are gaps; an all-NaN method is named in a note."""
    plt = _pyplot()
    x = np.arange(len(steps))
    style = _colours(results)
    notes: list[str] = []
    fig, ax = plt.subplots(figsize=(max(7.5, 3.0 + 0.75 * len(steps)), 4.6))
    for m in sorted(results):
        y = np.full(len(steps), np.nan)
        vals = np.asarray(results[m], dtype=np.float64)[: len(steps)]
        y[: len(vals)] = vals
        if not np.isfinite(y).any():
            notes.append(f"Skipped (all NaN): {m}.")
            continue
        colour, ls = style[m]
        ax.plot(x, y, color=colour, linestyle=ls, marker="o", markersize=4, linewidth=1.5, label=m)
    ax.axhline(bound, color="#444444", linestyle="--", linewidth=1.2, label=f"pass bound ({bound:g})")
    ax.set_xticks(x)
    long = len(steps) > 4 or max((len(st) for st in steps), default=0) > 12
    ax.set_xticklabels(steps, rotation=25 if long else 0, ha="right" if long else "center")
    ax.set_xlim(-0.3, max(0, len(steps) - 1) + 0.3)
    ax.set_xlabel("randomization step (cumulative, from the output layer down)")
    ax.set_ylabel("Spearman ρ with the original saliency")
    finite = [v for vals in results.values() for v in vals if v is not None and np.isfinite(v)]
    ax.set_ylim(min(-0.1, bound - 0.1, *(v - 0.05 for v in finite)), 1.05)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("Sanity check: saliency similarity as the model is randomized\n"
                 "points = Spearman ρ at each step (no whiskers); should fall below the dashed bound",
                 fontsize=9)
    _note(fig, notes)
    fig.tight_layout(rect=(0, 0.05 if notes else 0, 1, 1))
    return _save(fig, path, notes)


# -- 6. reliability diagram (image-level calibration) -----------------------------------------------

def reliability_diagram(bins: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
                        ece: float | None = None, title: str = "Image level: reliability (top-label)",
                        before: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """The reliability diagram of :func:`deepminer.metrics.reliability_bins` (``{"lo", "hi", "count",
    "confidence", "accuracy"}`` per bin): per non-empty bin a bar of its accuracy over the bin, a red
    hatched gap to its mean confidence (above the bar: over-confident; inside it: under-confident), the diagonal of perfect calibration, and the image count per bin
    below. ``before``: the bins before calibration (T = 1), drawn as a grey line. Empty bins are left
    blank (said in a note when every bin is)."""
    plt = _pyplot()
    kept = [b for b in bins if b.get("count") and b.get("accuracy") is not None and b["accuracy"] == b["accuracy"]]
    notes = [] if kept else ["No image: nothing to draw."]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.2, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="#8f8f8f", linestyle="--", linewidth=1, label="perfectly calibrated")
    for i, b in enumerate(kept):
        lo, hi = float(b["lo"]), float(b["hi"])
        ax.bar(lo, float(b["accuracy"]), width=hi - lo, align="edge", color="#1f77b4", edgecolor="white",
               label="accuracy" if i == 0 else None)
        ax.bar(lo, float(b["confidence"]) - float(b["accuracy"]), bottom=float(b["accuracy"]), width=hi - lo,
               align="edge", facecolor="none", hatch="///", edgecolor="#d62728", linewidth=0.8,
               label="gap to mean confidence" if i == 0 else None)
    if before:
        pts = [(float(b["confidence"]), float(b["accuracy"])) for b in before
               if b.get("count") and b.get("accuracy") is not None and b["accuracy"] == b["accuracy"]]
        if pts:
            ax.plot(*zip(*pts), color="#5a5a5a", marker="o", markersize=3, linewidth=1,
                    label="before calibration (T = 1)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (argmax = truth)")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(_wrap(title + (f"\nECE {ece:.3f} ({len(bins)} equal-width bins)" if ece is not None and ece == ece
                                else "")), fontsize=9)
    lefts = [float(b["lo"]) for b in bins]
    axc.bar(lefts, [int(b.get("count") or 0) for b in bins], width=[float(b["hi"]) - float(b["lo"]) for b in bins],
            align="edge", color="#8f8f8f", edgecolor="white")
    axc.set_xlabel("confidence (top-label probability)")
    axc.set_ylabel("images")
    axc.spines[["top", "right"]].set_visible(False)
    _note(fig, notes)
    fig.tight_layout(rect=(0, 0.04 if notes else 0, 1, 1))
    return _save(fig, path, notes)
