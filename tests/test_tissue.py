"""Breast tissue mask on scanned-film-like mammograms written as real DICOMs (burned-in text, label
sticker, film border strips), on a digital-style image, on a phantom, and the full-field speed budget."""
from __future__ import annotations


import numpy as np
import pytest
from skimage.filters import threshold_otsu

from deepminer.data.io import load_image
from deepminer.data.tissue import keep_tissue, otsu_threshold, tissue_fraction, tissue_mask
from dicomfixtures import synthetic_film, write_dicom


def score(mask, truth):
    breast = truth["breast"]
    return {
        "kept": (mask & breast).sum() / breast.sum(),
        "text": int((mask & truth["text"]).sum()),
        "label": int((mask & truth["label"]).sum()),
        "border": (mask & truth["border"]).sum() / truth["border"].sum(),
        "extra": (mask & ~breast).sum() / breast.sum(),
    }


@pytest.mark.parametrize("variant", ["MONOCHROME1-RLE", "MONOCHROME2-uncompressed"])
@pytest.mark.parametrize("border", ["top", "right"])
def test_mask_of_dicom_with_burned_in_text_excludes_text_and_border(tmp_path, variant, border, artifacts_dir):
    values, truth = synthetic_film(600, 400, seed=3, touch_top=True, border=border)
    assert truth["text"].sum() > 500 and truth["border"].sum() > 5000  # the artefacts are really there
    if variant.startswith("MONOCHROME1"):
        path = write_dicom(tmp_path / "film.dcm", (4095 - values).astype(np.uint16), photometric="MONOCHROME1",
                           bits_stored=12, rle=True, laterality="R", view="MLO")
    else:
        path = write_dicom(tmp_path / "film.dcm", values, bits_stored=12, laterality="R", view="MLO")
    img = load_image(path)
    np.testing.assert_allclose(img.pixels, values / 4095, atol=1e-6)  # inverted back to bright = dense
    mask = tissue_mask(img.pixels)
    s = score(mask, truth)
    assert s["text"] == 0 and s["label"] == 0, s
    assert s["border"] < 0.005, s
    assert s["kept"] >= 0.95, s
    assert s["extra"] < 0.02, s
    assert abs(tissue_fraction(mask) - truth["breast"].mean()) < 0.03
    if variant.startswith("MONOCHROME1") and border == "top":
        from PIL import Image
        vis = np.stack([img.pixels * 255] * 3, -1).astype(np.uint8)
        vis[mask, 0] = 255
        Image.fromarray(vis).save(artifacts_dir / "tissue_mask_film.png")


def test_border_strip_below_and_breast_away_from_edges():
    values, truth = synthetic_film(480, 320, seed=5, touch_top=False, border="bottom")
    s = score(tissue_mask(values / 4095.0), truth)
    assert s["text"] == 0 and s["label"] == 0 and s["border"] < 0.005 and s["kept"] >= 0.95 and s["extra"] < 0.02, s


def test_digital_style_right_breast_keeps_the_chest_wall():
    # a digital mammogram: background exactly 0, breast against the RIGHT edge over its full height
    h, w = 400, 260
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((w - 1 - xx) / (0.8 * w), (yy - h / 2) / (0.62 * h))
    breast = r < 1.0
    rng = np.random.default_rng(1)
    img = np.where(breast, 0.25 + 0.5 * np.sqrt(np.clip(1 - r ** 2, 0, 1)) + rng.normal(0, 0.02, (h, w)), 0.0)
    mask = tissue_mask(np.clip(img, 0, 1).astype(np.float32))
    assert (mask & breast).sum() / breast.sum() >= 0.97
    assert (mask & ~breast).sum() / breast.sum() < 0.02
    assert mask[:, -1].sum() >= 0.9 * breast[:, -1].sum()  # the chest-wall column is not taken for a strip


def test_phantom_if_available():
    phantoms = pytest.importorskip("deepminer.data.phantoms")
    if not hasattr(phantoms, "render_phantom"):
        pytest.skip("phantom generator not there yet")
    ph = phantoms.render_phantom(0, 2, size=512)
    truth = ph.breast | ph.pectoral
    mask = tissue_mask(ph.image / 4095.0)
    assert (mask & truth).sum() / truth.sum() >= 0.95
    assert (mask & ~truth).sum() / truth.sum() < 0.02


def test_otsu_matches_skimage_and_edge_cases():
    rng = np.random.default_rng(0)
    for k in range(4):
        x = np.concatenate([rng.normal(0.1, 0.03, 4000 * (k + 1)), rng.normal(0.55, 0.1, 3000)])
        assert otsu_threshold(x) == pytest.approx(threshold_otsu(x, nbins=256), abs=1e-9)
    assert not tissue_mask(np.full((64, 64), 0.4, np.float32)).any()  # no contrast, no tissue
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((8, 8, 3)))
    u16 = (np.pad(np.ones((40, 30)), 12) * 3000).astype(np.uint16)  # other ranges are min-max scaled
    assert tissue_mask(u16)[30, 25] and not tissue_mask(u16)[2, 2]


