"""Sketch & label (Lu & Perer): draw a region on the image or a patch, see the units whose masks
overlap it, inspect them, and label several at once."""
from __future__ import annotations

import numpy as np
import streamlit as st

from deepminer.explain.sketch import MATCH_IOU
from ui import logic, render, state, widgets
from ui.widgets import MODES

CANVAS_MAX = (420, 560)  # width, height in CSS pixels: fits the left column of a 1280 x 800 window
K = state.Keys

st.title("Sketch & label")
ref = state.image()
if ref is None:
    st.info("Choose an image on the Explain page first.")
    st.page_link("views/explain.py", label="Go to Explain", icon=":material/image_search:")
    st.stop()
state.prefetch(ref)  # decoding (a worker thread) runs while the model server explains
with st.spinner("Explaining the image..."):
    whole = state.explain(ref.data)
img = state.decoded(ref)
if img is None:
    st.stop()
sess = state.session()
if isinstance(whole, state.Failure):
    state.show_failure(whole)
    st.stop()
if banner := logic.domain_banner(whole.model, whole.domain):
    st.error(banner, icon="⚠️")

# -- what to sketch on: the image or one of its suspicious patches --------------------------------
patches = logic.suspicious_patches(whole.class_maps, img.preview, whole.classes, shape=img.shape)
names: dict = {state.WHOLE: f"Whole image ({ref.name})"}
names.update({p.box: f"Patch {i + 1}: P(malignant) {p.score:.2f}, {p.name}" for i, p in enumerate(patches)})
cur = state.patch()
if cur is not None and cur not in names:
    names[cur] = f"Patch x {cur[0]}-{cur[2]}, y {cur[1]}-{cur[3]}"
tkey = K.of_image(K.TARGET, ref)
if st.session_state.get(tkey) not in names:
    st.session_state[tkey] = state.WHOLE if cur is None else cur
choice = st.selectbox("Sketch on", list(names), key=tkey, format_func=names.get)
box = None if choice == state.WHOLE else choice
state.set_patch(box, from_widget=True)
if box is None:
    t_pixels, t_bytes, t_view = img.pixels, ref.data, img.preview
else:
    t_pixels, t_bytes = img.pixels[box[1]:box[3], box[0]:box[2]], logic.crop_png(img.pixels, box)
    t_view = render.fit(t_pixels, state.PREVIEW_SIDE)  # what is drawn (never the full resolution)
target_id = (ref.digest, box)

key = state.current_key(whole)
store = state.store()
labels = store.labels_for(key.name, key.weights_hash) if key else {}
atlas = state.atlas()

# -- the canvas -----------------------------------------------------------------------------------
left, right = st.columns([5, 4], gap="medium")
with left:
    h, w = t_pixels.shape[:2]
    sent, mask = widgets.draw_mask(t_view, (h, w), tools=tuple(MODES), tool_label="Tool", tool_key=K.TOOL,
                                   tool_help="Rectangle: drag. Free draw: paint over the region. Polygon: click the "
                                             "corners, then click the first one again to close it.",
                                   key=K.canvas(ref, box), rgb=(255, 60, 60), max_size=CANVAS_MAX, brush=18)
    if sent:  # the canvas sent its drawing layer: it is the sketch (or an empty one)
        sess.set_sketch(mask, target_id)
    sketch = sess.sketch_on(target_id)
    st.caption("Draw the region you care about; units whose binarized maps overlap it (IoU > "
               f"{MATCH_IOU}) are enlarged on the unit map.")

result = None
if sketch is not None:
    with st.spinner("Comparing your sketch with every unit..."):
        result = state.explain(t_bytes, sketch=sketch, unit_maps="all")
    if isinstance(result, state.Failure):
        state.show_failure(result)
        result = None
    else:
        sess.sketch_result = result
else:
    with st.spinner("Explaining..."):
        result = state.explain(t_bytes, unit_maps="all")
    if isinstance(result, state.Failure):
        state.show_failure(result)
        result = None

