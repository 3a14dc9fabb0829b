"""What the pages read besides the model's answers, one per process (``st.cache_resource``): the label
store, the unit atlas of a model (and where its reference images are), the key labels are stored
under, and the sample images."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from deepminer.errors import DeepMinerError
from deepminer.model_folder import ATLAS_JSON
from ui.logic import ModelKey, model_key
from ui.models import picked_model, settings, settings_for
from ui.render import md_escape
from ui.settings import DEMO_REFERENCE

SAMPLE_COUNT, SAMPLE_SEED, SAMPLE_SIZE = 6, 7, 1024


@st.cache_resource(show_spinner=False)
def _store(url: str):
    from deepminer.labels import LabelStore

    return LabelStore(url)


def store():
    """The label store (one engine per process; SQLite WAL queues concurrent sessions)."""
    return _store(settings().labels_url)


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
