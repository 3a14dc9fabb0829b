"""Compare: the same image through two served models side by side (predictions, CAMs of the same class,
top units with their labels, DeepMiner's sentence), then their unit atlases compared (best IoU per
concept, units passing IoU >= 0.04, unit mask sizes, top-20 coverage). The numbers: :mod:`ui.compare`."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from deepminer.defaults import MIN_LABEL_IOU
from ui import compare, logic, render, state

K = state.Keys
CAM_W = 320  #: each CAM fits its half of the page in a 1280 px window

st.title("Compare two models")

names, problem = state.served_models()
if problem:
    st.caption(f"Models: {render.md_escape(problem)}.")
if len(names) < 2:
    st.info(f"The server hosts one model ({', '.join(names)}): Compare needs two. `make run` serves every "
            "model of `model_store/`.")
    st.stop()

picked = state.picked_model()
c_a, c_b = st.columns(2)
a_default = picked if picked in names else names[0]
b_default = next(n for n in names if n != a_default)
if K.COMPARE_A not in st.session_state or st.session_state[K.COMPARE_A] not in names:
    st.session_state[K.COMPARE_A] = a_default
if K.COMPARE_B not in st.session_state or st.session_state[K.COMPARE_B] not in names:
    st.session_state[K.COMPARE_B] = b_default
name_a = c_a.selectbox("Model A", names, key=K.COMPARE_A)
name_b = c_b.selectbox("Model B", names, key=K.COMPARE_B)
why = compare.pair_problem(name_a, name_b, names)
if why:
    st.warning(why)
    st.stop()


def _on_upload() -> None:
    f = st.session_state.get("compare_upload")
    if f is not None:
        state.set_image(f.name, f.getvalue(), upload=True)


st.file_uploader("Image (PNG, JPEG, TIFF or DICOM); or the one open on the Explain page", key="compare_upload",
                 on_change=_on_upload)
ref = state.image()

# -- one image, two models ------------------------------------------------------------------------
if ref is None:
    st.info("Upload an image (or open one on the Explain page) to see it through both models.")
else:
    state.prefetch(ref)
    with st.spinner(f"Explaining with {name_a} and {name_b}..."):
        res_a = state.explain(ref.data, model=name_a)
        res_b = state.explain(ref.data, model=name_b)
    img = state.decoded(ref)
    fails = [(n, r) for n, r in ((name_a, res_a), (name_b, res_b)) if isinstance(r, state.Failure)]
    for n, f in fails:
        st.error(f"{n}: {f.message}")
    if img is not None and not fails:
        classes = list(res_a.classes)
        if list(res_b.classes) != classes:
            st.warning(f"The two models have different classes ({', '.join(classes)} vs "
                       f"{', '.join(res_b.classes)}): CAMs are shown for each model's own prediction.")
        cls_key = K.of_image(K.COMPARE_CLASS, ref)
        cls = st.radio("CAM of class (both models)", classes, index=classes.index(res_a.prediction),
                       horizontal=True, key=cls_key)
        st.caption(f"{render.md_escape(ref.name)} · {img.shape[1]} x {img.shape[0]} px")
        base = render.fit(img.preview, 2 * CAM_W)
        for col, name, res in zip(st.columns(2, gap="medium"), (name_a, name_b), (res_a, res_b)):
            key = state.current_key(res, model=name)
            labels = state.store().labels_for(key.name, key.weights_hash) if key else {}
            show = cls if cls in res.classes else res.prediction
            side = compare.model_column(res, labels, show)
            with col:
                st.subheader(f"{name}: {side['prediction']} ({side['probabilities'][side['prediction']]:.2f})")
                st.caption(logic.trained_on_note(res.model) + (f" · labels of {key.short}" if key else ""))
                st.markdown("**DeepMiner explanation**")
                st.text(side["sentence"])
                st.plotly_chart(render.probability_bars(side["probabilities"], side["prediction"]),
                                key=f"compare_probs_{name}")
                cam = render.heat_overlay(base, res.cam[res.class_index(show)])
                st.image(cam, caption=f"{name}: CAM of {show}", width=CAM_W, output_format="JPEG")
                st.markdown(f"**Top units for {show}**")
                st.dataframe(side["units"], hide_index=True, key=f"compare_units_{name}")

# -- the two atlases ------------------------------------------------------------------------------
st.header("The atlases compared")
atl_a, atl_b = state.atlas(name_a), state.atlas(name_b)
for n, a in ((name_a, atl_a), (name_b, atl_b)):
    if a is None:
        st.warning(f"{n}: {state.atlas_problem(n) or 'no unit atlas'}")
if atl_a is None or atl_b is None:
    st.stop()
if not compare.same_references(atl_a, atl_b):
    st.caption("The two atlases were dissected over different reference sets: their numbers are not "
               "directly comparable.")

st.subheader("Concepts: the best unit of each model")
rows = compare.concept_rows(atl_a, atl_b)
if rows:
    st.caption(f"Network Dissection IoU summed over the reference patches; 'units' counts the units with "
               f"IoU >= {MIN_LABEL_IOU:g} with the concept.")
    st.dataframe([{"concept": r["concept"],
                   f"{name_a} best unit": r["a_unit"], f"{name_a} IoU": r["a_iou"], f"{name_a} units": r["a_units"],
                   f"{name_b} best unit": r["b_unit"], f"{name_b} IoU": r["b_iou"], f"{name_b} units": r["b_units"]}
                  for r in rows], hide_index=True, key="compare_concepts",
                 column_config={f"{n} IoU": st.column_config.NumberColumn(format="%.3f") for n in (name_a, name_b)})
else:
    st.info("Neither atlas was dissected over a data set with concept masks.")

st.subheader("Unit mask sizes")
st.caption("Peck et al.: the fine-tuned model's units cover smaller regions than a baseline's. ROI fraction = "
           "share of a unit's top gallery patches inside its mask; mask fraction = share of all reference "
           "patches.")
st.markdown(compare.size_verdict(atl_a, atl_b, name_a, name_b))
fig = go.Figure()
for n, a in ((name_a, atl_a), (name_b, atl_b)):
    fig.add_trace(go.Histogram(x=a.roi_fraction, name=n, opacity=0.6, xbins={"start": 0, "end": 1, "size": 0.025}))
fig.update_layout(barmode="overlay", height=260, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                  xaxis_title="ROI fraction (per unit)", yaxis_title="units")
st.plotly_chart(fig, key="compare_sizes")
st.dataframe([*compare.size_rows(atl_a, name_a), *compare.size_rows(atl_b, name_b)], hide_index=True,
             key="compare_size_table",
             column_config={k: st.column_config.NumberColumn(format="%.3f") for k in ("q25", "median", "q75", "mean")})
if atl_a.mask_fraction is None or atl_b.mask_fraction is None:
    st.caption("mask_fraction is empty for an atlas dissected before it was stored: re-run `deepminer dissect` "
               "(docs/atlas.md).")

st.subheader("Top-20 coverage per class")
st.dataframe([{"class": r["class"], f"{name_a} coverage": r["a_coverage"], f"{name_b} coverage": r["b_coverage"]}
              for r in compare.coverage_rows(atl_a, atl_b)], hide_index=True, key="compare_coverage",
             column_config={f"{n} coverage": st.column_config.NumberColumn(format="%.3f") for n in (name_a, name_b)})
