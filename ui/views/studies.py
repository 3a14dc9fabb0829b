"""Studies: 4-view exams from a PACS (DICOMweb: search, open, store the results back) or from four
uploaded files, hung as radiologists hang them, each view with its prediction and CAM, the exam score
per breast and whether CC and MLO agree."""
from __future__ import annotations

import streamlit as st

from deepminer.exam import RULE, SIDES, VIEWS
from deepminer.pacs import PAGE_SIZE, Pacs, PacsError, env_url
from ui import render, state, studies

EXAM = "studies_exam"  # session_state: the opened Exam
OFFSET = "studies_offset"
SOURCE = "studies_source"
PHANTOM_NOTE = ("The bundled models are trained on synthetic phantoms: on a real mammogram these scores "
                "mean nothing. Unverified AI output, not for diagnostic use.")
SIDE_NAME = {"R": "Right breast", "L": "Left breast"}

st.title("Studies")
st.caption("A 4-view exam (RCC, LCC, RMLO, LMLO) from the PACS or from four files: right views mirrored "
           "against left, CC above MLO; each view explained by the model. " + PHANTOM_NOTE)


@st.cache_resource(show_spinner=False)
def _pacs(url: str) -> Pacs:
    return Pacs(url)


def _said(err: Exception) -> str:
    """A PACS error as page text: escaped, its URL as code (an escaped URL would be linked with the
    backslashes in it)."""
    text = render.md_escape(err)
    return text.replace(render.md_escape(url), f"`{url}`") if url else text


def _describe(err: Exception) -> str:
    f = state.failure_of(err)
    return f.message if f is not None else f"{type(err).__name__}: {err}"


def _explainer():
    s, c = state.settings(), state.client()
    return lambda data: c.explain(data, max_side=s.max_side, unit_maps="top")


def _open(fetch, study_uid: str | None) -> None:
    with st.spinner(f"Opening {len(fetch)} image(s) and explaining the views..."):
        exam = studies.open_exam(fetch, _explainer(), state.settings().max_side, describe_error=_describe,
                                 study_uid=study_uid)
    st.session_state[EXAM] = exam


source = st.radio("Open an exam", ["From the PACS", "Upload four files"], horizontal=True, key=SOURCE)

url = env_url()
if source == "From the PACS":
    if url is None:
        st.info("No PACS is configured: set DEEPMINER_DICOMWEB_URL to a DICOMweb server, or start a local "
                "Orthanc with `DEEPMINER_PACS=orthanc make run`.")
    else:
        pacs = _pacs(url)
        with st.form("study_search"):
            c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
            patient = c1.text_input("Patient ID", help="substring; * and ? as wildcards")
            accession = c2.text_input("Accession number", help="substring; * and ? as wildcards")
            if c3.form_submit_button("Search studies"):
                st.session_state[OFFSET] = 0
        offset = int(st.session_state.get(OFFSET, 0))
        try:
            page = pacs.search_studies(patient_id=patient, accession=accession, limit=PAGE_SIZE, offset=offset)
        except PacsError as err:
            st.warning(f"{_said(err)}. Check DEEPMINER_DICOMWEB_URL or start the PACS "
                       "(`DEEPMINER_PACS=orthanc make run`).")
            page = None
        if page is not None:
            show_ids = getattr(state.settings(), "show_patient_ids", False)
            rows = [{"patient": (s.patient_id if show_ids else "(hidden)"),
                     "accession": (s.accession if show_ids else "(hidden)"),
                     "date": s.date, "description": s.description, "modalities": " ".join(s.modalities),
                     "images": s.instances, "study": s.uid[-12:]} for s in page.studies]
            first = offset + 1 if page.studies else 0
            st.caption(f"Studies {first}-{offset + len(page.studies)} at `{url}`"
                       + ("" if show_ids else " · patient identifiers hidden (DEEPMINER_SHOW_PATIENT_IDS=1 shows them)"))
            if not rows:
                st.info("No study matches." if (patient or accession or offset) else "The PACS holds no study yet.")
            else:
                st.dataframe(rows, hide_index=True, key=f"studies_table_{offset}")
                choices = [f"{i + 1 + offset}. {r['date'] or 'no date'} · {r['description'] or 'no description'} · "
                          f"{r['images']} image(s) · …{r['study']}" for i, r in enumerate(rows)]
                choice = st.selectbox("Study to open", choices, index=None, key=f"studies_pick_{offset}",
                                      placeholder="pick a study of this page")
                picked = choices.index(choice) if choice in choices else None
                b1, b2, b3 = st.columns([1, 1, 3])
                if b1.button("Previous page", disabled=offset == 0):
                    st.session_state[OFFSET] = max(0, offset - PAGE_SIZE)
                    st.rerun()
                if b2.button("Next page", disabled=not page.has_more):
                    st.session_state[OFFSET] = offset + PAGE_SIZE
                    st.rerun()
                if b3.button("Open as 4-view exam", type="primary", disabled=picked is None,
                             help="pick a study in the list above first"):
                    study = page.studies[picked]
                    try:
                        images = [i for i in pacs.instances(study.uid) if i.is_mammogram]
                    except PacsError as err:
                        st.warning(_said(err))
                        images = None
                    if images == []:
                        st.session_state.pop(EXAM, None)
                        st.warning("This study has no mammograms (MG/DX images) to open.")
                    elif images:
                        _open([(i.sop_uid, f"{i.laterality or '?'}{i.view or '?'} ({i.sop_uid[-8:]})",
                                lambda i=i: pacs.retrieve_bytes(i)) for i in images], study.uid)