thresholds = atlas.thresholds if atlas is not None else None
iou = result.sketch_iou if result is not None and sketch is not None else None

# -- units ranked by IoU --------------------------------------------------------------------------
with right:
    if iou is None:
        st.info("Draw a rectangle, a free shape or a polygon on the image to rank the units by IoU.")
    else:
        ranked = logic.rank_by_iou(iou, labels)
        n_match = int((np.asarray(iou) > MATCH_IOU).sum())
        st.subheader(f"Units ranked by IoU: {n_match} above {MATCH_IOU}")
        st.dataframe([{"unit": r.unit, "IoU": round(r.iou, 3), "match": "yes" if r.matches else "",
                       "label": r.label} for r in ranked], hide_index=True, key="ranked_table", height=260)
        if thresholds is not None:
            small = render.fit(t_view, 160)
            with_sketch = render.mask_overlay(small, sketch, color=(60, 160, 255), alpha=0.2)
            tiles, caps = [], []
            for r in ranked[:6]:
                m = logic.unit_mask_on(result, r.unit, thresholds, small.shape[:2])
                if m is not None:
                    tiles.append(render.mask_overlay(with_sketch, m))
                    caps.append(f"unit {r.unit} · IoU {r.iou:.2f}")
            if tiles:
                st.image(tiles, caption=caps, width=int(min(120, 150 * small.shape[1] / small.shape[0])),
                         output_format="JPEG")
                st.caption("Red: the unit's binarized response; blue: your sketch.")
        # -- what if the matching units were quiet? ---------------------------------------------
        matching = logic.matching_unit_ids(iou)
        if matching and st.toggle(f"Silence the {len(matching)} matching unit(s)", key=K.of_image("sk_silence", ref),
                                  help="Their activations set to zero, the model's head run again on this image's "
                                       "cached unit maps (no second forward pass)."):
            state.show_ablation(t_bytes, matching, t_view, K.of_image("sk_silenced", ref))

# -- the unit map ---------------------------------------------------------------------------------
st.subheader("Unit map")


def _on_select() -> None:
    ev = st.session_state.get(K.UNIT_MAP)
    pts = (ev or {}).get("selection", {}).get("points", []) if isinstance(ev, dict) else \
        (ev.selection.points if ev else [])
    ids = []
    for p in pts:
        cd = p.get("customdata")
        if cd is not None:
            ids.append(int(cd[0] if isinstance(cd, (list, tuple)) else cd))
    if ids:
        st.session_state[K.LABEL_UNITS] = sorted(set(ids))
        st.session_state[K.INSPECT_UNIT] = ids[0]


def _select_matching() -> None:
    st.session_state[K.LABEL_UNITS] = [r.unit for r in logic.rank_by_iou(iou, labels, top=len(iou)) if r.matches]


num_units = atlas.num_units if atlas is not None else (len(result.unit_max) if result is not None else 0)
selected = [int(u) for u in st.session_state.get(K.LABEL_UNITS, [])]
m1, m2 = st.columns([3, 2], gap="medium")
with m1:
    if atlas is None:
        st.warning(state.atlas_problem() or "No unit atlas.")
    else:
        fig = render.unit_scatter(atlas.unit_coords, labels=labels, iou=iou, selected=selected,
                                  match_iou=MATCH_IOU)
        st.plotly_chart(fig, key=K.UNIT_MAP, on_select=_on_select, selection_mode=("points", "box", "lasso"))
        st.caption("Each dot is a unit (PCA of its max activations over the reference set). Bigger: matches "
                   "your sketch. Colour: its label. Click or lasso units to select them.")
        if iou is not None and bool((np.asarray(iou) > MATCH_IOU).any()):
            st.button("Select the matching units", on_click=_select_matching, key=K.SELECT_MATCHING)

