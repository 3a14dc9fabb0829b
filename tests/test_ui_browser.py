"""End to end in a real browser: Debian chromium driven by Playwright, the workbench served by a real
``streamlit run``, explanations from a real TorchServe.

Upload a 1024 x 1024 image, see the CAM, draw a rectangle on the canvas, see the ranked units, label
two units (a new concept typed in, with HTML in it), reload the page, find the labels kept and named
in the explanation. Then upload a full-field 4,500 x 3,000 16-bit RLE DICOM, and check that the class
radios of a new image start at its own prediction (not at the previous image's choice). Saves a
screenshot of each page (``test-artifacts/ui-*.png``) and the times from upload to explanation
(``test-artifacts/ui-timing.json``; the DICOM's also in ``ui-timing-dicom.json``).

The model is the bundled demo (``model_store/demo``: ``model.pt`` + ``atlas/``) when it is there,
else a tiny model profiled on a few phantoms.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from browser import after_input, explain_upload, nav, new_page, open_workbench, shot, square_mammogram

from serve.launch import free_port
from serve.workbench import NOT_RUNNING, idle, streamlit_app

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.serve]

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "model_store" / "demo"
LABEL = "<i>Spiculated</i> margin & co"  # typed as a new concept; must come back as text
NAME_FIELD = "Your name (stored with every label)"

DICOM_SHAPE = (4500, 3000)
# phantoms of a seed no bundled model was trained or tested on (patient index per forced label)
SEED, MALIGNANT, BENIGN, NORMAL = 31, 0, 1, 2  # height x width: a full-field digital mammogram (13.5 MP)


@pytest.fixture(scope="module")
def full_field_dicoms(tmp_path_factory) -> list[Path]:
    """Two 4,500 x 3,000 16-bit (12 stored) RLE Lossless DICOMs of a phantom, compressed by pydicom's
    own encoder (~13 MB each, like a real full-field file). The second differs in its header only
    (another SOP instance), so neither the server's feature cache nor the UI's decode cache knows it."""
    import pydicom
    from dicomfixtures import write_dicom
    from pydicom.uid import generate_uid

    from deepminer.data.phantoms import render_phantom

    folder = tmp_path_factory.mktemp("dicom")
    img = np.asarray(render_phantom(5, 0, size=DICOM_SHAPE[0]).image)
    values = np.zeros(DICOM_SHAPE, dtype=np.uint16)
    h, w = min(img.shape[0], DICOM_SHAPE[0]), min(img.shape[1], DICOM_SHAPE[1])
    values[:h, :w] = np.clip(img[:h, :w], 0, 4095)
    first = write_dicom(folder / "full-field-1.dcm", values, bits_stored=12, rle=True, laterality="R", view="CC")
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    second = folder / "full-field-2.dcm"
    ds.save_as(second, enforce_file_format=True)
    return [first, second]


@pytest.fixture(scope="module")
def model_dir(request) -> Path:
    """The demo model + atlas, or a tiny one profiled on phantoms when the demo is not built."""
    if (DEMO / "model.pt").is_file() and (DEMO / "atlas" / "atlas.json").is_file():
        return DEMO
    return request.getfixturevalue("tiny_demo")["model_dir"]


@pytest.fixture(scope="module")
def torchserve(model_dir, tmp_path_factory):
    """A real TorchServe (demo profile) serving ``model_dir`` as ``demo``."""
    from serve.archive import build_mar
    from serve.launch import TorchServe

    mar = ROOT / "model_store" / "demo.mar"
    store = ROOT / "model_store"
    extra = [p for p in [model_dir / "domain.pt"] if p.is_file()]  # the out-of-domain summary, when fitted
    # a built .mar also ships a copy of the library and the handler: stale when either is newer
    code = [*(ROOT / "deepminer").rglob("*.py"), *(ROOT / "handlers").rglob("*.py")]
    newest = max(p.stat().st_mtime for p in [DEMO / "model.pt", *extra, *code]) if model_dir == DEMO else 0.0
    if model_dir != DEMO or not mar.is_file() or mar.stat().st_mtime < newest:
        store = tmp_path_factory.mktemp("store")
        build_mar(model_dir / "model.pt", store, name="demo", atlas=model_dir / "atlas", workers=1, extra=extra)
    ts = TorchServe(store, {"demo": "demo.mar"}, tmp_path_factory.mktemp("ts"), profile="demo")
    ts.start(timeout=300)
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def workbench(torchserve, model_dir, tmp_path_factory):
    """``streamlit run ui/app.py`` against that server, with its own label store and samples."""
    from deepminer.data.phantoms import generate_dataset

    work = tmp_path_factory.mktemp("workbench")
    samples = generate_dataset(work / "samples", 2, 5, 256)
    port = free_port()
    env = {**os.environ, "DEEPMINER_SERVE_URL": torchserve.inference_url, "DEEPMINER_MODEL": "demo",
           "DEEPMINER_MANAGEMENT_URL": torchserve.management_url,
           "DEEPMINER_BACKEND": "serve", "DEEPMINER_MODEL_DIR": str(model_dir),
           "DEEPMINER_LABELS_URL": f"sqlite:///{work / 'labels.db'}", "DEEPMINER_SAMPLES": str(samples),
           "DEEPMINER_MAX_SIDE": "1024", "DEEPMINER_JOBS": str(torchserve.jobs_path)}  # long jobs: progress, Cancel
    env.pop("DEEPMINER_KEY_FILE", None)
    env.pop("DEEPMINER_TOKEN", None)
    with streamlit_app(env, port, work) as url:
        yield {"url": url, "labels_url": env["DEEPMINER_LABELS_URL"], "log": work / "streamlit.log"}


def _explain_ms(page) -> float:
    """The explain call's own wall time, as the Explain page reports it."""
    text = page.get_by_text(re.compile(r"explained in \d+ ms")).first.inner_text()
    return float(re.search(r"explained in (\d+) ms", text).group(1))