else:
    files = st.file_uploader("Four mammograms (DICOM: laterality and view from ImageLaterality/ViewPosition, the "
                             "series' Laterality, a Patient Orientation naming the view, or a CBIS-DDSM PatientID)",
                             accept_multiple_files=True,
                             key="studies_upload")
    if st.button("Open as exam", type="primary", disabled=not files):
        _open([(f.name, f.name, lambda f=f: f.getvalue()) for f in files or []], None)

exam = st.session_state.get(EXAM)
if exam is None:
    st.stop()

# -- the exam ------------------------------------------------------------------------------------
st.divider()
if exam.problem:
    st.warning(f"This exam cannot be hung: {render.md_escape(exam.problem)}.")
for v in exam.views:
    if v.error:
        st.error(render.md_escape(v.error))
if exam.hanging is None:
    st.stop()
slotted = [ev.item for ev in exam.hanging.slots.values()]
done = [v for v in slotted if v.result is not None]
st.markdown(f"**{len(done)} of {len(slotted)} views explained** in {exam.timings.get('total_s', 0):.1f} s "
            f"(images fetched and decoded in {exam.timings.get('load_s', 0):.1f} s)")
if exam.hanging.missing:
    st.caption("Missing views: " + ", ".join(exam.hanging.missing))
for ev, why in exam.hanging.unplaced:
    st.caption(f"Not hung: {render.md_escape(ev.item.name)} ({why})")
for v in slotted:
    if v.inferred:
        st.caption(f"{v.slot_name} ({render.md_escape(v.name)}): " + "; ".join(v.inferred))

for vw in VIEWS:
    cols = st.columns(2, gap="small")
    for col, lat in zip(cols, SIDES):
        v = exam.slot(lat, vw)
        with col:
            if v is None:
                st.caption(f"{lat}{vw}: no image")
                continue
            if v.preview is None:
                st.caption(f"{lat}{vw}: could not be shown")
                continue
            if v.result is not None:
                r = v.result
                cap = f"{lat}{vw} · {r.prediction} ({r.probabilities[r.prediction]:.2f}) · CAM of {r.prediction}"
            else:
                cap = f"{lat}{vw} · not explained"
            st.image(studies.picture(v), caption=cap + (" · mirrored" if v.mirror else ""),
                     width=300, output_format="JPEG")

scores = exam.scores()
if scores:
    st.subheader("Exam score per breast")
    st.caption(f"Rule: {RULE}. {PHANTOM_NOTE}")
    st.dataframe([{"breast": SIDE_NAME[lat], "exam score": round(b.score, 3), "from view": f"{lat}{b.from_view}",
                   **{f"P(malignant) {vw}": round(b.views[vw], 3) if vw in b.views else None for vw in VIEWS},
                   "CC / MLO": b.agreement_text} for lat, b in scores.items()], hide_index=True, key="exam_scores")
    for lat, b in scores.items():
        st.text(f"{SIDE_NAME[lat]}: exam score {b.score:.2f} (max P(malignant), {lat}{b.from_view}); {b.agreement_text}")

if exam.study_uid and url is not None and done:
    if st.button("Store results to PACS", help="a Segmentation, a Structured Report and a Secondary Capture per "
                                               "explained view, marked as unverified AI results (STOW-RS)"):
        labels = {}
        key = state.current_key(done[0].result)
        if key is not None:
            labels = state.store().labels_for(key.name, key.weights_hash)
        with st.spinner("Writing SEG, SR and SC and storing them..."):
            datasets, skipped = studies.dicom_results(exam, labels, None if state.atlas() is None else state.atlas().thresholds)
            try:
                stored = _pacs(url).store(datasets, study_uid=exam.study_uid) if datasets else []
            except PacsError as err:
                stored = None
                st.error(_said(err))
        if stored is not None:
            st.success(f"Stored {len(stored)} objects (SEG, SR and SC of {len(datasets) // 3} views) in the study, "
                       "marked as unverified AI results.")
        for s in skipped:
            st.caption(f"Skipped: {render.md_escape(s)}")
