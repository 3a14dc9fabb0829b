"""Session state and cached resources of the workbench: the one place pages get things from.

* resources (one per process, ``st.cache_resource``): settings, the label store, the HTTP client,
  the unit atlas, the sample images;
* the model: the sidebar's picker (:func:`model_picker`, key :attr:`Keys.MODEL`) chooses one of the
  models the server hosts (:func:`served_models`); :func:`settings` are the settings *of the picked
  model* (its name and folder), so every page, the client, the atlas and the label key follow it;
  ``*_for(name)`` / ``model=`` reach another model (the Compare page);
* per session: one :class:`Session` object in ``st.session_state`` (the current image and recent
  uploads, the chosen patch, the sketch; :meth:`Session.new_image` / :meth:`Session.new_patch` reset
  what depends on them) and the values of the widgets, under the keys named in :class:`Keys`;
* decoded images (one per content, process-wide): decoded in a worker thread, at full resolution and
  as a preview of at most :data:`PREVIEW_SIDE` pixels that the pages draw on (:func:`decoded`);
* explanations go through :func:`explain`, which calls TorchServe (or the in-process engine when
  ``DEEPMINER_BACKEND=local``), caches answers per image, and turns every failure into a message
  (:class:`Failure`) instead of a traceback.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from deepminer.errors import DeepMinerError
from deepminer.model_folder import ATLAS_JSON, store_models
from ui.logic import ModelKey, model_key
from ui.render import md_escape
from ui.settings import DEMO_REFERENCE, Settings, load_settings

RECENT_MAX = 5
DECODED_MAX = 4  #: decoded images kept per process (a 4,500 x 3,000 image is ~58 MB decoded)
PREVIEW_SIDE = 1024  #: long side of the copy of an image the pages draw on
SAMPLE_COUNT, SAMPLE_SEED, SAMPLE_SIZE = 6, 7, 1024
_ALLOWED_UPLOADS = ("png", "jpg", "jpeg", "tif", "tiff", "dcm", "dicom")


# -- resources ------------------------------------------------------------------------------------

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
def _store(url: str):
    from deepminer.labels import LabelStore

    return LabelStore(url)


def store():
    """The label store (one engine per process; SQLite WAL queues concurrent sessions)."""
    return _store(settings().labels_url)


@st.cache_resource(show_spinner=False)
def _client(url: str, model: str, key_file: str | None, token: str | None, timeout: float,
            management_url: str | None):
    from deepminer.client import Client

    return Client(url, model=model, key_file=key_file, token=token, timeout=timeout, management_url=management_url)


def client(model: str | None = None):
    """The HTTP client of the picked model (or of ``model``; one keep-alive session per model and process)."""
    s = settings() if model is None else settings_for(model)
    return _client(s.serve_url, s.model, str(s.key_file) if s.key_file else None, s.token, s.timeout,
                   s.management_url)


# -- the models the server hosts, the picker --------------------------------------------------------

@st.cache_data(show_spinner=False, ttl=30)
def _served_models(backend: str, url: str, management_url: str | None, key_file: str | None,
                   store: str) -> tuple[tuple[str, ...], str | None]:
    """``(names, problem)``: TorchServe's ``GET /models`` (management API), or the folders of the
    model store holding a ``model.pt`` in local mode; ``problem`` says why the list is unknown."""
    if backend == "local":  # the configured model (DEEPMINER_MODEL_DIR) and its siblings with a model.pt
        found = [m.name for m in store_models(store)]
        return tuple(found), None if found else f"no model folder with a model.pt in `{store}`"
    from deepminer.client import Client, ServeError, ServeUnavailable, list_models

    c = Client(url, key_file=key_file, management_url=management_url, timeout=5)
    key = c._key("management")
    try:
        names = list_models(c.management_url, {"Authorization": f"Bearer {key}"} if key else {})
    except ServeError as err:
        return (), f"the management API at `{c.management_url}` answered {err.status}"
    except ServeUnavailable as err:
        return (), f"the management API at `{c.management_url}` is not reachable ({type(err.__cause__).__name__})"
    return tuple(names), None


def served_models() -> tuple[list[str], str | None]:
    """The models the server hosts (sorted) and, when that list is unknown, why (then the list holds
    just the configured model, so the pages still try it)."""
    b = _settings()
    names, problem = _served_models(b.backend, b.serve_url, b.management_url,
                                    str(b.key_file) if b.key_file else None, str(b.model_dir.parent))
    if b.backend == "local":  # the configured folder is the configured model, whatever its name
        names = tuple(sorted({b.model, *(n for n in names if n != b.model_dir.name)}))
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


@st.cache_resource(show_spinner="Loading the unit atlas...")
def _atlas(path: str, mtime: float):
    from deepminer.atlas import Atlas

    return Atlas.load(path)


def atlas(model: str | None = None):
    """The unit atlas of the picked model (or of ``model``), or None (the reason: :func:`atlas_problem`)."""
    p = (settings() if model is None else settings_for(model)).atlas_path
    try:
        return _atlas(str(p), (p / ATLAS_JSON).stat().st_mtime)
    except (OSError, DeepMinerError):
        return None


def atlas_problem(model: str | None = None) -> str | None:
    p = (settings() if model is None else settings_for(model)).atlas_path
    try:
        _atlas(str(p), (p / ATLAS_JSON).stat().st_mtime)
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


def current_key(result=None, model: str | None = None) -> ModelKey | None:
    """The key labels of the picked model (or of ``model``) are stored under (see
    :func:`ui.logic.model_key`)."""
    name = picked_model() if model is None else model
    a = atlas(name)
    return model_key(name, a.meta if a is not None else None, result.model if result is not None else None)


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
        st.sidebar.caption(f"Signed in as **{md_escape(user)}**" if user
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


# -- the current image ----------------------------------------------------------------------------

Box = tuple[int, int, int, int]  #: (x0, y0, x1, y1) in image pixels, x1/y1 exclusive


@dataclass(frozen=True)
class ImageRef:
    name: str
    data: bytes

    @cached_property
    def digest(self) -> str:
        """sha1 of the file (computed once: a full-field DICOM is 10-30 MB)."""
        return hashlib.sha1(self.data).hexdigest()


class Keys:
    """The keys of the widgets whose values the code reads or sets, named once. Streamlit keeps a
    widget's value under its key (everything else a session holds is in :class:`Session`). Widgets
    that belong to one image carry its digest in their key: a keyed widget ignores ``index=`` once
    its key exists, so a new image's radios and selections start afresh (at its own prediction)
    while the choices made for an image hold as long as it stays."""

    ANNOTATOR = "annotator"
    MODEL = "model"  #: the sidebar's model picker
    #: widgets whose choice follows the picked model: a new pick drops them (the Labels page's model,
    #: which starts at the picked one)
    PER_MODEL = ("labels_model",)
    COMPARE_A, COMPARE_B, COMPARE_CLASS = "compare_a", "compare_b", "compare_class"  #: the Compare page
    UPLOAD = "upload"
    SAMPLE = "sample"
    RECENT = "recent_pick"
    TOOL = "tool"
    UNIT_MAP = "unit_map"
    SELECT_MATCHING = "select_matching"
    LABEL_UNITS = "label_units"
    LABEL_CONCEPT = "label_concept"
    INSPECT_UNIT = "inspect_unit"
    #: the widgets that belong to the sketch target (the image or one of its patches): a new image or
    #: a new patch drops their values (:meth:`Session.new_image`, :meth:`Session.new_patch`)
    PER_TARGET = (LABEL_UNITS, INSPECT_UNIT)

    #: per-image widgets (key = name + the image's digest, :meth:`of_image`): the Explain page's
    #: "CAM of class" and "Class probability map" radios and its table of suspicious patches (the
    #: selected row), the Sketch page's "Sketch on" choice
    CAM_CLASS, PROB_CLASS, PATCHES_TABLE, TARGET = "cam_class", "prob_class", "patches_table", "target"

    #: the Evaluate page: the outline tool, a mask file, the explained class (per image), the peer
    #: methods, the set's source and zip upload, the set's method checkboxes, Run and Cancel
    EVAL_TOOL, EVAL_MASK, EVAL_CLASS, EVAL_PEERS = "eval_tool", "eval_mask", "eval_class", "eval_peers"
    EVAL_SOURCE, EVAL_ZIP, EVAL_SET_PEERS = "eval_source", "eval_zip", "eval_set_peers"
    EVAL_RUN, EVAL_CANCEL, EVAL_MODE = "eval_run", "eval_cancel", "eval_mode"

    @staticmethod
    def of_image(name: str, ref: ImageRef) -> str:
        """The key of widget ``name`` for the image ``ref``."""
        return f"{name}_{ref.digest[:12]}"

    @classmethod
    def canvas(cls, ref: ImageRef, box: Box | None) -> str:
        """The Sketch page's drawing canvas (one per image and patch)."""
        return f"{cls.of_image('canvas', ref)}_{box}"


