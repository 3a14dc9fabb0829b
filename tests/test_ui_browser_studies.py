"""The Studies page end to end in a real browser (Debian chromium, Playwright) against a real Orthanc
(DICOMweb), a real TorchServe (the tiny model fixture) and ``streamlit run``.

A 4-view exam of 4,500 x 3,000 16-bit (12 stored) uncompressed MG DICOMs (phantoms, 3x enlarged) is
stored in Orthanc; the page lists it (search by accession), opens it: four CAMs hung RCC/LCC over
RMLO/LMLO and the exam score per breast; the time from the click to all four explanations on screen
goes to ``test-artifacts/studies-timing.json``. The results are stored back (STOW-RS) and read from
Orthanc: dciodvfy clean, the SEG's CAM equal to the one TorchServe gives for that view. Then a study
without mammograms, four uploaded files as an exam, and the PACS down: a message each, the page keeps
working. Screenshots: ``test-artifacts/ui-studies*.png``.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from browser import after_input, nav, open_workbench, shot

from serve.launch import free_port
from serve.workbench import NOT_RUNNING, idle, streamlit_app

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.serve]

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4500, 3000)


@pytest.fixture(scope="module")
def served(tiny_server, tiny_model_path):
    """The session's tiny TorchServe (conftest.py ``tiny_server``), its model's folder and name."""
    from modelfixtures import TINY_MODEL

    return {"ts": tiny_server, "model_dir": tiny_model_path.parent, "name": TINY_MODEL}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from dicomfixtures import SECONDARY_CAPTURE, write_dicom, write_exam

    from deepminer.pacs import Orthanc, Pacs

    orth = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port()).start(timeout=60)
    folder = tmp_path_factory.mktemp("exams")
    big = write_exam(folder / "big", seed=9, patients=(2, 3), height=SHAPE[0], width=SHAPE[1], upscale=3,
                     patient_id="FULLFIELD", accession="ACC-FULL")
    small = write_exam(folder / "small", seed=9, patients=(4, 5), height=768, patient_id="UPLOAD")
    other = write_dicom(folder / "ot.dcm", np.zeros((16, 16), np.uint8), patient_id="NO-MAMMO", accession="ACC-OT",
                        sop_class=SECONDARY_CAPTURE)
    ds = pydicom.dcmread(other)
    ds.Modality = "OT"
    with Pacs(orth.dicomweb_url) as p:
        p.store([pydicom.dcmread(f) for f in big.values()] + [ds])
    yield {"orthanc": orth, "big": big, "small": small}
    orth.stop()


@pytest.fixture(scope="module")
def studies_app(served, pacs, tmp_path_factory):
    work = tmp_path_factory.mktemp("studies-app")
    port = free_port()
    env = {**os.environ, "DEEPMINER_SERVE_URL": served["ts"].inference_url, "DEEPMINER_MODEL": served["name"],
           "DEEPMINER_BACKEND": "serve", "DEEPMINER_MODEL_DIR": str(served["model_dir"]),
           "DEEPMINER_LABELS_URL": f"sqlite:///{work / 'labels.db'}", "DEEPMINER_SAMPLES": str(work / "samples"),
           "DEEPMINER_MAX_SIDE": "1024", "DEEPMINER_DICOMWEB_URL": pacs["orthanc"].dicomweb_url}
    for k in ("DEEPMINER_KEY_FILE", "DEEPMINER_TOKEN", "DEEPMINER_PACS"):
        env.pop(k, None)
    with streamlit_app(env, port, work) as url:
        yield {"url": url, "log": work / "streamlit.log"}


def _pick_study(page, text: str) -> None:
    box = page.locator('[data-testid="stSelectbox"]', has_text="Study to open").first
    box.click()
    page.get_by_role("option", name=re.compile(re.escape(text))).first.click()
    after_input(page)


def _search(page, accession: str) -> None:
    page.get_by_role("textbox", name="Accession number").fill(accession)
    page.get_by_role("button", name="Search studies", exact=True).click()
    after_input(page)


def _page_times(page) -> tuple[float, float]:
    """(total, fetch + decode) seconds as the page reports them under the exam."""
    shown = page.locator('[data-testid="stMarkdownContainer"]', has_text="4 of 4 views explained").first.inner_text()
    m = re.search(r"in ([\d.]+) s \(images fetched and decoded in ([\d.]+) s\)", shown)
    assert m, shown
    return float(m.group(1)), float(m.group(2))


def _views_on_screen(page) -> int:
    return page.evaluate("""() => [...document.querySelectorAll('[data-testid="stImage"] img')]
        .filter(i => i.complete && i.naturalWidth > 0).length""")


def test_studies_page(chromium_browser, studies_app, served, pacs, artifacts_dir, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from dicomfixtures import dciodvfy_errors

    import highdicom as hd

    from deepminer.client import Client
    from deepminer.data.io import load_image
    from deepminer.dicom_results import cam_for_seg
    from deepminer.pacs import Pacs
    from ui.studies import model_input

    timing: dict[str, object] = {"image": f"4 views, {SHAPE[1]} x {SHAPE[0]} (width x height) 16-bit (12 stored) "
                                          "uncompressed MG DICOM each, in Orthanc (DICOMweb)",
                                 "model": "tiny test model (TorchServe, batchSize 4)"}
    with open_workbench(chromium_browser, studies_app["url"]) as page:
        nav(page, "Studies")
        page.get_by_text(re.compile(r"^Studies 1-2 at ")).wait_for(timeout=60_000)
        idle(page)

        # a study without mammograms: a message, nothing else
        _search(page, "ACC-OT")
        _pick_study(page, "1 image(s)")
        page.get_by_role("button", name="Open as 4-view exam").click()
        page.get_by_text("This study has no mammograms").wait_for(timeout=30_000)
        idle(page)

        # the 4-view exam: click -> four explanations on screen
        _search(page, "ACC-FULL")
        _pick_study(page, "4 image(s)")
        t0 = time.perf_counter()
        page.get_by_role("button", name="Open as 4-view exam").click()
        page.get_by_text("4 of 4 views explained").wait_for(timeout=120_000)
        page.wait_for_function(NOT_RUNNING, timeout=60_000)
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="stImage"] img')]
            .filter(i => i.complete && i.naturalWidth > 0).length >= 4""", timeout=30_000)
        timing["click_to_four_explanations_s"] = round(time.perf_counter() - t0, 2)
        timing["page_reports_total_s"], timing["page_reports_fetch_decode_s"] = _page_times(page)
        idle(page)
        # again (a warm UI process; the server's feature cache knows these images: its forward is skipped)
        t0 = time.perf_counter()
        page.get_by_role("button", name="Open as 4-view exam").click()
        try:
            page.wait_for_function("""() => document.querySelector('[data-testid="stApp"]')
                .getAttribute('data-test-script-state') === 'running'""", timeout=10_000)
        except PlaywrightTimeout:
            pass  # it already ran
        page.wait_for_function(NOT_RUNNING, timeout=120_000)
        page.get_by_text("4 of 4 views explained").wait_for(timeout=30_000)
        timing["again_click_to_four_explanations_s"] = round(time.perf_counter() - t0, 2)
        timing["again_page_reports_total_s"], timing["again_page_reports_fetch_decode_s"] = _page_times(page)
        timing["load_average"] = [round(x, 2) for x in os.getloadavg()]
        idle(page)
        for slot in ("RCC", "LCC", "RMLO", "LMLO"):  # four CAMs, each with its prediction
            assert page.get_by_text(re.compile(rf"^{slot} · \w+ \(\d\.\d\d\) · CAM of \w+")).count() == 1, slot
        assert _views_on_screen(page) == 4
        boxes = {s: page.get_by_text(re.compile(rf"^{s} · ")).first.bounding_box() for s in ("RCC", "LCC", "RMLO", "LMLO")}
        assert boxes["RCC"]["x"] < boxes["LCC"]["x"] and boxes["RMLO"]["x"] < boxes["LMLO"]["x"]  # right on the left
        assert boxes["RCC"]["y"] < boxes["RMLO"]["y"] and boxes["LCC"]["y"] < boxes["LMLO"]["y"]  # CC above MLO
        page.get_by_text("Exam score per breast").wait_for(timeout=10_000)
        for side in ("Right", "Left"):
            assert page.get_by_text(re.compile(rf"^{side} breast: exam score \d\.\d\d \(max P\(malignant\)")).count() == 1
        assert page.get_by_text(re.compile("trained on synthetic phantoms")).count() >= 1
        shot(page, artifacts_dir / "ui-studies-exam.png")

        # store the results back
        page.get_by_role("button", name="Store results to PACS").click()
        page.get_by_text(re.compile(r"^Stored 12 objects")).wait_for(timeout=180_000)
        idle(page)

        # four uploaded files open as an exam too
        page.locator('[data-testid="stRadio"] label', has_text="Upload four files").click()
        after_input(page)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
            [str(p) for p in pacs["small"].values()])
        after_input(page)
        page.get_by_role("button", name="Open as exam").click()
        page.get_by_text("4 of 4 views explained").wait_for(timeout=120_000)
        idle(page)
        assert page.get_by_text(re.compile(r"^LMLO · \w+ \(\d\.\d\d\)")).count() == 1
        shot(page, artifacts_dir / "ui-studies-upload.png")

        # the PACS down: a message on the page, the page still answers
        page.locator('[data-testid="stRadio"] label', has_text="From the PACS").click()
        after_input(page)
        pacs["orthanc"].stop()
        page.get_by_role("button", name="Search studies", exact=True).click()
        after_input(page)
        page.get_by_text(re.compile("the PACS is not reachable at")).wait_for(timeout=30_000)
        shot(page, artifacts_dir / "ui-studies-pacs-down.png")
        nav(page, "Explain")
        page.get_by_text("Upload a mammogram").wait_for(timeout=30_000)
    assert "Traceback" not in studies_app["log"].read_text(errors="replace")

    # the stored results, read from Orthanc: valid DICOM, the CAM TorchServe gives for that view
    pacs["orthanc"].start(timeout=60)
    with Pacs(pacs["orthanc"].dicomweb_url) as p:
        study, = p.search_studies(accession="ACC-FULL").studies
        insts = p.instances(study.uid)
        assert sorted(i.modality for i in insts) == sorted(["MG"] * 4 + ["SEG"] * 4 + ["SR"] * 4 + ["OT"] * 4)
        rcc_src = pydicom.dcmread(pacs["big"]["RCC"], stop_before_pixels=True)
        seen = set()
        for inst in insts:
            if inst.modality == "MG" or inst.modality in seen:
                continue
            path = tmp_path / f"{inst.modality}.dcm"
            path.write_bytes(p.retrieve_bytes(inst))
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if inst.modality == "SEG" and ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
                    .ReferencedSOPInstanceUID != rcc_src.SOPInstanceUID:
                continue
            seen.add(inst.modality)
            assert dciodvfy_errors(path) == [], (inst.modality, dciodvfy_errors(path))
            assert ds.PatientID == "FULLFIELD" and ds.StudyInstanceUID == study.uid
            if inst.modality == "SEG":
                seg = hd.seg.segread(path)
                px = seg.get_pixels_by_source_instance([rcc_src.SOPInstanceUID], segment_numbers=[1],
                                                       rescale_fractional=True)[0, :, :, 0]
                assert px.shape == SHAPE
                pixels = load_image(pacs["big"]["RCC"]).pixels
                with Client(served["ts"].inference_url, model=served["name"], timeout=120) as c:
                    expl = c.explain(model_input(pixels, 1024), max_side=1024, unit_maps="top")
                assert np.abs(px - cam_for_seg(expl, SHAPE) / 255.0).max() <= 1.5 / 255
        assert seen == {"SEG", "SR", "OT"}

    (artifacts_dir / "studies-timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(f"\nStudies: click -> four explanations of {SHAPE[1]} x {SHAPE[0]} DICOMs on screen: "
          f"{timing['click_to_four_explanations_s']} s (page: {timing['page_reports_total_s']} s)")


