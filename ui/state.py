"""Session state and cached resources of the workbench: the one place pages get things from.

* resources (one per process, ``st.cache_resource``): settings, the label store, the HTTP client,
  the unit atlas, the sample images;
* per session (``st.session_state``): the annotator's name, the current image and recent uploads,
  the chosen patch, the sketch, the selected units;
* explanations go through :func:`explain`, which calls TorchServe (or the in-process engine when
  ``DEEPMINER_BACKEND=local``), caches answers per image, and turns every failure into a message
  (:class:`Failure`) instead of a traceback.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from deepminer.errors import DeepMinerError
from ui.logic import ModelKey, model_key
from ui.render import md_escape
from ui.settings import DEMO_REFERENCE, Settings, load_settings

RECENT_MAX = 5
SAMPLE_COUNT, SAMPLE_SEED, SAMPLE_SIZE = 6, 7, 1024
_ALLOWED_UPLOADS = ("png", "jpg", "jpeg", "tif", "tiff", "dcm", "dicom")


# -- resources ------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _settings() -> Settings:
    return load_settings()


def settings() -> Settings:
    return _settings()


@st.cache_resource(show_spinner=False)
def _store(url: str):
    from deepminer.labels import LabelStore

    return LabelStore(url)


def store():
    """The label store (one engine per process; SQLite WAL queues concurrent sessions)."""
    return _store(settings().labels_url)


@st.cache_resource(show_spinner=False)
def _client(url: str, model: str, key_file: str | None, token: str | None, timeout: float,
            management_url: str | None):
    from serve.client import Client

    return Client(url, model=model, key_file=key_file, token=token, timeout=timeout, management_url=management_url)


def client():
    """The HTTP client of the configured TorchServe model (one keep-alive session per process)."""
    s = settings()
    return _client(s.serve_url, s.model, str(s.key_file) if s.key_file else None, s.token, s.timeout,
                   s.management_url)


@st.cache_resource(show_spinner="Loading the unit atlas...")
def _atlas(path: str, mtime: float):
    from deepminer.atlas import Atlas

    return Atlas.load(path)


def atlas():
    """The unit atlas of the model, or None (with the reason in :func:`atlas_problem`)."""
    p = settings().atlas_path
    try:
        return _atlas(str(p), (p / "atlas.json").stat().st_mtime)
    except (OSError, DeepMinerError):
        return None


def atlas_problem() -> str | None:
    p = settings().atlas_path
    try:
        _atlas(str(p), (p / "atlas.json").stat().st_mtime)
        return None
    except OSError:
        return f"No unit atlas at {p} (build the model store with `make run`, or set DEEPMINER_MODEL_DIR)."
    except DeepMinerError as err:
        return str(err)


def atlas_data_root():
    """Where the atlas's reference images are: the setting; else where they were when dissected;
    else the demo reference phantoms that ``make run`` regenerates (a checkout moved elsewhere)."""
    if settings().data_root is not None:
        return settings().data_root
    a = atlas()
    own = Path(a.meta["data"]["folder"]) if a is not None else None
    if own is not None and own.is_dir():
        return own
    return DEMO_REFERENCE if (DEMO_REFERENCE / "manifest.csv").is_file() else None


def current_key(result=None) -> ModelKey | None:
    """The key labels of the configured model are stored under (see :func:`ui.logic.model_key`)."""
    a = atlas()
    return model_key(settings().model, a.meta if a is not None else None,
                     result.model if result is not None else None)


@st.cache_resource(show_spinner="Making sample images (phantoms)...")
def _samples(folder: str) -> list[dict]:
    from deepminer.data.dataset import read_manifest
    from deepminer.data.phantoms import generate_dataset

    root = Path(folder)
    if not (root / "manifest.csv").is_file():
        generate_dataset(root, SAMPLE_COUNT, SAMPLE_SEED, SAMPLE_SIZE)
    rows = read_manifest(root)
    return [{"name": f"{r['image_id']} ({r['label']})", "path": str(root / r["image"]), "label": r["label"]}
            for r in rows]


def samples() -> list[dict]:
    """Sample images (phantom test images): ``[{name, path, label}]``; made on first use."""
    try:
        return _samples(str(settings().samples))
    except (OSError, DeepMinerError) as err:
        st.warning(f"Sample images unavailable: {md_escape(err)}")
        return []


# -- annotator ------------------------------------------------------------------------------------

def annotator() -> str:
    return str(st.session_state.get("annotator", "")).strip()


def annotator_box() -> None:
    """The sidebar field where a person enters their name once per session."""
    st.sidebar.text_input("Your name (stored with every label)", key="annotator", max_chars=100,
                          placeholder="e.g. Dr. Lee")


def require_annotator() -> str | None:
    """The annotator's name, or None after telling the person to enter it."""
    name = annotator()
    if not name:
        st.warning("Enter your name in the sidebar first: every label is stored with its annotator.")
        return None
    return name


# -- the current image ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRef:
    name: str
    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.data).hexdigest()


def set_image(name: str, data: bytes, *, upload: bool = False) -> None:
    """Make ``data`` the current image (resets the patch, sketch and unit selection)."""
    ref = ImageRef(name, bytes(data))
    cur: ImageRef | None = st.session_state.get("image")
    if cur is not None and cur.digest == ref.digest:
        return
    st.session_state["image"] = ref
    for k in ("patch", "patch_pick", "sketch", "sketch_for", "label_units", "inspect_unit"):
        st.session_state.pop(k, None)
    if upload:
        recent = [r for r in st.session_state.get("recent", []) if r.digest != ref.digest]
        st.session_state["recent"] = [ref, *recent][:RECENT_MAX]


def image() -> ImageRef | None:
    return st.session_state.get("image")