@pytest.mark.slow
def test_full_field_decode_and_mask(tmp_path):
    """A full-field 4500 x 3000 12-bit image as PNG, DICOM and MONOCHROME1 RLE DICOM: decoded at full size,
    its burned-in text outside the tissue mask. (How long that takes is a row of ``deepminer bench``:
    ``decode_mask_s``.)"""
    import cv2

    from deepminer.data.phantoms import png16

    small, truth = synthetic_film(900, 600, seed=2)
    big = cv2.resize(small.astype(np.float32), (3000, 4500), interpolation=cv2.INTER_LINEAR)
    big = np.clip(big + np.random.default_rng(0).normal(0, 20, big.shape), 0, 4095).astype(np.uint16)
    files = {
        "png": tmp_path / "ff.png",
        "dicom": write_dicom(tmp_path / "ff.dcm", big, bits_stored=12, window=(2000, 4096)),
        "dicom-monochrome1-rle": write_dicom(tmp_path / "ffr.dcm", (4095 - big).astype(np.uint16),
                                             photometric="MONOCHROME1", bits_stored=12, fast_rle=True),
    }
    files["png"].write_bytes(png16(big, bits=12))
    big_truth = cv2.resize(truth["text"].astype(np.uint8), (3000, 4500), interpolation=cv2.INTER_NEAREST) > 0
    for kind, path in files.items():
        img = load_image(path)
        mask = tissue_mask(img.pixels)
        assert img.pixels.shape == (4500, 3000) and img.bits_stored == 12, kind
        assert not (mask & big_truth).any(), kind


def test_keep_tissue_zeroes_background_and_labels_only():
    values, truth = synthetic_film(seed=3)
    img = (values / 4095.0).astype(np.float32)
    kept, fraction = keep_tissue(img)
    mask = tissue_mask(img)
    assert fraction == pytest.approx(tissue_fraction(mask))
    assert np.array_equal(kept[mask], img[mask]) and not kept[~mask].any()
    assert not mask[truth["text"]].any() and mask[truth["breast"]].mean() > 0.95
    blank = np.zeros((64, 64), np.float32)  # nothing found: the image comes back unchanged
    assert keep_tissue(blank)[1] == 0 and keep_tissue(blank)[0] is blank


def _scipy_mask_work(small):
    """The working-resolution mask computed with SciPy's filters: the independent reference the
    OpenCV implementation must reproduce."""
    from scipy import ndimage as ndi

    from deepminer.data import tissue as T

    smooth = ndi.gaussian_filter(small.astype(np.float32), 1.0)  # reflect border, radius 4
    fg = smooth > T._threshold(smooth)
    fg &= ~T._frame_strips(fg)
    if not fg.any():
        return fg
    disk = T._disk(T._OPEN_RADIUS)
    opened = ndi.binary_opening(fg, structure=disk)
    labels, n = ndi.label(opened, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(fg)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    breast = ndi.binary_dilation(labels == int(np.argmax(sizes)), structure=disk) & fg
    return ndi.binary_fill_holes(breast)


def _cases():
    from deepminer.data.phantoms import render_phantom

    film, _ = synthetic_film(600, 400, seed=3, touch_top=True, border="top")
    yield "film", (film / 4095.0).astype(np.float32)
    film2, _ = synthetic_film(480, 320, seed=5, touch_top=False, border="bottom")
    yield "film-bottom", (film2 / 4095.0).astype(np.float32)
    for seed in (0, 1):
        yield f"phantom{seed}", (render_phantom(seed, 2, size=384).image / 4095.0).astype(np.float32)
    rng = np.random.default_rng(4)
    blobs = np.zeros((200, 300), np.float32)  # several components, holes, a blob on the edge
    yy, xx = np.mgrid[0:200, 0:300]
    for cy, cx, r in ((100, 150, 60), (30, 40, 20), (180, 290, 25), (100, 150, 20)):
        blobs = np.where(np.hypot(yy - cy, xx - cx) < r, 0.8 - blobs, blobs)
    yield "blobs", np.clip(blobs + rng.normal(0, 0.03, blobs.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("name", ["film", "film-bottom", "phantom0", "phantom1", "blobs"])
def test_opencv_mask_matches_scipy_reference(name):
    from deepminer.data import tissue as T

    image = dict(_cases())[name]
    ours, ref = T._mask_work(image), _scipy_mask_work(image)
    assert ref.any() and ref.sum() > 0.05 * ref.size
    differ = int((ours != ref).sum())
    # the Gaussian kernels differ in the last float bits, which may move a pixel sitting exactly at
    # the threshold; nothing more
    assert differ <= max(2, ref.size // 20000), (name, differ, int(ref.sum()))


def test_fill_holes_matches_scipy_on_random_masks():
    from scipy import ndimage as ndi

    from deepminer.data.tissue import fill_holes

    rng = np.random.default_rng(0)
    for k in range(20):
        m = rng.random((40 + k, 60 - k)) < 0.55
        np.testing.assert_array_equal(fill_holes(m), ndi.binary_fill_holes(m))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a one-pixel hole
    diag = ring.copy()
    diag[3:6, 3:6] = False
    diag[6, 6] = False  # a hole touching the outside only diagonally stays a hole (4-connected)
    assert fill_holes(ring).sum() == 25 and fill_holes(diag)[4, 4]