@dataclass
class Session:
    """What one browser session holds besides its widgets' values; one object in
    ``st.session_state`` (:func:`session`). What depends on the image or on the sketch target is reset
    by :meth:`new_image` and :meth:`new_patch`, in one place (:meth:`_new_target`)."""

    image: ImageRef | None = None
    recent: list[ImageRef] = field(default_factory=list)  #: this session's uploads, newest first
    patch_pick: int | None = None  #: the suspicious patch picked on the Explain page (its row)
    patch: Box | None = None  #: what the Sketch page sketches on (None: the whole image)
    sketch: np.ndarray | None = None  #: bool mask of the sketch target
    sketch_for: tuple[str, Box | None] | None = None  #: the target the sketch was drawn on: (digest, box)
    sketch_result: Any = None  #: the explanation of the target with the sketch
    explain_ms: float = 0.0  #: wall time of the Explain page's last explain call
    flash: str | None = None  #: a success message to show after the next rerun
    eval_outline: np.ndarray | None = None  #: the Evaluate page's lesion outline (bool, preview size)
    eval_outline_for: str | None = None  #: the digest of the image it was drawn on
    eval_set: Any = None  #: the Evaluate page's set (:class:`ui.evaluate.EvalSet`)
    eval_run: Any = None  #: its run, carried on across reruns (:class:`ui.evaluate.SetRun`)

    def new_image(self, ref: ImageRef, *, upload: bool = False) -> bool:
        """Make ``ref`` the current image (an upload also goes first in :attr:`recent`); resets the
        patch and everything of the sketch target. False when it already was the current image."""
        if self.image is not None and self.image.digest == ref.digest:
            return False
        self.image = ref
        if upload:
            self.recent = [ref, *(r for r in self.recent if r.digest != ref.digest)][:RECENT_MAX]
        self.patch_pick = None
        self.patch = None
        self._new_target()
        return True

    def new_patch(self, box: Box | None) -> bool:
        """Sketch on ``box`` of the current image (None: the whole image); resets the sketch and the
        selected units. False when it already was the target."""
        if box == self.patch:
            return False
        self.patch = box
        self._new_target()
        return True

    def set_sketch(self, mask: np.ndarray | None, target: tuple[str, Box | None]) -> None:
        """The sketch drawn on ``target`` (None: nothing drawn). A changed sketch drops the selected
        units: it proposes its own matching ones."""
        if mask is None:
            self.sketch = self.sketch_for = self.sketch_result = None
            return
        old = self.sketch if self.sketch_for == target else None
        if old is None or old.shape != mask.shape or not np.array_equal(old, mask):
            self.sketch, self.sketch_for, self.sketch_result = mask, target, None
            st.session_state.pop(Keys.LABEL_UNITS, None)

    def sketch_on(self, target: tuple[str, Box | None]) -> np.ndarray | None:
        """The sketch when it was drawn on ``target``, else None."""
        return self.sketch if self.sketch_for == target else None

    def _new_target(self) -> None:
        self.sketch = self.sketch_for = self.sketch_result = None
        for key in Keys.PER_TARGET:
            st.session_state.pop(key, None)


