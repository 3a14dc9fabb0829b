"""Widgets two pages share: the drawing canvas over an image (Sketch & label, Evaluate)."""
from __future__ import annotations

import numpy as np
import streamlit as st
from streamlit_drawable_canvas import st_canvas

from ui import logic, render

#: the canvas's drawing tools: label -> streamlit-drawable-canvas mode
MODES = {"Rectangle": "rect", "Free draw": "freedraw", "Polygon": "polygon"}


def draw_mask(view: np.ndarray, shape: tuple[int, int], *, tools: tuple[str, ...], tool_label: str, tool_key: str,
              tool_help: str, key: str, rgb: tuple[int, int, int], max_size: tuple[int, int],
              brush: int) -> tuple[bool, np.ndarray | None]:
    """A choice of drawing tool (``tools``: :data:`MODES` labels, the first the default) and a canvas
    over ``view`` (the image's preview) at most ``max_size`` (width, height) CSS pixels, drawing in
    colour ``rgb`` (``brush`` px wide when free drawing). Returns ``(sent, mask)``: whether the canvas
    sent its drawing layer this run, and what is drawn as a bool mask of ``shape`` (the original
    image's; None when nothing is drawn)."""
    tool = MODES[st.radio(tool_label, list(tools), horizontal=True, key=tool_key, help=tool_help)]
    h, w = shape
    scale = min(max_size[0] / w, max_size[1] / h)
    cw, ch = max(32, round(w * scale)), max(32, round(h * scale))
    st.space("small")  # room for the canvas's toolbar
    bg = render.jpeg(render.to_rgb(render.fit(view, max(cw, ch) * 2)))
    r, g, b = rgb
    canvas = st_canvas(fill_color=f"rgba({r}, {g}, {b}, 0.30)", stroke_width=3 if tool != "freedraw" else brush,
                       stroke_color=f"#{r:02x}{g:02x}{b:02x}", background_image=bg, drawing_mode=tool, width=cw,
                       height=ch, return_image_data=True, key=key)
    drawn = canvas.image_data
    return drawn is not None, (None if drawn is None else logic.canvas_mask(drawn, (h, w)))
