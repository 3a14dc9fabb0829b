"""DeepMiner Studio workbench: ``streamlit run ui/app.py``.

The pages under ``st.navigation`` (one file each in ``ui/views/``); the sidebar holds the
annotator's name, the model picker (every page uses the picked model, :func:`ui.state.model_picker`)
and the model server's status. Settings: see :mod:`ui.settings`.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run ui/app.py` puts ui/ on the path, not the repo root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402 - after the sys.path line above

from ui import state  # noqa: E402 - after the sys.path line above

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="DeepMiner Studio", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page(str(HERE / "views" / "explain.py"), title="Explain", icon=":material/image_search:", default=True,
            url_path="explain"),
    st.Page(str(HERE / "views" / "sketch.py"), title="Sketch & label", icon=":material/draw:", url_path="sketch"),
    st.Page(str(HERE / "views" / "evaluate.py"), title="Evaluate", icon=":material/fact_check:",
            url_path="evaluate"),
    st.Page(str(HERE / "views" / "atlas.py"), title="Unit atlas", icon=":material/grid_view:", url_path="atlas"),
    st.Page(str(HERE / "views" / "labels.py"), title="Labels", icon=":material/label:", url_path="labels"),
    st.Page(str(HERE / "views" / "compare.py"), title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page(str(HERE / "views" / "studies.py"), title="Studies", icon=":material/view_quilt:", url_path="studies"),
]

page = st.navigation(PAGES)
state.warm_up()

with st.sidebar:
    st.markdown("### DeepMiner Studio")
    state.annotator_box()
    state.model_picker()
    st.caption(state.client().where)
    key = state.current_key()
    if key is not None:
        st.caption(f"Labels for {key.short}")

page.run()