SESSION_KEY = "session"  #: where the :class:`Session` lives in ``st.session_state``


def session() -> Session:
    """This browser session's :class:`Session` (made on first use)."""
    s = st.session_state.get(SESSION_KEY)
    if not isinstance(s, Session):
        s = Session()
        st.session_state[SESSION_KEY] = s
    return s


def set_image(name: str, data: bytes, *, upload: bool = False) -> None:
    """Make ``data`` the current image (resets the patch, sketch and unit selection) and start
    decoding it."""
    ref = ImageRef(name, bytes(data))
    if session().new_image(ref, upload=upload):
        prefetch(ref)


def image() -> ImageRef | None:
    return session().image


def recent() -> list[ImageRef]:
    return list(session().recent)


@dataclass(frozen=True)
class Decoded:
    """An image decoded once: ``pixels`` at full resolution (for crops) and ``preview``, the same
    scaled down to at most :data:`PREVIEW_SIDE` pixels on the long side (what the pages draw on and
    colour). Both float [0, 1] and read-only: every session of the process shares them."""

    pixels: np.ndarray
    preview: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    @property
    def scale(self) -> float:
        """preview pixels per image pixel (<= 1)."""
        return self.preview.shape[0] / self.pixels.shape[0]


def _decode(data: bytes) -> Decoded:
    from deepminer.data.io import load_image
    from ui.render import fit

    pixels = load_image(data).pixels
    preview = fit(pixels, PREVIEW_SIDE)
    pixels.setflags(write=False)
    preview.setflags(write=False)
    return Decoded(pixels, preview)