def _draw_box(page, left: float, top: float, width: float, height: float) -> None:
    """Drag a rectangle on the page's drawing canvas; position and size as fractions of the canvas."""
    canvas = page.locator("canvas.upper-canvas").first
    canvas.wait_for(timeout=30_000)
    canvas.scroll_into_view_if_needed()  # a drag past the viewport's edge stops there
    bb = canvas.bounding_box()
    x0, y0 = bb["x"] + bb["width"] * left, bb["y"] + bb["height"] * top
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + bb["width"] * width, y0 + bb["height"] * height, steps=10)
    page.mouse.up()


def _radio(page, label: str):
    return page.locator('[data-testid="stRadio"]', has_text=label).first


def _radio_value(page, label: str) -> str:
    """The option shown as chosen in the radio group ``label``."""
    return _radio(page, label).locator("label:has(input:checked)").inner_text().strip()


def _choose(page, label: str, option: str) -> None:
    _radio(page, label).locator("label:has(input)", has_text=re.compile(rf"^{re.escape(option)}$")).click()
    after_input(page)


def test_workbench_end_to_end(chromium_browser, workbench, torchserve, full_field_dicoms, artifacts_dir, tmp_path):

    from deepminer.labels import LabelStore
    from deepminer.client import Client

    # images the server has never seen (it caches features by content), of a seed no model was trained
    # on: mammo-a malignant, mammo-b benign, and (step 7) mammo-c normal; a fourth warms the server up
    images = [tmp_path / "mammo-a.png", tmp_path / "mammo-b.png"]
    images[0].write_bytes(square_mammogram(SEED, MALIGNANT, label="malignant"))
    images[1].write_bytes(square_mammogram(SEED, BENIGN, label="benign"))
    with Client(torchserve.inference_url, model="demo", timeout=120) as c:
        c.explain(square_mammogram(11, 2))

    timing: dict[str, float] = {}
    steps: dict[str, float] = {}
    with new_page(chromium_browser) as page:
        t0 = time.perf_counter()
        page.goto(workbench["url"])
        page.get_by_text("Upload a mammogram").wait_for(timeout=120_000)
        idle(page, 120_000)
        timing["first_page_load_s"] = time.perf_counter() - t0
        page.get_by_label(NAME_FIELD).fill("Dr. Playwright")
        page.get_by_label(NAME_FIELD).press("Enter")
        after_input(page)

        # 1. upload, see the CAM: first image (cold UI process), second (warm)
        timing["upload_to_explanation_first_s"] = explain_upload(page, images[1])
        idle(page)
        timing["explain_call_first_ms"] = _explain_ms(page)
        timing["upload_to_explanation_s"] = explain_upload(page, images[0])
        idle(page)
        timing["explain_call_ms"] = _explain_ms(page)
        # which units the server finds most influential (to label two the explanation will name)
        with Client(torchserve.inference_url, model="demo", timeout=120) as c:
            ref = c.explain(images[0].read_bytes())  # no max_side: the model's own scale, as the page asks
            pred_a = ref.prediction
            other = tmp_path / "mammo-c.png"  # a normal phantom (the class radios, step 7)
            other.write_bytes(square_mammogram(SEED, NORMAL, label="normal"))
            pred_c = c.explain(other.read_bytes()).prediction
        # the whole-image model is right on both (it was trained on whole phantoms at its own scale)
        assert (pred_a, pred_c) == ("malignant", "normal"), (pred_a, pred_c)
        pick = ref.top_units[ref.prediction][:2]
        assert page.get_by_text(f"Prediction: {ref.prediction}").count() == 1
        assert page.get_by_text(f"{images[0].name} · 1024 x 1024 px").count() == 1
        # the scale it was explained at, how it was chosen (this workbench asks DEEPMINER_MAX_SIDE), and the model's own
        assert page.get_by_text(re.compile(r"xplained at \d+ x \d+ px \(.+; the model's scale: long side 1024 px\)")).count() == 1
        assert page.get_by_text(re.compile(r"trained on synthetic phantoms", re.I)).count() >= 1
        shot(page, artifacts_dir / "ui-explain.png")  # a malignant phantom, predicted malignant

        steps["explain"] = time.perf_counter() - t0
        # 2. draw a rectangle on the canvas, see the ranked units
        nav(page, "Sketch & label")
        page.get_by_text("Unit map", exact=True).wait_for(timeout=60_000)
        idle(page)
        sketch_on = page.locator('[data-testid="stMain"] [data-testid="stSelectbox"]').first  # not the sidebar's
        shown = sketch_on.inner_text() + " " + " ".join(sketch_on.locator("input").evaluate_all(
            "els => els.map(e => e.value + ' ' + (e.getAttribute('aria-label') || ''))"))
        assert f"Whole image ({images[0].name})" in shown, shown
        _draw_box(page, 0.25, 0.3, 0.3, 0.3)
        page.get_by_text(re.compile(r"^Units ranked by IoU")).wait_for(timeout=60_000)
        idle(page)
        assert page.get_by_text(re.compile(r"^unit \d+ · IoU ")).count() >= 1  # the units' masks

        steps["sketch"] = time.perf_counter() - t0
        # 3. label two units at once with a concept typed in (HTML inside)
        form = page.locator('[data-testid="stForm"]').first
        units_box = form.locator('[data-testid="stMultiSelect"]')
        for u in pick:
            units_box.locator("input").click()
            units_box.locator("input").fill(f"unit {u}")
            page.get_by_role("option", name=re.compile(rf"^unit {u}\b")).first.click()
        page.keyboard.press("Escape")
        concept = form.locator('[data-testid="stSelectbox"]')
        concept.locator("input").click()
        concept.locator("input").fill(LABEL)
        page.keyboard.press("Enter")
        form.get_by_role("button", name="Label the selected units").click()
        page.get_by_text(re.compile(r"^Labelled 2 unit\(s\)")).wait_for(timeout=30_000)
        idle(page)
        shot(page, artifacts_dir / "ui-sketch.png")

        steps["label"] = time.perf_counter() - t0
        # 4. reload: a new session; the labels are kept and named in the explanation, as text
        page.reload()
        nav(page, "Explain")
        idle(page)
        explain_upload(page, images[0])
        idle(page)
        sentence = page.get_by_text(re.compile(r"most influenced by units labelled"))
        sentence.wait_for(timeout=30_000)
        assert LABEL in sentence.inner_text()
        assert page.locator("i", has_text="Spiculated").count() == 0  # never rendered as HTML
        shot(page, artifacts_dir / "ui-explain-labelled.png")

        steps["reload"] = time.perf_counter() - t0
        # 5. the other pages
        nav(page, "Unit atlas")
        page.get_by_text(re.compile(r"^\d+ of \d+ labelled$")).wait_for(timeout=60_000)
        idle(page)
        shot(page, artifacts_dir / "ui-atlas.png")
        nav(page, "Labels")
        page.get_by_text("Current labels (2 units)").wait_for(timeout=60_000)
        idle(page)
        shot(page, artifacts_dir / "ui-labels.png")
        steps["atlas_labels"] = time.perf_counter() - t0

        # 6. a full-field 4,500 x 3,000 16-bit RLE DICOM (13 MB): upload -> explanation, twice (the
        # second file differs in its header only: both are decoded and explained from scratch)
        nav(page, "Explain")
        idle(page)
        dicom_s = []
        for path in full_field_dicoms:
            dicom_s.append(explain_upload(page, path, size=(DICOM_SHAPE[1], DICOM_SHAPE[0])))
            idle(page)
            assert page.get_by_text(re.compile(r"^Prediction: \w+ \(\d\.\d\d\)$")).count() == 1
            assert page.get_by_text(re.compile(r"^CAM of ")).count() >= 1
        timing["upload_to_explanation_dicom_first_s"], timing["upload_to_explanation_dicom_s"] = dicom_s
        timing["explain_call_dicom_ms"] = _explain_ms(page)
        dicom = {"image": f"{DICOM_SHAPE[1]} x {DICOM_SHAPE[0]} (width x height) 16-bit (12 stored) RLE Lossless "
                          "DICOM, pydicom's encoder",
                 "bytes": full_field_dicoms[0].stat().st_size,
                 "upload_to_explanation_s": dicom_s, "explain_call_ms": timing["explain_call_dicom_ms"]}
        (artifacts_dir / "ui-timing-dicom.json").write_text(json.dumps(dicom, indent=1) + "\n")
        print(f"\nupload -> explanation ({DICOM_SHAPE[1]} x {DICOM_SHAPE[0]} RLE DICOM, "
              f"{dicom['bytes'] / 1e6:.1f} MB): {dicom_s[0]:.2f} s, {dicom_s[1]:.2f} s")
        shot(page, artifacts_dir / "ui-explain-dicom.png")
        steps["dicom"] = time.perf_counter() - t0

        # 7. the class radios follow the image: choose a class the model did not predict for mammo-a,
        # keep it over a rerun, then a new image (predicted otherwise) starts at its own prediction
        explain_upload(page, images[0])
        idle(page)
        assert page.get_by_text(f"Prediction: {pred_a}").count() == 1
        assert _radio_value(page, "CAM of class") == pred_a
        assert _radio_value(page, "Class probability map") == pred_a
        classes = [t.strip() for t in _radio(page, "CAM of class").locator("label:has(input)").all_inner_texts()]
        not_a = next(c for c in classes if c not in (pred_a, pred_c))  # predicted for neither image
        _choose(page, "CAM of class", not_a)
        _choose(page, "Class probability map", not_a)  # (a rerun: the CAM choice holds)
        assert _radio_value(page, "CAM of class") == not_a
        assert _radio_value(page, "Class probability map") == not_a
        assert page.get_by_text(f"CAM of {not_a}").count() >= 1
        shot(page, artifacts_dir / "ui-explain-chosen-class.png")
        explain_upload(page, other)
        idle(page)
        assert page.get_by_text(f"Prediction: {pred_c}").count() == 1
        shot(page, artifacts_dir / "ui-explain-new-image.png")  # a normal phantom, predicted normal
        assert _radio_value(page, "CAM of class") == pred_c
        assert _radio_value(page, "Class probability map") == pred_c
        assert page.get_by_text(re.compile(rf"^CAM of {pred_c}\b")).count() == 1
        assert page.get_by_text(f"P({pred_c}) per position (blue 0, red 1)").count() == 1

    store = LabelStore(workbench["labels_url"])
    (model, weights), = store.models()
    assert model == "demo"
    assert store.labels_for(model, weights) == {u: LABEL for u in pick}
    assert {r.annotator for r in store.history()} == {"Dr. Playwright"}
    timing["image"] = "1024 x 1024 16-bit PNG"
    timing["image_dicom"] = dicom["image"]
    timing["steps_s_since_page_open"] = steps
    (artifacts_dir / "ui-timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(f"\nupload -> explanation (1024 x 1024): {timing['upload_to_explanation_s']:.2f} s "
          f"(first upload of the UI process: {timing['upload_to_explanation_first_s']:.2f} s)")


