"""Pictures and charts for the workbench: overlays, outlines, gallery tiles, plotly figures.

Pure functions of numpy arrays (no Streamlit): every page draws through these, and the tests call
them directly. Images are ``uint8`` RGB ``(H, W, 3)``; grey inputs are float ``[0, 1]``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from deepminer.geometry import fit_image
from deepminer.overlay import colorize, heat_overlay, resize_map, to_rgb  # noqa: F401 (re-exported)

#: label colours (Plotly's qualitative "Safe" palette)
PALETTE = ("#88CCEE", "#CC6677", "#DDCC77", "#117733", "#332288", "#AA4499", "#44AA99", "#999933",
           "#882255", "#661100", "#6699CC", "#888888")
UNLABELLED = "#B0B0B0"
RED = (230, 40, 40)


def md_escape(text: object) -> str:
    """User text made safe for ``st.markdown``: Markdown and HTML characters are escaped, so a label
    such as ``<b>mass</b>`` or ``**x**`` shows literally."""
    s = str(text)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~$])", r"\\\1", s)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """uint8 RGB/grey as JPEG bytes (PNG of a large overlay costs ~0.4 s; JPEG ~10 ms)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def fit(img: np.ndarray, max_side: int) -> np.ndarray:
    """``img`` scaled down (area) so its long side is at most ``max_side``
    (:func:`deepminer.geometry.fit_image`); never enlarged."""
    return fit_image(img, max_side)


def mask_overlay(base: np.ndarray, mask: np.ndarray, *, color: Sequence[int] = RED, alpha: float = 0.35,
                 outline: bool = True) -> np.ndarray:
    """A boolean mask (any size, resized nearest) tinted over ``base``, with its border drawn."""
    rgb = to_rgb(base).copy()
    m = np.asarray(mask, dtype=bool)
    if m.shape != rgb.shape[:2]:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
            (rgb.shape[1], rgb.shape[0]), Image.Resampling.NEAREST)) > 127
    col = np.asarray(color, dtype=np.float32)
    rgb[m] = (rgb[m].astype(np.float32) * (1 - alpha) + col * alpha + 0.5).astype(np.uint8)
    if outline:
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        rgb[m & ~inner] = np.asarray(color, dtype=np.uint8)
    return rgb


def draw_boxes(base: np.ndarray, boxes: Sequence[Sequence[float]], *, color: Sequence[int] = RED,
               width: int | None = None, labels: Sequence[str] | None = None,
               highlight: int | None = None) -> np.ndarray:
    """Rectangles ``(x0, y0, x1, y1)`` (x1/y1 exclusive) outlined on ``base``; box ``highlight``
    is drawn thicker in yellow; optional short labels at the top-left corners."""
    img = Image.fromarray(to_rgb(base))
    draw = ImageDraw.Draw(img)
    w = width or max(2, round(max(img.size) / 200))
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in b)
        col = (255, 220, 0) if i == highlight else tuple(int(c) for c in color)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=col, width=w * 2 if i == highlight else w)
        if labels:
            draw.text((x0 + w + 2, y0 + w + 1), str(labels[i]), fill=col)
    return np.asarray(img)


def tile(crop: np.ndarray, mask: np.ndarray | None = None, size: int = 128) -> np.ndarray:
    """A gallery tile: ``crop`` resized to ``size`` x ``size`` with the binarized response outlined."""
    rgb = to_rgb(crop)
    if mask is not None:
        rgb = mask_overlay(rgb, mask, alpha=0.25)
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))


def label_colors(labels: Iterable[str]) -> dict[str, str]:
    """A stable colour per distinct label (sorted case-insensitively)."""
    names = sorted({str(x) for x in labels}, key=str.casefold)
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


# -- plotly ---------------------------------------------------------------------------------------

def probability_bars(probs: Mapping[str, float], prediction: str | None = None):
    """Horizontal bars of the class probabilities (the predicted class highlighted)."""
    import plotly.graph_objects as go

    names = list(probs)
    fig = go.Figure(go.Bar(x=[float(probs[n]) for n in names], y=names, orientation="h",
                           marker_color=["#CC3311" if n == prediction else "#88AACC" for n in names],
                           text=[f"{float(probs[n]):.2f}" for n in names], textposition="auto"))
    fig.update_layout(height=40 + 36 * len(names), margin=dict(l=0, r=10, t=10, b=10),
                      xaxis=dict(range=[0, 1], title=None), yaxis=dict(autorange="reversed"))
    return fig


