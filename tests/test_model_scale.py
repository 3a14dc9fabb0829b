"""The model knows its scale (issue 21): a checkpoint's ``meta["scale"]``, the order and arithmetic of
:func:`deepminer.model_scale.input_side`, and every path (engine, service, served) explaining at the
model's own scale unless ``max_side`` is asked: phantoms of any generator size, a DICOM by its Pixel
Spacing, a dataset folder by its ``phantoms.json``."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from deepminer.data.io import load_image, png16_of_pixels
from deepminer.data.phantoms import generate_dataset, render_phantom
from deepminer.data.tissue import tissue_mask
from deepminer.explain.engine import explain_image
from deepminer.explain.service import ExplainService
from deepminer.geometry import DEFAULT_MAX_SIDE, side_size
from deepminer.model_scale import (PHANTOM_HEIGHT_MM, breast_extent, describe_scale, input_side, model_scale,
                                   phantom_spacing_mm)
from dicomfixtures import write_dicom
from modelfixtures import tiny_model

LONG = 256  #: the tiny test model's recorded long side (kept small: 2 shared cores)
MM = PHANTOM_HEIGHT_MM / LONG
SEED, INDEX = 5, 2  #: one patient, drawn at every size


def phantom_pixels(size: int) -> np.ndarray:
    p = render_phantom(SEED, INDEX, size, view="CC")
    return (p.image.astype(np.float32) / 4095.0).clip(0, 1)  # 12-bit phantoms


@pytest.fixture(scope="module")
def scale() -> dict:
    """The scale a model trained on this patient at LONG px would record (the training code's recipe:
    the breast extent of the tissue mask at the model-input size)."""
    return {"long_side": LONG, "mm_per_px": MM, "breast_extent_px": breast_extent(tissue_mask(phantom_pixels(LONG)))}


@pytest.fixture(scope="module")
def scaled_model(scale):
    model = tiny_model(0)
    model.meta = {**(getattr(model, "meta", None) or {}), "scale": scale}
    return model


# -- input_side: order and arithmetic -----------------------------------------------------------------

META = {"scale": {"long_side": 512, "mm_per_px": 0.46875, "breast_extent_px": 250.0}}


def test_input_side_order_and_arithmetic():
    block = np.zeros((1000, 600), bool)
    block[100:200, 100:200] = True  # extent 100 px
    # 1. an asked max_side wins, and only shrinks
    assert input_side(META, 1000, 600, max_side=300, spacing_mm=0.1, tissue=block) == (300, "asked: long side at most 300 px")
    assert input_side(META, 1000, 600, max_side=2048)[0] == 1000
    # 2. pixel spacing: the physical size kept, before the breast
    side, how = input_side(META, 1024, 604, spacing_mm=phantom_spacing_mm(1024), tissue=block)
    assert side == 512 and how.startswith("pixel spacing 0.2344 mm -> 0.4688 mm/px")
    assert input_side(META, 1536, 906, spacing_mm=phantom_spacing_mm(1536))[0] == 512
    assert input_side(META, 3328, 2560, spacing_mm=0.07)[0] == round(3328 * 0.07 / 0.46875)  # a real detector
    # 3. the breast's extent: resized so it matches the training median (enlarging too)
    breast = np.zeros((1000, 600), bool)
    breast[100:300, 100:400] = True  # extent sqrt(200 x 300) px: 1000 x 250 / 244.9
    assert input_side(META, 1000, 600, tissue=breast) == (1021, "breast extent")
    small = np.zeros((400, 300), bool)
    small[50:175, 50:175] = True  # extent 125 px: 400 x 250 / 125, enlarged twice
    assert input_side(META, 400, 300, tissue=small) == (800, "breast extent")
    assert input_side(META, 1000, 600, tissue=np.zeros((1000, 600), bool))[0] == 512  # no breast: the long side
    assert input_side(META, 1000, 600, spacing_mm=0.0, tissue=breast)[0] == 1021  # a zero spacing is no spacing
    # ... but to at most twice the model's long side: a breast this small for its image (extent 100 px of
    # 1000, which would ask for 2500) is not one the rule can trust, and memory grows with the side squared
    side, how = input_side(META, 1000, 600, tissue=block)
    assert side == 2 * 512 and how.startswith("breast extent, capped at 2 x the model's long side")
    # clamped to the max_side range
    assert input_side(META, 100, 60, spacing_mm=0.01)[0] == 64
    # 4. no recorded scale: at most the old default
    assert input_side({}, 2000, 1200, tissue=block, spacing_mm=0.1) == (
        DEFAULT_MAX_SIDE, f"default: long side at most {DEFAULT_MAX_SIDE} px (the model records no scale)")
    assert input_side({}, 512, 302)[0] == 512
    assert model_scale({"scale": {"long_side": 0}}) is None and model_scale(object()) is None


def test_breast_extent_and_phantom_spacing():
    m = np.zeros((50, 40), bool)
    m[:10, :10] = True
    assert breast_extent(m) == 10.0 and breast_extent(np.zeros((4, 4), bool)) == 0.0
    assert phantom_spacing_mm(512) == PHANTOM_HEIGHT_MM / 512
    assert side_size(512, 302, 1024) == (1024, 604) and side_size(1024, 604, 512) == (512, 302)


# -- the engine and the service --------------------------------------------------------------------

def test_engine_resizes_to_an_exact_side_and_says_how(scaled_model):
    img = phantom_pixels(256)
    up = explain_image(scaled_model, img, input_side=(512, "breast extent"), unit_maps="none")
    assert (up.input["model_height"], up.input["model_width"]) == (512, 302)  # enlarged
    assert up.input["scale_source"] == "breast extent" and up.input["model_scale"]["long_side"] == LONG
    capped = explain_image(scaled_model, img, max_side=1024, unit_maps="none")
    assert capped.input["model_height"] == 256 and capped.input["scale_source"] == "max_side: long side at most 1024 px"
    assert "explained at 512 x 302 px (breast extent; the model's scale: long side 256 px)" == describe_scale(up.input)


@pytest.mark.parametrize("size", [256, 512, 768, 1024])
def test_phantoms_of_any_size_reach_the_model_scale(scaled_model, size):
    """The same patient drawn at 1x to 4x the training size (generator sizes 256..1024) is explained at the training scale:
    by the breast's extent (a PNG says no spacing), and exactly by the phantom's spacing."""
    service = ExplainService(scaled_model, settings={"cache_mb": 4})
    pixels = phantom_pixels(size)
    exp = service.explain(png16_of_pixels(pixels))
    assert exp.input["scale_source"] == "breast extent"
    assert abs(exp.input["model_height"] - LONG) <= 0.03 * LONG, exp.input
    side, how = service.input_side(pixels, spacing_mm=phantom_spacing_mm(size))
    assert side == LONG and how.startswith("pixel spacing")
    asked = service.explain(png16_of_pixels(pixels), {"max_side": 128})
    assert asked.input["model_height"] == 128 and asked.input["scale_source"].startswith("asked")


def test_a_dicom_is_scaled_by_its_pixel_spacing(scaled_model, tmp_path):
    """A DICOM's Pixel Spacing (else Imager Pixel Spacing) brings it to the model's mm per pixel, and the
    peers' gradient maps use the same side."""
    pixels = phantom_pixels(512)
    path = write_dicom(tmp_path / "mg.dcm", (pixels * 4095).astype(np.uint16), bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.ImagerPixelSpacing = [0.75, 0.75]
    ds.save_as(path)
    imager = path.read_bytes()
    ds.PixelSpacing = [0.5, 0.5]  # Pixel Spacing goes first
    ds.save_as(path)
    both = path.read_bytes()
    assert load_image(imager).spacing_mm == pytest.approx(0.75) and load_image(both).spacing_mm == pytest.approx(0.5)
    service = ExplainService(scaled_model, settings={"cache_mb": 4})
    exp = service.explain(both)
    assert exp.input["model_height"] == round(512 * 0.5 / MM) and exp.input["scale_source"].startswith(
        "pixel spacing 0.5 mm")
    exp = service.explain_methods(imager, {"methods": ["cam", "gradcam"]})
    assert exp.input["model_height"] == round(512 * 0.75 / MM)
    assert exp.method_maps["gradcam"].shape == exp.map_size


def test_a_model_without_scale_keeps_the_old_default():
    service = ExplainService(tiny_model(0), settings={"cache_mb": 4})
    exp = service.explain(png16_of_pixels(np.tile(phantom_pixels(256), (5, 5))))  # 1280 x 755
    assert exp.input["model_height"] == DEFAULT_MAX_SIDE and exp.input["model_scale"] is None
    assert exp.input["scale_source"].startswith("default")
    small = service.explain(png16_of_pixels(phantom_pixels(256)))
    assert small.input["model_height"] == 256  # never enlarged


def test_server_default_max_side_still_caps(scaled_model):
    service = ExplainService(scaled_model, settings={"cache_mb": 4, "default_max_side": 128})
    exp = service.explain(png16_of_pixels(phantom_pixels(256)))
    assert exp.input["model_height"] == 128 and exp.input["scale_source"].startswith("server default_max_side")


# -- the dataset folder and the workbench's upload -------------------------------------------------------

def test_phantom_folder_records_its_spacing(tmp_path, scaled_model):
    """phantoms.json and every image's PNG say the spacing; a generated phantom is explained by it."""
    from deepminer.data.dataset import pixel_spacing, read_manifest

    folder = generate_dataset(tmp_path / "d", 2, 3, 128)
    meta = json.loads((folder / "phantoms.json").read_text())
    assert meta["pixel_spacing_mm"] == phantom_spacing_mm(128)
    row = read_manifest(folder)[0]
    assert pixel_spacing(folder, row) == phantom_spacing_mm(128)
    image = (folder / row["image"]).read_bytes()
    assert load_image(image).spacing_mm == phantom_spacing_mm(128)
    exp = ExplainService(scaled_model, settings={"cache_mb": 4}).explain(image)
    assert exp.input["model_height"] == LONG and exp.input["scale_source"] == (
        f"pixel spacing 1.875 mm -> {MM:.4g} mm/px")  # enlarged 2x: the model's scale
    assert pixel_spacing(folder, {**row, "pixel_spacing_mm": "0.07"}) == 0.07  # a manifest column wins
    del meta["pixel_spacing_mm"]  # a folder written before: its size says
    (folder / "phantoms.json").write_text(json.dumps(meta))
    assert pixel_spacing(folder, row) == phantom_spacing_mm(128)
    assert pixel_spacing(tmp_path, {}) is None


def test_the_studies_upload_carries_the_spacing():
    from ui.studies import model_input

    pixels = phantom_pixels(512)
    sent = load_image(model_input(pixels, 256, 0.1))
    assert sent.pixels.shape[0] == 256 and sent.spacing_mm == pytest.approx(0.2)
    assert load_image(model_input(pixels, 256)).spacing_mm is None


# -- served: the scale follows the model ---------------------------------------------------------------

def test_the_served_scale_follows_the_model(tmp_path_factory, scale):
    """One real TorchServe serving a tiny model that records its scale: a request without max_side is
    explained at the model's scale (enlarged here), one with max_side as asked; the answer says which."""
    import os

    from deepminer.client import Client
    from deepminer.models import save_model
    from modelfixtures import start_tiny_server

    path = save_model(tiny_model(0), tmp_path_factory.mktemp("scaled") / "model.pt", scale=scale)
    ts = start_tiny_server(tmp_path_factory, path, "scaled", env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        with Client(ts.inference_url, model="scaled", timeout=120) as c:
            small = c.explain(png16_of_pixels(phantom_pixels(128)), unit_maps="none")
            assert abs(small.input["model_height"] - LONG) <= 0.03 * LONG and small.input["scale_source"] == "breast extent"
            assert small.input["model_scale"] == scale
            asked = c.explain(png16_of_pixels(phantom_pixels(128)), unit_maps="none", max_side=1024)
            assert asked.input["model_height"] == 128 and asked.input["scale_source"].startswith("asked")
    finally:
        ts.stop()