def test_evaluate_page(chromium_browser, workbench, torchserve, artifacts_dir, tmp_path):
    """The Evaluate page: (a) a zip of phantoms with masks (one mask of the wrong size, one ``../``
    member), the skipped members named, a CAM-only run, the summary, the per-image CSV downloaded;
    (b) a lesion outlined on the canvas, the per-method scores. Times in ``ui-timing-evaluate.json``:
    the run vs the same number of plain ``/predictions`` calls, and outline -> CAM scores."""
    import csv
    import zipfile

    from evalzip import eval_zip

    from deepminer.client import Client
    from deepminer.data.phantoms import render_phantom

    data, ids, bad = eval_zip(tmp_path / "set", count=7, seed=31)
    zpath = tmp_path / "phantoms-eval.zip"
    zpath.write_bytes(data)
    with zipfile.ZipFile(zpath) as z:
        images = [z.read(f"images/{i}.png") for i in ids]

    def plain_calls(repeats: int = 1) -> float:
        """The best of ``repeats`` passes of plain ``/predictions`` calls over the images."""
        best = float("inf")
        with Client(torchserve.inference_url, model="demo", timeout=120) as c:
            for _ in range(repeats):
                t0 = time.perf_counter()
                for b in images:
                    c.explain(b, max_side=1024)
                best = min(best, time.perf_counter() - t0)
        return best

    timing: dict[str, object] = {"images": len(ids), "image_size": "256 px phantoms (151 x 256)"}
    timing["plain_predictions_cold_s"] = plain_calls()  # also warms the server's cache of these images
    with new_page(chromium_browser, accept_downloads=True) as page:
        # a direct link to a page runs the app with its sidebar (a `pages/` folder beside app.py would
        # make Streamlit run the page file alone, listing the files as pages: ui/views/ avoids that)
        page.goto(workbench["url"] + "/evaluate")
        page.get_by_text("Evaluate explanations", exact=True).wait_for(timeout=120_000)
        idle(page, 120_000)
        links = [t.split("\n")[-1].strip() for t in page.locator('[data-testid="stSidebarNavLink"]').all_inner_texts()]
        assert "Sketch & label" in links and "app" not in links, links
        assert page.locator('[data-testid="stSidebar"]').get_by_text("DeepMiner Studio").count() == 1
        page.goto(workbench["url"])
        page.get_by_text("Upload a mammogram").wait_for(timeout=120_000)
        idle(page, 120_000)
        nav(page, "Evaluate")
        page.get_by_text("Evaluate explanations", exact=True).wait_for(timeout=60_000)
        idle(page)
        assert page.get_by_text("Choose an image on the Explain page first").count() == 1

        # (a) a set from a zip
        page.locator('[data-testid="stRadio"] label', has_text="A set of images with masks").click()
        after_input(page)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(zpath))
        page.get_by_text(re.compile(rf"^{len(ids)} image\(s\) with a mask")).wait_for(timeout=60_000)
        idle(page)
        skipped = page.locator('[data-testid="stExpander"]', has_text="Skipped: 2")
        skipped.wait_for(timeout=10_000)
        shown = skipped.inner_text()
        assert "../evil.png" in shown and bad in shown, shown
        runs, clicks = [], []
        for _ in range(2):  # the first run of a UI process also opens its connections; the second is steady
            t0 = time.perf_counter()
            page.get_by_role("button", name="Run", exact=True).click()
            after_input(page)  # (the second time the first run's summary is on the page until the rerun)
            page.get_by_text(re.compile(rf"^Summary over {len(ids)} images")).wait_for(timeout=120_000)
            page.wait_for_function(NOT_RUNNING, timeout=60_000)
            clicks.append(time.perf_counter() - t0)
            idle(page)
            text = page.get_by_text(re.compile(r"^Evaluated \d+ images in")).first.inner_text()
            runs.append(float(re.search(r"in ([\d.]+) s", text).group(1)))
        timing["evaluate_run_s"], timing["evaluate_click_to_summary_s"] = runs, clicks
        timing["plain_predictions_s"] = plain = plain_calls(3)
        timing["ratio_run_vs_plain"] = [round(r / plain, 2) for r in runs]
        timing["ratio_click_to_summary_vs_plain"] = [round(c / plain, 2) for c in clicks]
        assert page.get_by_text(re.compile(r"weights sha256 [0-9a-f]{64}")).count() == 1
        assert page.get_by_text("phantoms-eval.zip", exact=False).count() >= 1
        with page.expect_download() as dl:
            page.get_by_role("button", name="Per-image CSV").click()
        csv_path = tmp_path / "per-image.csv"
        dl.value.save_as(csv_path)
        rows = list(csv.DictReader(csv_path.open()))
        assert sorted({r["image_id"] for r in rows}) == sorted(ids)
        assert {r["method"] for r in rows} == {"cam", "class_map", "random", "tissue_prior"}
        assert len(rows) == 4 * len(ids) and all(r["auprc"] for r in rows)
        shot(page, artifacts_dir / "ui-evaluate-set.png")

        # Cancel mid-run: a slow peer (integrated gradients, seconds per image) keeps the run going
        # long enough to click Cancel after the first image; the partial results say so
        peers = page.locator('[data-testid="stMultiSelect"]', has_text="Add the gradient peers")
        peers.locator("input").click()
        peers.locator("input").fill("integrated")
        page.get_by_role("option", name=re.compile(r"^integrated gradients")).first.click()
        page.keyboard.press("Escape")
        after_input(page)
        chips = peers.inner_text()
        assert "integrated gradients" in chips, chips
        page.get_by_role("button", name="Run", exact=True).click()
        try:
            page.get_by_text(re.compile(rf"^[1-{len(ids) - 1}] of {len(ids)} images")).wait_for(timeout=120_000)
        except Exception:
            shot(page, artifacts_dir / "ui-evaluate-cancel-failed.png")
            raise
        page.get_by_role("button", name="Cancel", exact=True).click()
        note = page.get_by_text(re.compile(rf"^Cancelled after \d+ of {len(ids)} images"))
        note.wait_for(timeout=60_000)
        idle(page)
        done = int(re.search(r"after (\d+) of", note.inner_text()).group(1))
        assert 1 <= done < len(ids), note.inner_text()
        assert page.get_by_text(re.compile(rf"^Summary over {done} images")).count() == 1
        assert page.get_by_role("button", name="Cancel", exact=True).count() == 0
        assert page.locator('[data-testid="stException"]').count() == 0
        shot(page, artifacts_dir / "ui-evaluate-cancelled.png")

        # (b) one image, outlined on the canvas: a malignant phantom, its lesion's box
        ph = render_phantom(11, 2, size=1024)
        img = tmp_path / "mammo-lesion.png"
        img.write_bytes(square_mammogram(11, 2))
        ys, xs = np.nonzero(np.asarray(ph.lesion))
        nav(page, "Explain")
        idle(page)
        explain_upload(page, img)
        idle(page)
        page.get_by_text("Evaluate this map against your outline").click()
        page.get_by_text("Outline the finding").wait_for(timeout=60_000)
        idle(page)
        _choose(page, "Outline with", "Rectangle")
        canvas = page.locator("canvas.upper-canvas").first
        canvas.wait_for(timeout=30_000)
        bb = canvas.bounding_box()
        fx, fy = bb["width"] / 1024, bb["height"] / 1024
        page.mouse.move(bb["x"] + (xs.min() - 4) * fx, bb["y"] + (ys.min() - 4) * fy)
        page.mouse.down()
        page.mouse.move(bb["x"] + (xs.max() + 4) * fx, bb["y"] + (ys.max() + 4) * fy, steps=8)
        t1 = time.perf_counter()
        page.mouse.up()
        page.get_by_text(re.compile(r"^CAM and probability map scored in")).wait_for(timeout=30_000)
        timing["outline_to_cam_scores_s"] = time.perf_counter() - t1
        page.wait_for_function(NOT_RUNNING, timeout=180_000)
        timing["outline_to_all_scores_s"] = time.perf_counter() - t1
        idle(page)
        caps = page.get_by_text(re.compile(r" · AUPRC ")).all_inner_texts()
        names = [c.split(" · ")[0] for c in caps]
        assert {"CAM", "probability map", "Grad-CAM", "random (baseline)", "tissue prior (baseline)"} <= set(names), caps
        assert names[-2:] in (["random (baseline)", "tissue prior (baseline)"],
                              ["tissue prior (baseline)", "random (baseline)"]), names
        assert page.locator('[data-testid="stException"]').count() == 0
        shot(page, artifacts_dir / "ui-evaluate-outline.png")
    (artifacts_dir / "ui-timing-evaluate.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(f"\nevaluate {len(ids)} images (CAM only): runs {timing['evaluate_run_s']} s vs "
          f"{timing['plain_predictions_s']:.2f} s of plain /predictions ({timing['ratio_run_vs_plain']}x); "
          f"outline -> CAM scores {timing['outline_to_cam_scores_s']:.2f} s")