class _Decoder:
    """Decodes images in worker threads, once per content (the last :data:`DECODED_MAX` are kept).
    The Explain page starts the decode before it waits for the model server, so both run at once."""

    def __init__(self, size: int = DECODED_MAX) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deepminer-decode")
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Future[Decoded]] = OrderedDict()
        self._size = size

    def submit(self, ref: ImageRef) -> Future[Decoded]:
        with self._lock:
            job = self._jobs.get(ref.digest)
            if job is None:
                job = self._pool.submit(_decode, ref.data)
                self._jobs[ref.digest] = job
                while len(self._jobs) > self._size:
                    self._jobs.popitem(last=False)
            else:
                self._jobs.move_to_end(ref.digest)
            return job


@st.cache_resource(show_spinner=False)
def _decoder() -> _Decoder:
    return _Decoder()


def prefetch(ref: ImageRef) -> None:
    """Start decoding ``ref`` in a worker thread (nothing when it is decoded or on its way)."""
    _decoder().submit(ref)


def decoded(ref: ImageRef) -> Decoded | None:
    """The decoded image (waits for its decode); None after showing why it could not be read."""
    try:
        return _decoder().submit(ref).result()
    except DeepMinerError as err:
        st.error(f"Cannot read {md_escape(ref.name)}: {md_escape(err)}")
        return None


def pixels(ref: ImageRef) -> np.ndarray | None:
    """The decoded image at full resolution (float [0, 1], read-only); None after showing why it
    could not be read."""
    d = decoded(ref)
    return None if d is None else d.pixels


# -- explanations ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """Why there is no explanation, in words for the page."""

    message: str
    kind: str = "error"  # error | unavailable


