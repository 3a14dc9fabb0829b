"""The DeepMiner Studio workbench (Streamlit): ``app.py`` + one file per page in ``pages/``;
``state`` (session and cached resources), ``logic`` (what pages compute), ``render`` (pictures)."""