def test_evaluate_page_says_how_right_the_model_was(chromium_browser, workbench, artifacts_dir, tmp_path):
    """A labelled set (a dataset folder zipped: manifest.csv, images, lesion masks; 12 benign and 12
    malignant images, normal ones would be skipped): the Evaluate page's image-level table with the
    ECE's interval, and the sentence with the ECE a perfectly calibrated model would show on as many
    images (binned ECE is biased upwards on few images)."""
    import zipfile

    from deepminer.data.phantoms import generate_dataset

    data = generate_dataset(tmp_path / "set", 24, 17, 1024, label_mix={"benign": 0.5, "malignant": 0.5})
    zpath = tmp_path / "labelled.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in data.rglob("*"):
            if f.is_file() and f.relative_to(data).parts[0] != "masks":
                z.write(f, str(f.relative_to(data)))
    with open_workbench(chromium_browser, workbench["url"]) as page:
        nav(page, "Evaluate")
        page.get_by_text("Evaluate explanations", exact=True).wait_for(timeout=60_000)
        idle(page)
        page.locator('[data-testid="stRadio"] label', has_text="A set of images with masks").click()
        after_input(page)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(zpath))
        page.get_by_text(re.compile(r"^24 image\(s\) with a mask")).wait_for(timeout=60_000)
        idle(page)
        page.get_by_role("button", name="Run", exact=True).click()
        after_input(page)
        heading = page.get_by_text(re.compile(r"How right the model was on these 24 images"))
        try:
            heading.wait_for(timeout=300_000)
        except Exception:
            shot(page, artifacts_dir / "ui-evaluate-classification-failed.png")
            raise
        page.wait_for_function(NOT_RUNNING, timeout=60_000)
        idle(page)
        heading.scroll_into_view_if_needed()
        table = page.locator('[data-testid="stDataFrame"], [data-testid="stTable"]', has_text="ECE").first
        table.wait_for(timeout=30_000)
        shot(page, artifacts_dir / "ui-evaluate-classification.png")
        # (the tables are drawn on a canvas; the sentence under them is text)
        note = page.get_by_text(re.compile(r"^ECE \d\.\d{3}: a perfectly calibrated model would show \d\.\d{3} on "
                                           r"average on 24 images"))
        assert note.count() == 1
        assert page.locator('[data-testid="stException"]').count() == 0


