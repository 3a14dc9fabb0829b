"""Explain: upload or pick an image; prediction, CAMs, class probability map, influential units,
the DeepMiner explanation, the Lu & Perer reports, and the suspicious patches of a whole image."""
from __future__ import annotations

import streamlit as st

from deepminer.options import MAX_ABLATE
from ui import logic, render, state, studies

MAX_H, MAX_W = 560, 470  # the main image: legible, and inside its column in a 1280 x 800 window
K = state.Keys

st.title("Explain")

# -- choose an image ------------------------------------------------------------------------------


def _on_upload() -> None:
    f = st.session_state.get(K.UPLOAD)
    if f is not None:
        state.set_image(f.name, f.getvalue(), upload=True)


def _on_sample() -> None:
    name = st.session_state.get(K.SAMPLE)
    for s in state.samples():
        if s["name"] == name:
            with open(s["path"], "rb") as fh:
                state.set_image(s["name"], fh.read())


def _on_recent() -> None:
    name = st.session_state.get(K.RECENT)
    for r in state.recent():
        if r.name == name:
            state.set_image(r.name, r.data)


c_up, c_sample, c_recent = st.columns([2, 1, 1])
c_up.file_uploader("Upload a mammogram (PNG, JPEG, TIFF or DICOM)", key=K.UPLOAD, on_change=_on_upload,
                   help="8- or 16-bit grey; DICOM with or without the .dcm extension.")
c_sample.selectbox("...or pick a sample", [s["name"] for s in state.samples()], index=None, key=K.SAMPLE,
                   on_change=_on_sample, placeholder="phantom test images")
c_recent.selectbox("...or a recent upload", [r.name for r in state.recent()], index=None, key=K.RECENT,
                   on_change=_on_recent, placeholder="this session's uploads")

ref = state.image()
if ref is None:
    st.info("Upload an image or pick a sample to see what the model sees.")
    st.stop()

state.prefetch(ref)  # decoding (a worker thread) runs while the model server explains
result = state.timed_explain(ref.data)
img = state.decoded(ref)
if img is None:
    st.stop()
view = img.preview  # everything drawn on the page is drawn from this copy (long side <= 1024)
if isinstance(result, state.Failure):
    state.show_failure(result)
    st.stop()

key = state.current_key(result)
labels = state.store().labels_for(key.name, key.weights_hash) if key else {}
classes = result.classes
atlas = state.atlas()

# -- prediction, CAM and probability map ----------------------------------------------------------
st.caption(f"{render.md_escape(ref.name)} · {img.shape[1]} x {img.shape[0]} px · explained in "
           f"{state.session().explain_ms:.0f} ms")
if ids := state.patient_identifiers(ref.data):  # only with DEEPMINER_SHOW_PATIENT_IDS=1 (off by default)
    st.caption("Patient: " + " · ".join(f"{k} {render.md_escape(v)}" for k, v in ids.items()))
if banner := logic.domain_banner(result.model, result.domain):
    st.error(banner, icon="⚠️")
left, right = st.columns([3, 2], gap="medium")
with right:
    st.subheader(f"Prediction: {result.prediction} ({result.probabilities[result.prediction]:.2f})")
    st.caption(logic.trained_on_note(result.model))
    st.caption(logic.scale_note(result))
    st.markdown("**DeepMiner explanation**")
    st.text(logic.explanation(result, labels)["sentence"])
    st.plotly_chart(render.probability_bars(result.probabilities, result.prediction), key="probs")
    # keyed per image: a new image starts at its own prediction, a choice holds while the image stays
    prob_class = st.radio("Class probability map", classes, index=classes.index(result.prediction),
                          horizontal=True, key=K.of_image(K.PROB_CLASS, ref))
    pmap = render.heat_overlay(render.fit(view, 512), result.class_maps[classes.index(prob_class)], vmin=0, vmax=1,
                               alpha=0.5)
    st.image(pmap, caption=f"P({prob_class}) per position (blue 0, red 1)",
             width=int(min(360, 360 * pmap.shape[1] / pmap.shape[0])), output_format="JPEG")