def label_bars(values: Mapping[str, float], title: str, x_title: str, *, x_max: float | None = None):
    """One Lu & Perer report: a bar per label (text labels are plotly text, never HTML)."""
    import plotly.graph_objects as go

    names = list(values)
    colors = label_colors(names)
    fig = go.Figure(go.Bar(x=[float(values[n]) for n in names], y=[_plain(n) for n in names], orientation="h",
                           marker_color=[colors[n] for n in names],
                           text=[f"{float(values[n]):.2f}" for n in names], textposition="auto",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title=dict(text=_plain(title), font=dict(size=14)), height=90 + 30 * max(1, len(names)),
                      margin=dict(l=0, r=10, t=40, b=30),
                      xaxis=dict(title=x_title, range=[0, x_max] if x_max else None),
                      yaxis=dict(autorange="reversed"))
    return fig


def _plain(text: object) -> str:
    """Text for plotly, which renders a subset of HTML tags in labels: escape the angle brackets."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unit_scatter(coords: np.ndarray, *, labels: Mapping[int, str], iou: np.ndarray | None = None,
                 match_iou: float = 0.2, selected: Sequence[int] = (), highlight: Sequence[int] = ()):
    """The unit map (Lu & Perer): one dot per unit at its PCA position. Units whose IoU with the
    sketch exceeds ``match_iou`` are enlarged; labelled units are coloured by label; selected units
    ringed. Each point's ``customdata`` is its unit id (what a selection returns)."""
    import plotly.graph_objects as go

    xy = np.asarray(coords, dtype=np.float64)
    k = xy.shape[0]
    iou_v = np.zeros(k) if iou is None else np.asarray(iou, dtype=np.float64)
    size = np.where(iou_v > match_iou, 9 + 30 * np.clip(iou_v, 0, 1), 6)
    sel, hl = set(int(u) for u in selected), set(int(u) for u in highlight)
    colors = label_colors(labels.values())
    fig = go.Figure()
    groups: dict[str, list[int]] = {}
    for u in range(k):
        groups.setdefault(labels.get(u, ""), []).append(u)
    for name in sorted(groups, key=lambda n: (n != "", n.casefold())):
        ids = groups[name]
        fig.add_trace(go.Scattergl(
            x=xy[ids, 0], y=xy[ids, 1], mode="markers", name=_plain(name) if name else "unlabelled",
            customdata=[[int(u)] for u in ids],
            text=[f"unit {u}" + (f" - {_plain(name)}" if name else "")
                  + (f" - IoU {iou_v[u]:.2f}" if iou is not None else "") for u in ids],
            hovertemplate="%{text}<extra></extra>",
            marker=dict(size=size[ids], color=colors.get(name, UNLABELLED), opacity=0.85 if name else 0.55,
                        line=dict(width=[3 if u in sel else (2 if u in hl else 0) for u in ids],
                                  color=["#000000" if u in sel else "#CC3311" for u in ids]))))
    fig.update_layout(height=420, margin=dict(l=0, r=0, t=10, b=0), legend=dict(orientation="h", y=-0.08),
                      xaxis=dict(title="PC 1", zeroline=False), yaxis=dict(title="PC 2", zeroline=False),
                      dragmode="select", clickmode="event+select")
    return fig


# -- the Evaluate page ----------------------------------------------------------------------------

def metric_interval_bars(rows: Sequence[Mapping], metric: str, names: Mapping[str, str] | None = None):
    """One bar per method: the mean of ``metric`` with its interval (``lo``..``hi``) as whiskers, best
    first; baselines grey, after the methods (rows as :func:`ui.evaluate.summary_rows` gives them)."""
    import plotly.graph_objects as go

    names = names or {}
    keep = [r for r in rows if r["metric"] == metric and np.isfinite(float(r["mean"]))]
    keep.sort(key=lambda r: (bool(r["baseline"]), -float(r["mean"])))
    x = [_plain(names.get(r["method"], r["method"])) for r in keep]
    y = [float(r["mean"]) for r in keep]
    fig = go.Figure(go.Bar(
        x=x, y=y, marker_color=["#B0B0B0" if r["baseline"] else "#3366AA" for r in keep],
        error_y=dict(type="data", symmetric=False, array=[float(r["hi"]) - float(r["mean"]) for r in keep],
                     arrayminus=[float(r["mean"]) - float(r["lo"]) for r in keep]),
        text=[f"{v:.2f}" for v in y], textposition="inside",
        hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=dict(text=_plain(metric), font=dict(size=14)), height=280,
                      margin=dict(l=0, r=10, t=40, b=10), yaxis=dict(range=[0, 1.05]))
    return fig


def pr_lines(curves: Mapping[str, np.ndarray], recall: np.ndarray, names: Mapping[str, str] | None = None,
             baselines: Iterable[str] = ()):
    """Mean precision-recall curve per method (baselines grey and dashed)."""
    import plotly.graph_objects as go

    names, base = names or {}, set(baselines)
    fig = go.Figure()
    for m, prec in curves.items():
        fig.add_trace(go.Scatter(x=np.asarray(recall), y=np.asarray(prec), mode="lines",
                                 name=_plain(names.get(m, m)),
                                 line=dict(dash="dash", color="#999999") if m in base else dict()))
    fig.update_layout(height=360, margin=dict(l=0, r=10, t=30, b=10), title=dict(text="Mean PR curves",
                      font=dict(size=14)), xaxis=dict(title="recall", range=[0, 1]),
                      yaxis=dict(title="precision", range=[0, 1.02]),
                      legend=dict(orientation="h", y=-0.3, font=dict(size=10)))
    return fig