def test_silencing_units(chromium_browser, workbench, torchserve, model_dir, artifacts_dir, tmp_path):
    """"What if these units were quiet?": on Sketch & label, a rectangle around the finding, then
    "Silence the matching units" (before/after/change and the class map after); on Explain, "Silence a label's
    units" for a label stored for this model. The numbers are the server's own ablation answer.
    Screenshots ``ui-sketch-silenced.png`` and ``ui-explain-silenced.png``."""

    from deepminer.atlas import Atlas
    from deepminer.client import Client
    from deepminer.labels import LabelStore

    image = tmp_path / "mammo-silence.png"
    image.write_bytes(square_mammogram(13, 0))
    with Client(torchserve.inference_url, model="demo", timeout=120) as c:
        ref = c.explain(image.read_bytes(), max_side=1024)
    units = sorted(ref.top_units[ref.prediction][:3])
    weights = Atlas.load(model_dir / "atlas").meta["model"]["weights_sha256"]
    LabelStore(workbench["labels_url"]).set_labels("demo", weights, units, "quiet test label", "Dr. Playwright")
    with Client(torchserve.inference_url, model="demo", timeout=120) as c:
        silenced = c.explain(image.read_bytes(), max_side=1024, ablate=units)
    assert silenced.cache_hit and silenced.timing_ms["forward"] == 0  # from the cached unit maps

    with open_workbench(chromium_browser, workbench["url"]) as page:
        explain_upload(page, image)
        idle(page)
        # Explain: silence the label's units
        box = page.locator('[data-testid="stSelectbox"]', has_text="Silence the units labelled").first
        box.scroll_into_view_if_needed()
        box.locator("input").click()
        page.get_by_role("option", name="quiet test label").first.click()
        after_input(page)
        page.get_by_text(re.compile(r"^Silenced:")).first.wait_for(timeout=60_000)
        text = page.locator('[data-testid="stMarkdownContainer"]', has_text="Silenced:").first.inner_text()
        assert f"units {', '.join(map(str, units))}" in text and f"\u2192 {silenced.ablation.prediction}" in text
        cls = silenced.ablation.prediction
        assert page.get_by_text(f"P({cls}) per position with the units silenced (blue 0, red 1)").count() == 1
        shot(page, artifacts_dir / "ui-explain-silenced.png")

        # Sketch & label: a rectangle around the finding (40 px margin), then silence the units that fire there
        from deepminer.data.phantoms import render_phantom

        ys, xs = np.nonzero(np.asarray(render_phantom(13, 0, size=1024).lesion))
        nav(page, "Sketch & label")
        page.get_by_text("Unit map", exact=True).wait_for(timeout=60_000)
        idle(page)
        _draw_box(page, (xs.min() - 40) / 1024, (ys.min() - 40) / 1024, (xs.max() - xs.min() + 80) / 1024,
                  (ys.max() - ys.min() + 80) / 1024)
        page.get_by_text(re.compile(r"^Units ranked by IoU")).wait_for(timeout=60_000)
        idle(page)
        toggle = page.locator('[data-testid="stCheckbox"]', has_text=re.compile(r"Silence the \d+ matching unit"))
        assert toggle.count() == 1, page.get_by_text(re.compile(r"^Units ranked by IoU")).first.inner_text()
        toggle.first.click()
        after_input(page)
        page.get_by_text(re.compile(r"^Silenced:")).first.wait_for(timeout=60_000)
        assert page.get_by_text(re.compile(r"per position with the units silenced")).count() == 1
        shot(page, artifacts_dir / "ui-sketch-silenced.png")

        # Unit atlas: is influence causal? (the atlas's ablation.json, when measured)
        nav(page, "Unit atlas")
        page.get_by_text("Is influence causal?", exact=True).wait_for(timeout=60_000)
        idle(page)
        if (model_dir / "atlas" / "ablation.json").is_file():
            page.get_by_text(re.compile(r"mean influence vs the mean drop of P")).first.wait_for(timeout=30_000)
        else:
            assert page.get_by_text(re.compile(r"^No ablation measurement for this atlas yet")).count() == 1
        shot(page, artifacts_dir / "ui-atlas-ablation.png")


