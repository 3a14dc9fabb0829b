"""Labels: every label with annotator, time and history; agreement between annotators; export and
import as CSV and JSON."""
from __future__ import annotations

import streamlit as st

from deepminer.errors import DeepMinerError
from ui import render, state

st.title("Labels")
store = state.store()
key = state.current_key()
models = store.models()
if key is not None and (key.name, key.weights_hash) not in models:
    models.insert(0, (key.name, key.weights_hash))
if not models:
    st.info("No labels yet. Label units on the Sketch & label or Unit atlas pages, or import a file below.")
else:
    default = models.index((key.name, key.weights_hash)) if key is not None else 0
    model, weights = st.selectbox("Model", models, index=default, key="labels_model",
                                  format_func=lambda m: f"{m[0]} @ {m[1][:12]}"
                                  + (" (served now)" if key and m == (key.name, key.weights_hash) else ""))

    current = store.current(model, weights)
    st.subheader(f"Current labels ({len({r.unit for r in current})} units)")
    st.dataframe([{"unit": r.unit, "label": r.label, "annotator": r.annotator,
                   "time (UTC)": r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                   "recognizable": "" if r.recognizable is None else ("yes" if r.recognizable else "no"),
                   "BI-RADS category": r.birads_category, "association": r.cancer_association,
                   "confidence": r.confidence, "description": r.description} for r in current],
                 hide_index=True, key="current_table")

    st.subheader("Agreement between annotators")
    agr = store.agreement(model, weights)
    multi = [a for a in agr.values() if a.annotators >= 2]
    if multi:
        mean = sum(a.pairwise for a in multi) / len(multi)
        st.caption(f"{len(multi)} unit(s) labelled by two or more annotators; mean pairwise agreement {mean:.2f}.")
    st.dataframe([{"unit": a.unit, "annotators": a.annotators, "majority label": a.majority,
                   "share agreeing": round(a.share, 2),
                   "pairwise agreement": None if a.pairwise is None else round(a.pairwise, 2),
                   "labels": "; ".join(f"{n}: {lab}" for n, lab in a.labels.items())} for a in agr.values()],
                 hide_index=True, key="agreement_table")

    st.subheader("History")
    units = sorted({r.unit for r in store.history(model, weights)})
    unit = st.selectbox("Unit", [None, *units], key="history_unit",
                        format_func=lambda u: "all units" if u is None else f"unit {u}")
    hist = store.history(model, weights, unit=unit)
    st.dataframe([{"time (UTC)": r.created_at.strftime("%Y-%m-%d %H:%M:%S"), "unit": r.unit,
                   "label": r.label or "(cleared)", "annotator": r.annotator, "source": r.source,
                   "recognizable": "" if r.recognizable is None else ("yes" if r.recognizable else "no"),
                   "description": r.description} for r in reversed(hist)],
                 hide_index=True, key="history_table")

# -- export / import ------------------------------------------------------------------------------
st.subheader("Export and import")
e1, e2, e3 = st.columns([1, 1, 2])
everything = e3.checkbox("Export every model's labels", key="export_all", value=not models)
sel = (None, None) if everything or not models else (model, weights)
e1.download_button("Download CSV", store.export_csv(*sel), file_name="deepminer-labels.csv", mime="text/csv",
                   key="dl_csv")
e2.download_button("Download JSON", store.export_json(*sel), file_name="deepminer-labels.json",
                   mime="application/json", key="dl_json")

if state.base_settings().user_header:  # lab profile: a file could carry labels under other people's names
    st.caption("Import is off in the lab profile: every label here is given by the person signed in. An "
               "administrator imports on the server (`LabelStore.import_csv` / `import_json`).")
    st.stop()
with st.form("import_form", clear_on_submit=True):
    up = st.file_uploader("Import labels (a CSV or JSON export; nothing is imported if any row is invalid)",
                          type=["csv", "json"], key="import_file")
    go = st.form_submit_button("Import")
if go:
    if up is None:
        st.error("Choose a CSV or JSON file first.")
    else:
        data = up.getvalue()
        try:
            if up.name.lower().endswith(".json"):
                n = store.import_json(data, up.name)
            else:
                n = store.import_csv(data, up.name)
        except DeepMinerError as err:
            st.error(f"Nothing imported: {render.md_escape(err)}")
        else:
            st.success(f"Imported {n} new label event(s) from {render.md_escape(up.name)}"
                       + (" (all were already here)." if n == 0 else "."))
