"""The DeepMiner Studio workbench (Streamlit): ``app.py`` + one file per page in ``views/`` (not
``pages/``: Streamlit also serves a ``pages/`` folder beside the main script as pages of their own, run
without ``app.py`` and its sidebar, when a page's URL is opened directly);
``state`` (session and cached resources), ``logic`` (what pages compute), ``render`` (pictures)."""
