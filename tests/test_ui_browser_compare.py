"""The Compare page and the model picker in a real browser (Debian chromium through Playwright), the
workbench served by a real ``streamlit run``, two models served by one real TorchServe.

Two tiny models (random weights, seeds 0 and 3) with atlases over the same phantoms; a label given
to one unit of model ``alpha``. Upload one image on the Compare page: both sides show their
prediction, CAM and sentence (the label only on alpha's side: labels are keyed by weights hash), the
atlases compared below (concepts, mask sizes, coverage). Then Model B = Model A gives a one-line
message, and the sidebar's picker switches every page to ``beta``. Saves
``test-artifacts/ui-compare.png``.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from browser import after_input, nav, open_workbench, shot, square_mammogram

from serve.launch import free_port
from serve.workbench import idle, streamlit_app

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.serve]

ROOT = Path(__file__).resolve().parents[1]
LABEL = "tagged-alpha"
SIDEBAR = '[data-testid="stSidebar"]'


@pytest.fixture(scope="module")
def workbench(two_model_server, two_models, tmp_path_factory):
    """``streamlit run ui/app.py`` against the session's two-model TorchServe (conftest.py; test_compare.py
    uses it too): default model alpha (its folder the store's ``alpha/``)."""
    server, models = two_model_server, two_models
    work = tmp_path_factory.mktemp("workbench")
    port = free_port()
    env = {**os.environ, "DEEPMINER_SERVE_URL": server.inference_url, "DEEPMINER_MANAGEMENT_URL": server.management_url,
           "DEEPMINER_MODEL": "alpha", "DEEPMINER_BACKEND": "serve", "DEEPMINER_MODEL_DIR": str(models["a"]),
           "DEEPMINER_DATA_ROOT": str(models["data"]), "DEEPMINER_LABELS_URL": f"sqlite:///{work / 'labels.db'}",
           "DEEPMINER_SAMPLES": str(models["data"]), "DEEPMINER_MAX_SIDE": "512"}
    env.pop("DEEPMINER_KEY_FILE", None)
    env.pop("DEEPMINER_TOKEN", None)
    with streamlit_app(env, port, work) as url:
        yield {"url": url, "labels_url": env["DEEPMINER_LABELS_URL"], "log": work / "streamlit.log"}


def _pick(page, label: str, option: str, scope: str = '[data-testid="stMain"]') -> None:
    """Choose ``option`` in the selectbox ``label`` (in ``scope``: the main block or the sidebar)."""
    page.locator(f'{scope} [data-testid="stSelectbox"]', has_text=label).first.click()
    page.get_by_role("option", name=option, exact=True).click()
    after_input(page)


def test_compare_two_models_in_browser(chromium_browser, workbench, two_model_server, artifacts_dir, tmp_path):
    from deepminer.client import Client
    from deepminer.labels import LabelStore

    server = two_model_server

    image = tmp_path / "mammo-compare.png"
    image.write_bytes(square_mammogram(11, 1, side=512))
    with Client(server.inference_url, model="alpha", timeout=120) as c:
        ra = c.explain(image.read_bytes(), max_side=512)
    with Client(server.inference_url, model="beta", timeout=120) as c:
        rb = c.explain(image.read_bytes(), max_side=512)
    assert ra.model["weights_sha256"] != rb.model["weights_sha256"]
    unit = ra.ranked_units(ra.prediction, 8)[0]
    store = LabelStore(workbench["labels_url"])
    store.set_labels("alpha", ra.model["weights_sha256"], [unit], LABEL, "Dr. Playwright")
    store.close()

    # the app's own navigation (a first load of /compare runs the page alone)
    with open_workbench(chromium_browser, workbench["url"]) as page:
        try:
            nav(page, "Compare")
            page.get_by_text("Compare two models").wait_for(timeout=120_000)
            idle(page, 120_000)
            t0 = time.perf_counter()
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(image))
            page.get_by_text("The atlases compared").wait_for(timeout=120_000)
            page.get_by_text(re.compile(r"^beta: \w+ \(\d\.\d\d\)$")).wait_for(timeout=120_000)
            idle(page)
            elapsed = time.perf_counter() - t0
            assert page.get_by_text(f"alpha: {ra.prediction} ({ra.probabilities[ra.prediction]:.2f})").count() == 1
            assert page.get_by_text(f"beta: {rb.prediction} ({rb.probabilities[rb.prediction]:.2f})").count() == 1
            assert page.get_by_text(re.compile(r"^(alpha|beta): CAM of ")).count() == 2
            # the label of alpha's unit is in alpha's sentence only (beta's same unit id is another unit)
            sentences = page.get_by_text(re.compile(r"^(Normal|Benign|Malignant) \(\d\.\d\d\): ")).all_inner_texts()
            assert len(sentences) == 2, sentences
            assert sum(LABEL in s for s in sentences) == 1 and LABEL in sentences[0], sentences
            for text in ("Concepts: the best unit of each model", "Unit mask sizes", "Top-20 coverage per class"):
                assert page.get_by_text(text, exact=True).count() == 1, text
            page.get_by_text(re.compile(r"median ROI fraction")).first.wait_for(timeout=5_000)
            shot(page, artifacts_dir / "ui-compare.png")

            # Model B = Model A: a one-line message
            _pick(page, "Model B", "alpha")
            page.get_by_text("'alpha' compared with itself: pick two different models.").wait_for(timeout=30_000)
            assert page.get_by_text("The atlases compared").count() == 0

            # the sidebar's picker: every page follows it, labels keyed by beta's weights
            _pick(page, "Model", "beta", SIDEBAR)
            nav(page, "Explain")
            page.get_by_text(re.compile(r"model `?beta`?")).first.wait_for(timeout=60_000)
            page.get_by_text(f"Prediction: {rb.prediction}").wait_for(timeout=120_000)
            idle(page)
            assert page.get_by_text(f"Labels for beta @ {rb.model['weights_sha256'][:12]}").count() == 1
            assert page.get_by_text(LABEL).count() == 0
            _pick(page, "Model", "alpha", SIDEBAR)
            page.get_by_text(f"Prediction: {ra.prediction}").wait_for(timeout=120_000)
            idle(page)
            assert page.get_by_text(re.compile(LABEL)).count() >= 1  # alpha's label back, never lost
        except Exception:
            page.screenshot(path=str(artifacts_dir / "ui-compare-failure.png"))
            raise
    print(f"\nCompare page: upload to both explanations and the atlases {elapsed:.1f} s")
