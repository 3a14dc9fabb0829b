"""Which model the workbench explains with, and how it reaches it: the settings (:mod:`ui.settings`,
read once), the settings *of the model picked* in the sidebar (:func:`settings`; ``*_for(name)``
reach another, the Compare page), its client (:func:`client`: served or in-process, decided once by
:func:`deepminer.client.connect`), the models there are (:func:`served_models`) and the sidebar's
picker (:func:`model_picker`, key :attr:`ui.session.Keys.MODEL`)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import streamlit as st

from ui.render import md_escape
from ui.session import Keys, session
from ui.settings import Settings, load_settings


# -- settings -------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _settings() -> Settings:
    return load_settings()


def base_settings() -> Settings:
    """The settings as configured (``DEEPMINER_MODEL`` is the default model, the picker's first pick)."""
    return _settings()


def model_dir_for(name: str) -> Path:
    """The folder of model ``name`` (``model.pt``, ``atlas/``): ``DEEPMINER_MODEL_DIR`` for the
    default model, its sibling ``<store>/<name>`` for the others (``model_store/<name>/``)."""
    base = _settings()
    return base.model_dir if name == base.model else base.model_dir.parent / name


def settings_for(name: str) -> Settings:
    """The settings of model ``name``: its name and folder, the rest as configured."""
    base = _settings()
    return base if name == base.model else replace(base, model=name, model_dir=model_dir_for(name))


def settings() -> Settings:
    """The settings of the model picked in the sidebar (:func:`picked_model`)."""
    return settings_for(picked_model())


@st.cache_resource(show_spinner=False)
def _client(backend: str, url: str, model: str, model_dir: str, key_file: str | None, token: str | None,
            timeout: float, management_url: str | None):
    from deepminer.client import connect

    return connect(backend, url=url, model=model, model_dir=model_dir, key_file=key_file, token=token,
                   timeout=timeout, management_url=management_url)


def client_of(s: Settings):
    """The client of the model ``s`` names (:func:`deepminer.client.connect`: served or in-process, as
    ``DEEPMINER_BACKEND`` says; one per model and process, keep-alive when served)."""
    return _client(s.backend, s.serve_url, s.model, str(s.model_dir), str(s.key_file) if s.key_file else None,
                   s.token, s.timeout, s.management_url)


def client(model: str | None = None):
    """The client of the picked model (or of ``model``)."""
    return client_of(settings() if model is None else settings_for(model))


# -- the models the server hosts, the picker --------------------------------------------------------

@st.cache_data(show_spinner=False, ttl=30)
def _served_models(backend: str, url: str, model: str, model_dir: str, key_file: str | None, token: str | None,
                   timeout: float, management_url: str | None) -> tuple[tuple[str, ...], str | None]:
    """``(names, problem)``: the models the configured client reaches (TorchServe's ``GET /models``;
    in process, the model store's folders with a ``model.pt``); ``problem`` says why the list is
    unknown."""
    from deepminer.client import ServeError, ServeUnavailable

    c = _client(backend, url, model, model_dir, key_file, token, timeout, management_url)
    try:
        return tuple(c.models(timeout=5)), None
    except ServeError as err:
        return (), f"the management API at `{c.management_url}` answered {err.status}"
    except ServeUnavailable as err:
        return (), f"the management API at `{c.management_url}` is not reachable ({type(err.__cause__).__name__})"


def served_models() -> tuple[list[str], str | None]:
    """The models the server hosts (sorted) and, when that list is unknown, why (then the list holds
    just the configured model, so the pages still try it)."""
    b = _settings()
    names, problem = _served_models(b.backend, b.serve_url, b.model, str(b.model_dir),
                                    str(b.key_file) if b.key_file else None, b.token, b.timeout, b.management_url)
    if not names:
        return [b.model], problem
    return list(names), None


def picked_model() -> str:
    """The model picked in the sidebar; until one is picked (or on a page run without the app's
    sidebar) the configured ``DEEPMINER_MODEL`` when the server hosts it, else the first it hosts."""
    try:
        v = st.session_state.get(Keys.MODEL)
    except Exception:  # noqa: BLE001 - outside a script run (a worker thread): the configured model
        return _settings().model
    if v:
        return str(v)
    names, _ = served_models()
    return _settings().model if _settings().model in names else names[0]


def model_picker() -> None:
    """The sidebar's model picker over the hosted models; a one-line message when the configured (or
    linked, ``?model=``) model is not one of them."""
    names, problem = served_models()
    wanted = st.query_params.get("model")
    if Keys.MODEL not in st.session_state:
        first = wanted or _settings().model
        if first not in names:
            st.sidebar.error(f"The server does not host model `{md_escape(first)}`; it serves "
                             f"{', '.join(f'`{md_escape(n)}`' for n in names)}.")
        st.session_state[Keys.MODEL] = first if first in names else names[0]
    elif st.session_state[Keys.MODEL] not in names:
        st.sidebar.error(f"Model `{md_escape(st.session_state[Keys.MODEL])}` is no longer served; "
                         f"picked `{md_escape(names[0])}`.")
        st.session_state[Keys.MODEL] = names[0]
    st.sidebar.selectbox("Model", names, key=Keys.MODEL, on_change=_model_changed,
                         help="Every page explains with this model; labels are kept per model (weights hash).")
    if problem:
        # (the problem names the configured URL in a code span and an HTTP status or an error class: no
        # user text, nothing to escape)
        st.sidebar.caption(f"Models: {problem}; using `{md_escape(names[0])}`.")


def _model_changed() -> None:
    """Another model: what was computed with the previous one (the sketch's explanation, the units
    picked on the Sketch page) is dropped; the image and the sketch stay."""
    session().sketch_result = None
    for key in (*Keys.PER_TARGET, *Keys.PER_MODEL):
        st.session_state.pop(key, None)