@pytest.fixture(scope="module")
def quirk_app(served, tmp_path_factory):
    """The workbench against the tiny TorchServe, no PACS (the upload path of the Studies page)."""
    work = tmp_path_factory.mktemp("quirk-app")
    port = free_port()
    env = {**os.environ, "DEEPMINER_SERVE_URL": served["ts"].inference_url, "DEEPMINER_MODEL": served["name"],
           "DEEPMINER_BACKEND": "serve", "DEEPMINER_MODEL_DIR": str(served["model_dir"]),
           "DEEPMINER_LABELS_URL": f"sqlite:///{work / 'labels.db'}", "DEEPMINER_SAMPLES": str(work / "samples"),
           "DEEPMINER_MAX_SIDE": "1024"}
    for k in ("DEEPMINER_KEY_FILE", "DEEPMINER_TOKEN", "DEEPMINER_PACS", "DEEPMINER_DICOMWEB_URL"):
        env.pop(k, None)
    with streamlit_app(env, port, work) as url:
        yield {"url": url, "log": work / "streamlit.log"}


def test_quirk_exam_upload(chromium_browser, quirk_app, artifacts_dir, tmp_path):
    """Five DICOMs as film archives hold them uploaded on the Studies page: laterality only in the
    series' Laterality, the view in a single-valued Patient Orientation (or ViewPosition), RLE and
    JPEG-LS, retired names; the four views hung with their CAMs and what was inferred, from where;
    the fifth (no laterality anywhere) named as not hung. Screenshot: ui-studies-quirks.png."""
    from dicomfixtures import write_quirk
    from pydicom.uid import generate_uid

    study = generate_uid()
    kinds = {("R", "CC"): "film_cc", ("L", "CC"): "series_laterality", ("R", "MLO"): "film_mlo",
             ("L", "MLO"): "jpegls"}
    files = [write_quirk(tmp_path / f"{lat}{vw}.dcm", q, laterality=lat, view=vw, study_uid=study, height=768)
             for (lat, vw), q in kinds.items()]
    stray = write_quirk(tmp_path / "stray.dcm", "film_cc", study_uid=study, height=768)
    ds = pydicom.dcmread(stray)
    del ds.Laterality
    ds.save_as(stray)
    with open_workbench(chromium_browser, quirk_app["url"]) as page:
        nav(page, "Studies")
        page.locator('[data-testid="stRadio"] label', has_text="Upload four files").click()
        after_input(page)
        page.get_by_text(re.compile("a Patient Orientation naming the view")).first.wait_for(timeout=30_000)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(p) for p in [*files, stray]])
        after_input(page)
        page.get_by_role("button", name="Open as exam").click()
        page.get_by_text("4 of 4 views explained").wait_for(timeout=120_000)
        page.wait_for_function(NOT_RUNNING, timeout=60_000)
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="stImage"] img')]
            .filter(i => i.complete && i.naturalWidth > 0).length >= 4""", timeout=30_000)
        idle(page)
        for slot in ("RCC", "LCC", "RMLO", "LMLO"):
            assert page.get_by_text(re.compile(rf"^{slot} · \w+ \(\d\.\d\d\) · CAM of \w+")).count() == 1, slot
            said = page.get_by_text(re.compile(rf"^{slot} \({slot}\.dcm\): laterality {slot[0]} from Laterality "
                                               r"\(series\)")).first.inner_text()
            assert ("from PatientOrientation" in said) == (slot != "LCC"), said
        assert page.get_by_text("Not hung: stray.dcm (no laterality)").count() == 1
        boxes = {s: page.get_by_text(re.compile(rf"^{s} · ")).first.bounding_box() for s in ("RCC", "LCC", "RMLO", "LMLO")}
        assert boxes["RCC"]["x"] < boxes["LCC"]["x"] and boxes["RCC"]["y"] < boxes["RMLO"]["y"]
        shot(page, artifacts_dir / "ui-studies-quirks.png")
    assert "Traceback" not in quirk_app["log"].read_text(errors="replace")


REAL_SHAPE = (4084, 3328)  # height x width: 13.6 MP, a digitized film's size


def _film_pair(folder: Path) -> dict[str, list[Path]]:
    """Two RLE Lossless DICOMs of each kind, REAL_SHAPE, 12 bits stored: ``real``: a scanned film
    (burned-in text, a label, film border and grain; packets across row ends as some archives'
    encoders write them, film archive headers: series Laterality, single-valued Patient Orientation);
    ``generated``: a phantom, per-row RLE. The second of each differs in its SOP instance only."""
    from dicomfixtures import set_rle_cross_rows, synthetic_film, write_dicom, write_quirk
    from PIL import Image
    from pydicom.uid import generate_uid

    from deepminer.data.phantoms import render_phantom

    h, w = REAL_SHAPE
    film, _ = synthetic_film(h // 4, w // 4, seed=2)
    film = np.asarray(Image.fromarray(film).resize((w, h), Image.Resampling.BILINEAR)).astype(np.float32)
    film = np.clip(film + np.random.default_rng(2).normal(0, 6, film.shape), 0, 4095).astype(np.uint16)
    real = write_quirk(folder / "real-1.dcm", "rle_cross_rows", laterality="R", view="MLO", height=64)
    ds = pydicom.dcmread(real)  # the film's pixels in that header, encoded the same way
    set_rle_cross_rows(ds, film)
    ds.save_as(real, enforce_file_format=True)
    img = np.asarray(render_phantom(5, 0, size=h).image)
    values = np.zeros(REAL_SHAPE, np.uint16)
    values[:img.shape[0], :min(w, img.shape[1])] = np.clip(img[:, :w], 0, 4095)
    gen = write_dicom(folder / "generated-1.dcm", values, bits_stored=12, fast_rle=True, laterality="R", view="CC")
    out: dict[str, list[Path]] = {"real": [real], "generated": [gen]}
    for kind, first in (("real", real), ("generated", gen)):
        d = pydicom.dcmread(first)
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        second = folder / f"{kind}-2.dcm"
        d.save_as(second, enforce_file_format=True)
        out[kind].append(second)
    return out


def test_real_vs_generated_explain_time(chromium_browser, quirk_app, served, artifacts_dir, tmp_path):
    """The Explain page, side by side in one run: a 13.6 MP film-like RLE DICOM and a generated one of
    the same size, each uploaded twice (the second differs in its header only: decoded and explained
    from scratch); upload -> explanation on screen, and the server's own decode/tissue times.
    ``test-artifacts/explain-real-vs-generated.json``."""
    from browser import explain_upload

    from deepminer.client import Client

    files = _film_pair(tmp_path)
    result: dict[str, object] = {"image": f"{REAL_SHAPE[1]} x {REAL_SHAPE[0]} 16-bit (12 stored) RLE Lossless",
                                 "model": "tiny test model (TorchServe)", "upload_to_explanation_s": {}}
    with open_workbench(chromium_browser, quirk_app["url"]) as page:
        nav(page, "Explain")
        idle(page)
        for kind in ("generated", "real"):
            times = []
            for path in files[kind]:
                times.append(round(explain_upload(page, path, size=(REAL_SHAPE[1], REAL_SHAPE[0])), 2))
                idle(page)
            result["upload_to_explanation_s"][kind] = times  # type: ignore[index]
    with Client(served["ts"].inference_url, model=served["name"], timeout=120) as c:
        result["server_ms"] = {k: {m: c.explain(files[k][0].read_bytes(), max_side=1024).timing_ms.get(m)
                                   for m in ("decode", "tissue", "handler")} for k in files}
    result["bytes"] = {k: files[k][0].stat().st_size for k in files}
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    (artifacts_dir / "explain-real-vs-generated.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + json.dumps(result))
    up = result["upload_to_explanation_s"]
    assert all(0 < t < 30 for k in up for t in up[k]), up  # type: ignore[union-attr]
    assert "Traceback" not in quirk_app["log"].read_text(errors="replace")
