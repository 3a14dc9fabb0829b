"""Unit atlas (the DeepMiner survey): the top 20 most influential units per class, each with its
gallery of top-activating patches, the source image of a chosen patch, and a survey form."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from deepminer.concepts import GROUPS
from deepminer.labels import ASSOCIATIONS
from ui import logic, render, state

GALLERY = 12
CATEGORIES = ["", *GROUPS, "mass density", "other"]

st.title("Unit atlas")
atlas = state.atlas()
if atlas is None:
    st.warning(state.atlas_problem() or "No unit atlas.")
    st.stop()
key = state.current_key()
if key is None:
    st.warning("The atlas does not name the model's weights: labels cannot be stored.")
    st.stop()
store = state.store()
labels = store.labels_for(key.name, key.weights_hash)

top = {c: atlas.top_units(c) for c in atlas.classes}
done, total = logic.survey_progress(top, store.surveyed_units(key.name, key.weights_hash))
st.progress(done / total if total else 0.0, text=f"{done} of {total} labelled")

cls = st.radio("Class", atlas.classes, horizontal=True, key="atlas_class",
               format_func=lambda c: f"{c} (coverage {atlas.coverage(c):.0%})" if atlas.coverage(c) is not None else c)
units = top[cls]
st.caption(f"The {len(units)} units most often among the 8 most influential of a patch predicted {cls} "
           "(DeepMiner: influence = max activation x the unit's weight for the class).")
unit = st.selectbox("Unit", units, key=f"atlas_unit_{cls}",
                    format_func=lambda u: f"unit {u}" + (f" - {labels[u]}" if u in labels else " - not labelled"))
entries = atlas.topk(unit)[:GALLERY]

g, src = st.columns([3, 2], gap="medium")
with g:
    st.subheader(f"Unit {unit}: top-activating patches")
    try:
        with st.spinner("Rendering the gallery..."):
            gallery = atlas.render_topk(int(unit), state.atlas_data_root(), size=128, k=GALLERY)
    except Exception as err:  # noqa: BLE001 - missing reference data: say so, keep the survey usable
        st.warning(f"Cannot render the gallery: {render.md_escape(err)}")
        gallery = []
    if gallery:
        st.image([render.tile(c, m) for c, m in gallery], width=120,
                 caption=[f"#{i + 1} · {e.activation:.2f}" for i, e in enumerate(entries[:len(gallery)])],
                 output_format="JPEG")
        st.caption("Red outline: where the unit's response is above its threshold.")
    sug = atlas.suggested_label(unit)
    if sug:
        st.caption(f"Network Dissection suggests: {render.md_escape(sug[0])} (IoU {sug[1]:.2f})")
with src:
    if entries:
        pick = st.selectbox("Show the source of patch", list(range(1, len(entries) + 1)), key=f"atlas_patch_{unit}")
        e = entries[pick - 1]
        root = state.atlas_data_root() or atlas.meta["data"]["folder"]
        path = Path(root) / e.image
        if path.is_file():
            px = state.pixels(state.ImageRef(e.image, path.read_bytes()))
            if px is not None:
                base = render.fit(px, 560)
                f = base.shape[0] / px.shape[0]
                st.image(render.draw_boxes(base, [[v * f for v in e.box]]), width="stretch",
                         caption=f"{e.image_id}: patch #{pick} outlined", output_format="JPEG")
        else:
            st.warning(f"{render.md_escape(path)}: reference image missing (set DEEPMINER_DATA_ROOT).")

# -- the survey -----------------------------------------------------------------------------------
st.subheader(f"Survey: unit {unit}")
mine = {r.unit: r for r in store.current(key.name, key.weights_hash, annotator=state.annotator())} \
    if state.annotator() else {}
prev = mine.get(unit)
with st.form(f"survey_{unit}"):
    rec = st.radio("Do these images show a recognizable phenomenon?", ["yes", "no"], horizontal=True,
                   index=0 if prev is None or prev.recognizable is not False else 1, key=f"sv_rec_{unit}")
    opts = logic.label_options(store.vocabulary(), [sug[0]] if sug else [])
    default_label = prev.label if prev and prev.label else None
    label = st.selectbox("Label (the phenomenon's name)", opts, key=f"sv_label_{unit}",
                         index=opts.index(default_label) if default_label in opts else None,
                         accept_new_options=True, placeholder="choose a BI-RADS term or type a new one")
    desc = st.text_area("Describe the phenomena you see", value=prev.description if prev else "",
                        key=f"sv_desc_{unit}")
    c1, c2, c3 = st.columns(3)
    cat_i = CATEGORIES.index(prev.birads_category) if prev and prev.birads_category in CATEGORIES else 0
    cat = c1.selectbox("BI-RADS category", CATEGORIES, index=cat_i, key=f"sv_cat_{unit}",
                       format_func=lambda v: v or "-")
    assoc_i = ASSOCIATIONS.index(prev.cancer_association) if prev and prev.cancer_association in ASSOCIATIONS else 0
    assoc = c2.selectbox("Association with cancer", ASSOCIATIONS, index=assoc_i, key=f"sv_assoc_{unit}",
                         format_func=lambda v: v or "-")
    conf = c3.slider("Confidence", 1, 5, value=prev.confidence if prev and prev.confidence else 3,
                     key=f"sv_conf_{unit}")
    sent = st.form_submit_button("Save the survey", type="primary")
if sent:
    name = state.require_annotator()
    if name is not None:
        recognizable = rec == "yes"
        if recognizable and not (label and str(label).strip()):
            st.error("Give the phenomenon a label (or answer 'no').")
        else:
            try:
                store.set_labels(key.name, key.weights_hash, [unit], str(label or "") if recognizable else "", name,
                                 recognizable=recognizable, description=desc, birads_category=cat,
                                 cancer_association=assoc, confidence=conf)
            except Exception as err:  # noqa: BLE001 - InputError or a database error: say it, keep the form
                st.error(f"Not saved: {render.md_escape(err)}")
            else:
                state.flash(f"Saved the survey of unit {unit}.")
                st.rerun()
state.show_flash()

# -- is influence causal? -------------------------------------------------------------------------
st.subheader("Is influence causal?")
try:
    from deepminer.atlas.ablation import load_ablation

    abl = load_ablation(atlas.path)
except Exception as err:  # noqa: BLE001 - a damaged ablation.json: say so, keep the survey usable
    st.warning(f"Cannot read the ablation results: {render.md_escape(err)}")
    abl = None
if abl is None:
    st.info("No ablation measurement for this atlas yet: run `deepminer atlas-ablation --model MODEL "
            f"--atlas {render.md_escape(atlas.path)} --data REFERENCE_DATA` (see docs/atlas.md).")
elif abl.get("model", {}).get("weights_sha256") != key.weights_hash:
    st.warning("The ablation measurement was made for other weights than this atlas's model: rerun "
               "`deepminer atlas-ablation`.")
else:
    def _rho(v: float | None) -> str:
        return "-" if v is None else f"{v:+.2f}"

    st.caption(f"Every unit silenced alone (activations set to zero) on each of the "
               f"{abl['references']['patches']} reference patches; per class, over the patches predicted as it: "
               "the Spearman rank correlation between DeepMiner's influence (max activation x weight) and the "
               f"measured drop, and how many of the top {abl['top']} units by influence are among the top "
               f"{abl['top']} by the drop in probability.")
    st.dataframe([{"class": c, "patches": e["patches"],
                   "ρ influence vs P drop": _rho(e.get("spearman_influence_prob_drop")),
                   "ρ influence vs logit drop": _rho(e.get("spearman_influence_logit_drop")),
                   "ρ atlas frequency vs P drop": _rho(e.get("spearman_frequency_prob_drop")),
                   f"top-{abl['top']} overlap": "-" if "top_overlap" not in e else f"{e['top_overlap']}/{abl['top']}"}
                  for c, e in abl["per_class"].items()], hide_index=True, key="ablation_table")
    e = abl["per_class"].get(cls, {})
    if "mean_prob_drop" in e:
        import plotly.graph_objects as go

        infl, drop = e["mean_influence"], e["mean_prob_drop"]
        fig = go.Figure(go.Scattergl(x=infl, y=drop, mode="markers", marker={"size": 5, "opacity": 0.6},
                                     customdata=list(range(len(infl))),
                                     hovertemplate="unit %{customdata}<br>influence %{x:.3g}<br>"
                                                   "P drop %{y:.3g}<extra></extra>"))
        fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                          title=f"{cls}: each unit's mean influence vs the mean drop of P({cls}) when it is silenced",
                          xaxis_title="mean influence (max activation x weight)",
                          yaxis_title=f"mean drop of P({cls})")
        st.plotly_chart(fig, key="ablation_scatter")
    elif e:
        st.caption(f"{cls}: {e.get('note', 'no data')}")