def test_out_of_domain_banner(chromium_browser, workbench, torchserve, model_dir, artifacts_dir, tmp_path):
    """A natural photograph (scikit-image's astronaut) on the Explain page of the demo model: the
    out-of-domain banner, worded from the model's training data (``ui-out-of-domain.png``)."""
    if not (model_dir / "domain.pt").is_file():
        pytest.skip(f"{model_dir} has no domain.pt (deepminer domain-fit, docs/domain.md)")
    import skimage.data
    from PIL import Image

    from deepminer.client import Client
    from ui.logic import domain_banner

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    with Client(torchserve.inference_url, model="demo", timeout=120) as c:
        served = c.explain(photo.read_bytes(), max_side=1024)
    assert served.domain is not None and not served.domain["in_domain"], served.domain
    banner = domain_banner(served.model, served.domain)
    with open_workbench(chromium_browser, workbench["url"]) as page:
        explain_upload(page, photo, size=(512, 512))
        alert = page.locator('[data-testid="stAlert"]', has_text="Out of the model's domain")
        alert.wait_for(timeout=30_000)
        shown = " ".join(alert.inner_text().split())
        assert "its output on this image is not meaningful" in shown, shown
        if "synthetic phantoms" in str(served.model.get("trained_on")):
            assert "The model was trained on synthetic phantoms" in shown, shown
        assert banner.split(" (")[0] in shown and f"threshold {served.domain['threshold']:.4g}" in shown, (shown, banner)
        shot(page, artifacts_dir / "ui-out-of-domain.png")