@st.cache_data(show_spinner=False, max_entries=16)
def _explain(data: bytes, sketch: np.ndarray | None, unit_maps: str, backend: str, top_units: int, model: str,
             ablate: tuple[int, ...] = ()):
    s = settings_for(model)
    if backend == "local":
        from deepminer.client import local_explain

        return local_explain(s.model_path, data, top_units=top_units, unit_maps=unit_maps, sketch=sketch,
                             max_side=s.max_side, name=s.model, ablate=ablate or None)
    return client(model).explain(data, top_units=top_units, unit_maps=unit_maps, sketch=sketch, max_side=s.max_side,
                                 ablate=ablate or None)


def explain(data: bytes, *, sketch: np.ndarray | None = None, unit_maps: str = "top", top_units: int = 8,
            model: str | None = None, ablate: Sequence[int] = ()):
    """The explanation of ``data`` by the picked model (or by ``model``; cached per model, image, sketch
    and options), or a :class:`Failure`. ``ablate``: unit ids silenced in its ``ablation`` (the server
    answers from the image's cached unit maps: no second forward)."""
    s = settings() if model is None else settings_for(model)
    try:
        return _explain(data, sketch, unit_maps, s.backend, top_units, s.model, tuple(int(u) for u in ablate))
    except Exception as err:  # noqa: BLE001 - worded by failure_of; anything else is re-raised
        f = failure_of(err, model=s.model, what="image")
        if f is None:
            raise
        return f


def failure_of(err: Exception, *, model: str | None = None, what: str = "request") -> Failure | None:
    """The words for a failed call of the picked model (or of ``model``); ``what`` was refused on a
    4xx (``image``: the image). None for an error that is not a model call's (OSError/ValueError
    included: model files missing in local mode, malformed answers)."""
    from deepminer.client import ServeError, ServeUnavailable

    s = settings() if model is None else settings_for(model)
    if isinstance(err, ServeUnavailable):
        return Failure(f"TorchServe is not reachable at {s.serve_url}. Start everything with `make run` "
                       "(or set DEEPMINER_SERVE_URL / DEEPMINER_BACKEND=local).", "unavailable")
    if isinstance(err, ServeError):
        if err.status == 401:
            return Failure(f"TorchServe refused the request (401): set DEEPMINER_KEY_FILE to its key_file.json "
                           f"or DEEPMINER_TOKEN. ({md_escape(err.message)})")
        if err.status == 404:
            return Failure(f"The server does not host model `{md_escape(s.model)}` (404): pick another in the "
                           f"sidebar. {md_escape(err.message)}")
        if err.status >= 500:
            return Failure(f"The model server failed ({err.status} {md_escape(err.type)}): {md_escape(err.message)}")
        if what == "image":
            return Failure(f"The image was refused: {md_escape(err.message)}")
        return Failure(f"The {what} was refused ({err.status}): {md_escape(err.message)}")
    if isinstance(err, DeepMinerError):
        return Failure(md_escape(err))
    if isinstance(err, (OSError, ValueError)):
        return Failure(f"{type(err).__name__}: {md_escape(err)}")
    return None


@st.cache_data(show_spinner=False, max_entries=16)
def _explain_methods(data: bytes, methods: tuple[str, ...], target: str | None, backend: str, model: str):
    s = settings_for(model)
    if backend == "local":
        from deepminer.client import local_explain

        return local_explain(s.model_path, data, max_side=s.max_side, name=s.model, methods=list(methods),
                             target=target)
    from deepminer.options import ExplainOptions

    return client(model).explain_methods(data, list(methods), target=target,
                                    options=ExplainOptions.build(max_side=s.max_side))


def explain_methods(data: bytes, methods: Sequence[str], *, target: str | None = None):
    """``POST /explanations``: the saliency maps of ``methods`` (at most 3 gradient methods a request)
    for class ``target`` in ``.method_maps`` (cached per image, methods and class), or a :class:`Failure`."""
    try:
        return _explain_methods(data, tuple(methods), target, settings().backend, settings().model)
    except Exception as err:  # noqa: BLE001 - worded below; anything else is re-raised
        f = failure_of(err)
        if f is None:
            raise
        return f