patches = logic.suspicious_patches(result.class_maps, view, classes, shape=img.shape)
with left:
    cam_class = st.radio("CAM of class", classes, index=classes.index(result.prediction), horizontal=True,
                         key=K.of_image(K.CAM_CLASS, ref))
    base = render.fit(view, 2 * MAX_W)
    shown = render.heat_overlay(base, result.cam[classes.index(cam_class)])
    chosen = state.session().patch_pick
    if patches:
        f = base.shape[0] / img.shape[0]
        sel = chosen if chosen is not None and chosen < len(patches) else None
        shown = render.draw_boxes(shown, [[v * f for v in p.box] for p in patches],
                                  labels=[str(i + 1) for i in range(len(patches))], highlight=sel)
    st.image(shown, caption=f"CAM of {cam_class}" + (" · suspicious patches outlined" if patches else ""),
             width=int(min(MAX_W, MAX_H * shown.shape[1] / shown.shape[0])), output_format="JPEG")
    st.page_link("views/evaluate.py", label="Evaluate this map against your outline", icon=":material/fact_check:")
    if studies.is_dicom(ref.data):  # SEG + SR + SC, made when the button is clicked (docs/dicom.md)
        _atlas = state.atlas()  # its thresholds cut the units' masks as the atlas does
        st.download_button("DICOM results (SEG, SR, SC)",
                           data=studies.dicom_zip_maker(ref.data, result, labels,
                                                        None if _atlas is None else _atlas.thresholds),
                           file_name=f"{ref.name.rsplit('.', 1)[0]}-deepminer-dicom.zip", mime="application/zip",
                           on_click="ignore", icon=":material/download:",
                           help="a Segmentation (CAM + top units), a Structured Report and a Secondary Capture, "
                                "marked as unverified AI results, filed with the source's study")

# -- suspicious patches ---------------------------------------------------------------------------
if patches:
    st.subheader("Suspicious patches")
    rows = [{"#": i + 1, "P(malignant)": round(p.score, 3), "where": p.name} for i, p in enumerate(patches)]
    ev = st.dataframe(rows, key=K.of_image(K.PATCHES_TABLE, ref), on_select="rerun", selection_mode="single-row",
                      hide_index=True, width=420)
    picked = ev.selection.rows[0] if ev and ev.selection.rows else None
    if picked is not None and picked >= len(patches):
        picked = None
    if picked != state.session().patch_pick:
        state.session().patch_pick = picked
        st.rerun()
    if picked is not None:
        p = patches[picked]
        c1, c2 = st.columns([1, 3])
        crop = img.pixels[p.box[1]:p.box[3], p.box[0]:p.box[2]]
        c1.image(render.to_rgb(render.fit(crop, 440)), caption=f"patch {picked + 1}", width=220,
                 output_format="JPEG")
        if c2.button("Sketch on this patch", key="to_sketch"):
            state.set_patch(p.box)
            st.switch_page("views/sketch.py")

# -- influential units and the explanations -------------------------------------------------------
st.subheader(f"Most influential units for {result.prediction}")
rows = logic.top_unit_rows(result, result.prediction, labels)
tiles, caps = [], []
small = render.fit(view, 256)
for r in rows:
    m = result.unit_maps.get(r["unit"])
    if m is None:
        continue
    tiles.append(render.heat_overlay(small, m, alpha=0.55))
    caps.append(f"unit {r['unit']}" + (f" · {r['label']}" if r["label"] else ""))
if tiles:
    st.image(tiles, caption=caps, width=140, output_format="JPEG")
st.dataframe(rows, hide_index=True, key="top_units_table")

# -- what if a label's units were quiet? ----------------------------------------------------------
st.subheader("Silence a label's units")
label_names = sorted(set(labels.values()))
if not label_names:
    st.info("No unit of this model carries a label yet: label units on the Sketch & label or Unit atlas pages, "
            "then silence them here.")
else:
    silence = st.selectbox("Silence the units labelled", label_names, index=None, key=K.of_image("silence_label", ref),
                           placeholder="choose one of your labels",
                           help="Those units' activations set to zero and the model's head run again on this "
                                "image's cached unit maps (no second forward pass).")
    if silence is not None:
        state.show_ablation(ref.data, logic.units_with_label(labels, silence)[:MAX_ABLATE], view,
                            K.of_image("silenced", ref))

sess = state.session()
sketch_result = sess.sketch_result if sess.sketch_on((ref.digest, None)) is not None else None
report = logic.label_report_rows(result, labels, sketch_result=sketch_result)
st.subheader("Reports by label (Lu & Perer)")
if not report:
    st.info("No unit carries a label yet: label units on the Sketch & label or Unit atlas pages.")
else:
    b1, b2 = st.columns(2)
    b1.plotly_chart(render.label_bars({r["label"]: r["activation"] for r in report},
                                      "Activation value", "mean max activation of the label's units"),
                    key="bars_activation")
    ious = {r["label"]: r["iou"] for r in report if r["iou"] is not None}
    if ious:
        b2.plotly_chart(render.label_bars(ious, "Activation area", "mean IoU with your sketch", x_max=1.0),
                        key="bars_iou")
    else:
        b2.info("Draw a sketch on the Sketch & label page to see the mean IoU per label.")