def recent() -> list[ImageRef]:
    return list(st.session_state.get("recent", []))


@st.cache_data(show_spinner=False, max_entries=8)
def _pixels(data: bytes) -> np.ndarray:
    from deepminer.data.io import load_image

    return load_image(data).pixels


def pixels(ref: ImageRef) -> np.ndarray | None:
    """The decoded image (float [0, 1]); None after showing why it could not be read."""
    try:
        return _pixels(ref.data)
    except DeepMinerError as err:
        st.error(f"Cannot read {md_escape(ref.name)}: {md_escape(err)}")
        return None


# -- explanations ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """Why there is no explanation, in words for the page."""

    message: str
    kind: str = "error"  # error | unavailable


@st.cache_data(show_spinner=False, max_entries=16)
def _explain(data: bytes, sketch: np.ndarray | None, unit_maps: str, backend: str, top_units: int):
    s = settings()
    if backend == "local":
        from serve.client import local_explain

        return local_explain(s.model_path, data, top_units=top_units, unit_maps=unit_maps, sketch=sketch,
                             max_side=s.max_side, name=s.model)
    return client().explain(data, top_units=top_units, unit_maps=unit_maps, sketch=sketch, max_side=s.max_side)


def explain(data: bytes, *, sketch: np.ndarray | None = None, unit_maps: str = "top", top_units: int = 8):
    """The explanation of ``data`` (cached per image, sketch and options), or a :class:`Failure`."""
    from serve.client import ServeError, ServeUnavailable

    s = settings()
    try:
        return _explain(data, sketch, unit_maps, s.backend, top_units)
    except ServeUnavailable:
        return Failure(f"TorchServe is not reachable at {s.serve_url}. Start everything with `make run` "
                       "(or set DEEPMINER_SERVE_URL / DEEPMINER_BACKEND=local).", "unavailable")
    except ServeError as err:
        if err.status == 401:
            return Failure(f"TorchServe refused the request (401): set DEEPMINER_KEY_FILE to its key_file.json "
                           f"or DEEPMINER_TOKEN. ({md_escape(err.message)})")
        if err.status == 404:
            return Failure(f"TorchServe has no model {md_escape(s.model)} (404). {md_escape(err.message)}")
        if err.status >= 500:
            return Failure(f"The model server failed ({err.status} {md_escape(err.type)}): {md_escape(err.message)}")
        return Failure(f"The image was refused: {md_escape(err.message)}")
    except DeepMinerError as err:
        return Failure(md_escape(err))
    except (OSError, ValueError) as err:  # model files missing in local mode, malformed answers
        return Failure(f"{type(err).__name__}: {md_escape(err)}")


def show_failure(f: Failure) -> None:
    (st.warning if f.kind == "unavailable" else st.error)(f.message)


def timed_explain(data: bytes, **kw):
    """:func:`explain` with a spinner, recording the wall time in ``st.session_state['explain_ms']``."""
    t0 = time.perf_counter()
    with st.spinner("Explaining the image..."):
        out = explain(data, **kw)
    st.session_state["explain_ms"] = (time.perf_counter() - t0) * 1000
    return out


# -- the sketch target (whole image or a patch) ---------------------------------------------------

WHOLE = "whole image"  # the Sketch page's choice meaning "no patch" (a selectbox shows None as empty)


def target_key(ref: ImageRef) -> str:
    """Session key of the Sketch page's "Sketch on" choice for this image."""
    return f"target_{ref.digest[:12]}"


def set_patch(box: tuple[int, int, int, int] | None, *, from_widget: bool = False) -> None:
    """Sketch on ``box`` of the current image (None: the whole image); resets the sketch. Other
    pages also preset the Sketch page's choice (``from_widget=False``)."""
    box = None if box is None else tuple(int(v) for v in box)
    ref = image()
    if ref is not None and not from_widget:
        st.session_state[target_key(ref)] = WHOLE if box is None else box
    if st.session_state.get("patch") != box:
        st.session_state["patch"] = box
        for k in ("sketch", "sketch_for", "label_units", "inspect_unit"):
            st.session_state.pop(k, None)


def patch() -> tuple[int, int, int, int] | None:
    return st.session_state.get("patch")


# -- warm-up --------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _warm_up() -> threading.Thread:
    def work() -> None:
        try:
            import pandas  # noqa: F401 - tables
            import plotly.graph_objects as go

            import deepminer.atlas  # noqa: F401
            import deepminer.labels  # noqa: F401 - SQLAlchemy
            import serve.client  # noqa: F401 - requests
            from deepminer.concepts import birads_terms
            from deepminer.data.io import load_image  # noqa: F401
            from deepminer.data.tissue import tissue_mask
            from ui import render

            go.Figure(go.Bar(x=[0.0])).to_plotly_json()
            render.colorize(np.zeros((2, 2), np.float32))
            tissue_mask(np.zeros((64, 64), np.float32))
            birads_terms()
            if settings().backend == "local" and settings().model_path.is_file():
                from deepminer.models import load_model

                load_model(settings().model_path)
        except Exception:  # noqa: BLE001 - warming is best effort; the real call reports problems
            pass

    t = threading.Thread(target=work, name="deepminer-warm-up", daemon=True)
    t.start()
    return t


def warm_up() -> None:
    """Import and initialise what the first explanation needs (plotly, colour maps, tissue masks,
    the BI-RADS vocabulary) in a background thread, once per process, so the first upload is quick."""
    _warm_up()


# -- messages that survive a rerun ----------------------------------------------------------------

def flash(message: str) -> None:
    """Show ``message`` (a success) after the next rerun, e.g. once a save has redrawn the page."""
    st.session_state["flash"] = message


def show_flash() -> None:
    msg = st.session_state.pop("flash", None)
    if msg:
        st.success(msg)