# -- inspect one unit -----------------------------------------------------------------------------
with m2:
    options = list(range(num_units))
    if K.INSPECT_UNIT not in st.session_state and selected:
        st.session_state[K.INSPECT_UNIT] = selected[0]
    unit = st.selectbox("Inspect unit", options, index=None, key=K.INSPECT_UNIT, placeholder="click a unit or pick one",
                        format_func=lambda u: f"unit {u}" + (f" - {labels[u]}" if u in labels else ""))
    if unit is not None:
        if result is not None and thresholds is not None:
            t_320 = render.fit(t_view, 320)
            m = logic.unit_mask_on(result, unit, thresholds, t_320.shape[:2])
            amap = result.unit_maps.get(int(unit))
            if amap is not None:
                heat = render.heat_overlay(t_320, amap, alpha=0.45)
                st.image(render.mask_overlay(heat, m, alpha=0.0), width=300, output_format="JPEG",
                         caption=f"unit {unit} on this image (outline: above its threshold)")
        if atlas is not None:
            try:
                with st.spinner("Rendering top-activating patches..."):
                    gallery = atlas.render_topk(int(unit), state.atlas_data_root(), size=128, k=8)
                st.image([render.tile(c, m) for c, m in gallery], width=110,
                         caption=[f"#{i + 1}" for i in range(len(gallery))], output_format="JPEG")
                st.caption("Top-activating reference patches; red outline: the unit's binarized response.")
            except Exception as err:  # noqa: BLE001 - a missing reference image must not break the page
                st.warning(f"Cannot show the gallery: {render.md_escape(err)}")

# -- label the selected units ---------------------------------------------------------------------
st.subheader("Label units")
if key is None:
    st.warning("The model's weights hash is unknown (no atlas and the server sent none): labels cannot be stored.")
    st.stop()
with st.form("label_form", clear_on_submit=False, border=True):
    c1, c2 = st.columns([3, 2])
    chosen = c1.multiselect("Units", options=list(range(num_units)), key=K.LABEL_UNITS,
                            format_func=lambda u: f"unit {u}" + (f" (IoU {iou[u]:.2f})" if iou is not None else "")
                            + (f" - {labels[u]}" if u in labels else ""))
    concept = c2.selectbox("Concept (BI-RADS term, an existing label, or type a new one)",
                           logic.label_options(store.vocabulary()), index=None, accept_new_options=True,
                           key=K.LABEL_CONCEPT, placeholder="choose or type")
    submitted = st.form_submit_button("Label the selected units", type="primary")
if submitted:
    name = state.require_annotator()
    if name is not None:
        if not chosen:
            st.error("Select at least one unit (click them on the unit map or pick them above).")
        elif not concept or not str(concept).strip():
            st.error("Choose a concept or type a new one.")
        else:
            try:
                recs = store.set_labels(key.name, key.weights_hash, chosen, str(concept), name)
            except Exception as err:  # noqa: BLE001 - InputError or a database error: say it, keep the page
                st.error(f"Not saved: {render.md_escape(err)}")
            else:
                state.flash(f"Labelled {len(recs)} unit(s) as \u201c{render.md_escape(recs[0].label)}\u201d "
                            f"({', '.join(str(r.unit) for r in recs)}).")
                st.rerun()
state.show_flash()

# -- the mean-IoU-per-label report ----------------------------------------------------------------
if result is not None:
    report = logic.label_report_rows(result, labels, sketch_result=result if iou is not None else None)
    if report:
        b1, b2 = st.columns(2)
        b1.plotly_chart(render.label_bars({r["label"]: r["activation"] for r in report}, "Activation value",
                                          "mean max activation of the label's units"), key="sk_bars_act")
        ious = {r["label"]: r["iou"] for r in report if r["iou"] is not None}
        if ious:
            b2.plotly_chart(render.label_bars(ious, "Activation area", "mean IoU with your sketch", x_max=1.0),
                            key="sk_bars_iou")
