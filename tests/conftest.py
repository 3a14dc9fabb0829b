"""Shared test setup. Torch is kept to few threads so the suite behaves on 2 cores."""
import os
from pathlib import Path

import pytest
import torch

from deepminer.runtime import keep_freed_memory

# under pytest-xdist (``-n N``) the cores are shared by N workers: fewer torch threads each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
keep_freed_memory()  # as every deepminer command and the server run (faster forward passes)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


# Modules that share a session server (below) run in the same pytest-xdist worker with
# ``--dist loadgroup``; every other module stays whole in one worker (its module fixtures built once).
SHARED_SERVER_MODULES = {
    "test_client.py": "tiny-server", "test_serve_explanations.py": "tiny-server",
    "test_ui_browser_studies.py": "tiny-server",
    "test_compare.py": "two-model-server", "test_ui_browser_compare.py": "two-model-server",
}


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(SHARED_SERVER_MODULES.get(name, name)))


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests save things a person should look at (screenshots, overlays)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict:
    """A tiny model (seed 0) saved as ``demo/model.pt`` with its atlas profiled on a small phantom
    data set (also usable as sample images), built once per session:
    ``{"root", "data", "model_dir"}``."""
    from deepminer.atlas import dissect
    from deepminer.data.phantoms import generate_dataset
    from deepminer.models import build_model, save_model

    root = tmp_path_factory.mktemp("tiny-demo")
    data = generate_dataset(root / "data", 2, 3, 256)
    torch.manual_seed(0)
    save_model(build_model("tiny", pretrained=False), root / "demo" / "model.pt", patch_size=48)
    dissect(root / "demo" / "model.pt", data, split="train", out=root / "demo" / "atlas", progress=False,
            batch_size=64, topk=8)
    return {"root": root, "data": data, "model_dir": root / "demo"}


# -- shared across modules: one chromium, shared TorchServes ----------------------------------------
# Tests that only read from a server share one per session; a test that restarts, breaks or
# reconfigures a server (lab profile, a bare interpreter, nginx in front) keeps a private one.

@pytest.fixture(scope="session")
def chromium_browser():
    """Debian chromium through Playwright, launched once per session; each test opens its own
    context (``browser.new_page``/``open_workbench``: fresh cookies and storage)."""
    from playwright.sync_api import sync_playwright

    from serve.workbench import launch_chromium

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """The tiny model (random weights, seed 1) saved as ``<folder>/model.pt`` (nothing else beside it)."""
    from modelfixtures import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_model_path):
    """One real TorchServe (demo profile: no token) serving :func:`tiny_model_path` as
    :data:`modelfixtures.TINY_MODEL` (the shipped model-config, ``max_batch_delay`` 5 ms), for every module that only
    sends it requests. One intra-op thread in the worker: on a small shared test machine (2 cores, other
    jobs) torch's default of one thread per core oversubscribes it and a forward+backward gets ~100x
    slower."""
    from modelfixtures import TINY_MODEL, start_tiny_server

    ts = start_tiny_server(tmp_path_factory, tiny_model_path, TINY_MODEL, max_batch_delay=5,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def two_models(tiny_demo, tmp_path_factory) -> dict:
    """Two tiny models with atlases over the same phantoms (:func:`modelfixtures.two_model_store`)."""
    from modelfixtures import two_model_store

    return two_model_store(tiny_demo, tmp_path_factory.mktemp("compare") / "model_store")


@pytest.fixture(scope="session")
def two_model_server(two_models, tmp_path_factory):
    """One TorchServe (demo profile) serving both :func:`two_models` as ``alpha`` and ``beta``, archived as
    scripts/model_store.sh does (atlas + MODEL_CARD.md); OMP_NUM_THREADS unset, so each worker runs
    cores / models torch threads (``serve.launch.worker_threads``)."""
    from serve.archive import build_mar
    from serve.launch import TorchServe

    mars = tmp_path_factory.mktemp("mars")
    for name, key in (("alpha", "a"), ("beta", "b")):
        build_mar(two_models[key] / "model.pt", mars, name=name, atlas=two_models[key] / "atlas",
                  extra=[two_models[key] / "MODEL_CARD.md"])
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    ts = TorchServe(mars, {"alpha": "alpha.mar", "beta": "beta.mar"}, tmp_path_factory.mktemp("ts"), profile="demo",
                    env=env)
    ts.start(timeout=300)
    yield ts
    ts.stop()


# -- AppTest (tests/apptest.py has the helpers) ----------------------------------------------------

@pytest.fixture(scope="session")
def ui_fixture(tiny_demo):
    """A tiny model + its atlas + a phantom data set (also the sample images), built once."""
    return tiny_demo


@pytest.fixture
def app_env(ui_fixture, tmp_path, monkeypatch):
    """Environment for one AppTest: fresh label store, local backend, Streamlit caches cleared."""
    import streamlit as st

    db = tmp_path / "labels.db"
    env = {"DEEPMINER_BACKEND": "local", "DEEPMINER_MODEL_DIR": str(ui_fixture["model_dir"]),
           "DEEPMINER_SAMPLES": str(ui_fixture["data"]), "DEEPMINER_LABELS_URL": f"sqlite:///{db}",
           "DEEPMINER_MODEL": "demo", "DEEPMINER_MAX_SIDE": "512", "DEEPMINER_JOBS": str(tmp_path / "jobs.sqlite")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DEEPMINER_DATA_ROOT", raising=False)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield {**ui_fixture, "db": db, "url": f"sqlite:///{db}"}
    st.cache_resource.clear()
    st.cache_data.clear()
