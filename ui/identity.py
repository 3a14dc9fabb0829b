"""Who is at the workbench: the annotator stored with every label (the signed-in user in the lab
profile, else the name typed in the sidebar), and the patient identifiers a DICOM shows only when the
lab turns them on."""
from __future__ import annotations

import streamlit as st

from ui.models import base_settings
from ui.render import md_escape
from ui.session import Keys


def signed_in_user() -> str:
    """Lab profile (``DEEPMINER_USER_HEADER`` set): the user the sign-in proxy put in that header
    ('' when absent: the workbench was reached around the proxy). The proxy sets the header itself,
    replacing any a browser sent."""
    header = base_settings().user_header
    if not header:
        return ""
    try:
        return str(st.context.headers.get(header) or "").strip()[:100]
    except Exception:  # noqa: BLE001 - no request context (AppTest, a script run without a browser)
        return ""


def annotator() -> str:
    """Who labels: the signed-in user in the lab profile, else the name typed in the sidebar."""
    if base_settings().user_header:
        return signed_in_user()
    return str(st.session_state.get(Keys.ANNOTATOR, "")).strip()


def annotator_box() -> None:
    """The sidebar field where a person enters their name once per session; in the lab profile, who
    is signed in (no box: the name comes from the sign-in)."""
    if base_settings().user_header:
        user = signed_in_user()
        # /signout: the lab proxy's sign-in service (serve/auth.py) ends the session
        st.sidebar.caption(f"Signed in as **{md_escape(user)}** · [Sign out](/signout)" if user
                           else "Not signed in: open the workbench through the lab's sign-in address.")
        return
    st.sidebar.text_input("Your name (stored with every label)", key=Keys.ANNOTATOR, max_chars=100,
                          placeholder="e.g. Dr. Lee")


def require_annotator() -> str | None:
    """The annotator's name, or None after telling the person to enter it (or to sign in)."""
    name = annotator()
    if not name:
        if base_settings().user_header:
            st.warning("Not signed in: labels are stored with the signed-in user; open the workbench through "
                       "the lab's sign-in address.")
        else:
            st.warning("Enter your name in the sidebar first: every label is stored with its annotator.")
        return None
    return name


#: the DICOM attributes that identify a patient or a study, shown only when the lab turns them on
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


def patient_identifiers(data: bytes) -> dict[str, str]:
    """``{attribute: value}`` of :data:`PATIENT_TAGS` in a DICOM, only with
    ``DEEPMINER_SHOW_PATIENT_IDS`` on (empty otherwise, and for other formats or unreadable headers)."""
    if not base_settings().show_patient_ids or data[128:132] != b"DICM":
        return {}
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
    except Exception:  # noqa: BLE001 - a header pydicom cannot read shows no identifiers
        return {}
    return {t: str(ds.get(t, "")) for t in PATIENT_TAGS if str(ds.get(t, "") or "").strip()}