def show_failure(f: Failure) -> None:
    (st.warning if f.kind == "unavailable" else st.error)(f.message)


def show_ablation(data: bytes, units: Sequence[int], view: np.ndarray, key: str) -> None:
    """The ``ablate`` answer for ``units`` on the image ``data`` (the server's cached unit maps: no
    second forward): probabilities before/after and the change per class, and the class map of a
    chosen class after silencing, drawn over ``view``; a failure in words."""
    from ui import logic, render

    res = explain(data, unit_maps="none", ablate=units)
    if isinstance(res, Failure):
        show_failure(res)
        return
    ab = res.ablation
    if ab is None:
        st.error("The server answered without the ablation (an older server?).")
        return
    st.markdown(f"**Silenced:** unit{'s' if len(ab.units) > 1 else ''} {', '.join(map(str, ab.units))} · "
                f"prediction {res.prediction} \u2192 {ab.prediction}")
    st.dataframe(logic.ablation_rows(res), hide_index=True, key=f"{key}_table")
    cls = st.radio("Class map after silencing", res.classes, horizontal=True,
                   index=res.classes.index(ab.prediction), key=f"{key}_class")
    after = render.heat_overlay(render.fit(view, 320), ab.class_maps[res.classes.index(cls)], vmin=0, vmax=1,
                                alpha=0.5)
    st.image(after, width=int(min(300, 300 * after.shape[1] / after.shape[0])), output_format="JPEG",
             caption=f"P({cls}) per position with the units silenced (blue 0, red 1)")


def timed_explain(data: bytes, **kw):
    """:func:`explain` with a spinner, recording the wall time in :attr:`Session.explain_ms`."""
    t0 = time.perf_counter()
    with st.spinner("Explaining the image..."):
        out = explain(data, **kw)
    session().explain_ms = (time.perf_counter() - t0) * 1000
    return out


# -- the sketch target (whole image or a patch) ---------------------------------------------------

WHOLE = "whole image"  # the Sketch page's choice meaning "no patch" (a selectbox shows None as empty)


def set_patch(box: Sequence[int] | None, *, from_widget: bool = False) -> None:
    """Sketch on ``box`` of the current image (None: the whole image); resets the sketch. Other
    pages also preset the Sketch page's choice (``from_widget=False``)."""
    target: Box | None = None if box is None else (int(box[0]), int(box[1]), int(box[2]), int(box[3]))
    ref = image()
    if ref is not None and not from_widget:
        st.session_state[Keys.of_image(Keys.TARGET, ref)] = WHOLE if target is None else target
    session().new_patch(target)


def patch() -> Box | None:
    return session().patch


# -- warm-up --------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _warm_up() -> threading.Thread:
    def work() -> None:
        try:
            import pandas  # noqa: F401 - tables
            import plotly.graph_objects as go

            import deepminer.atlas  # noqa: F401 - the atlas and its arrays
            import deepminer.labels  # noqa: F401 - SQLAlchemy
            import deepminer.client  # noqa: F401 - requests
            from deepminer.concepts import birads_terms
            from deepminer.data.io import load_image  # noqa: F401 - PIL and pydicom decoders
            from deepminer.data.tissue import tissue_mask
            from ui import render

            go.Figure(go.Bar(x=[0.0])).to_plotly_json()
            render.colorize(np.zeros((2, 2), np.float32))
            tissue_mask(np.zeros((64, 64), np.float32))
            birads_terms()
            if _settings().backend == "local" and _settings().model_path.is_file():
                from deepminer.models import load_model

                load_model(_settings().model_path)
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
    session().flash = message


def show_flash() -> None:
    s = session()
    msg, s.flash = s.flash, None
    if msg:
        st.success(msg)
