"""Images of kinds the phantoms are not, as the files a user would send (PNG or DICOM bytes), for the
out-of-domain guard's tests and measurements (tests/test_domain_guard.py, docs/domain.md):

* photographs that ship inside scikit-image (``skimage.data``: no network);
* noise: uniform, Gaussian, salt-and-pepper, smooth (1/f) noise;
* phantoms of another texture model, written here: a breast outline like the generator's (against
  the chest wall, a skin fall-off) filled with sinusoid gratings, random discs, smooth value noise,
  or nothing (flat);
* DICOMs of other body parts, synthesized and written with pydicom (12-bit DX, MONOCHROME2): a
  chest radiograph (lungs, ribs, spine, heart), a hand (metacarpals and phalanges), a skull
  (calvarium, orbits), a knee; and the pixels of pydicom's own small CT and MR test files (real
  scans; filed as DX, since the loader refuses Modality CT/MR before any guard);
* a scanned-film mammogram (tests/dicomfixtures.synthetic_film) as a DICOM: not a kind the guard must
  reject by the issue's list, reported beside them.

Each function answers ``bytes``; :func:`kinds` names them all. Deterministic for a seed.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "moon", "coins", "rocket", "brick", "grass", "gravel",
          "text", "page", "hubble_deep_field", "immunohistochemistry", "retina", "cell", "clock")
NOISE = ("uniform", "gaussian", "salt_pepper", "smooth")
TEXTURES = ("sinusoids", "discs", "value_noise", "flat")
BODY_PARTS = ("chest", "hand", "skull", "knee", "pydicom_ct", "pydicom_mr")


def png(pixels: np.ndarray) -> bytes:
    """uint8 grey/RGB or uint16 grey pixels as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def _u12(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 4095), 0, 4095).astype(np.uint16)


def photograph(name: str) -> bytes:
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    return png(a)


def noise(kind: str, seed: int = 0, shape: tuple[int, int] = (1024, 604)) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.random(shape)
    elif kind == "gaussian":
        x = 0.5 + 0.15 * rng.standard_normal(shape)
    elif kind == "salt_pepper":
        x = np.full(shape, 0.5)
        r = rng.random(shape)
        x[r < 0.1], x[r > 0.9] = 0.0, 1.0
    elif kind == "smooth":
        f = np.fft.rfft2(rng.standard_normal(shape))
        fy = np.fft.fftfreq(shape[0])[:, None]
        fx = np.fft.rfftfreq(shape[1])[None, :]
        f /= np.maximum(np.hypot(fy, fx), 1.0 / max(shape)) ** 1.5
        x = np.fft.irfft2(f, s=shape)
        x = (x - x.min()) / (np.ptp(x) + 1e-9)
    else:
        raise ValueError(kind)
    return png(_u8(x))


def _outline(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A breast against the left edge (a half ellipse) and its thickness (1 inside, falling at the skin)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy = h * rng.uniform(0.45, 0.55)
    r = np.sqrt((xx / (w * rng.uniform(0.7, 0.85))) ** 2 + ((yy - cy) / (h * rng.uniform(0.38, 0.45))) ** 2)
    inside = r < 1
    thick = np.sqrt(np.clip(1 - r ** 2, 0, 1)) ** 0.5
    return inside, thick


def texture_phantom(kind: str, seed: int = 0, size: int = 1024) -> bytes:
    """A breast outline filled with another texture model (12-bit PNG, dark background)."""
    rng = np.random.default_rng(seed)
    h, w = size, int(round(0.59 * size))
    inside, thick = _outline(h, w, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) / size
    if kind == "sinusoids":
        t = sum(np.sin(2 * np.pi * (f * (np.cos(a) * xx + np.sin(a) * yy)) + p)
                for f, a, p in zip(rng.uniform(8, 30, 4), rng.uniform(0, np.pi, 4), rng.uniform(0, 6, 4)))
        t = 0.5 + 0.12 * t
    elif kind == "discs":
        t = np.full((h, w), 0.35)
        for _ in range(60):
            cx, cy, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.01, 0.05) * size
            t[(xx * size - cx) ** 2 + (yy * size - cy) ** 2 < rad ** 2] += rng.uniform(0.1, 0.3)
    elif kind == "value_noise":
        cells = rng.random((12, 8))
        t = np.asarray(Image.fromarray(cells.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BICUBIC))
        t = 0.3 + 0.5 * t
    elif kind == "flat":
        t = np.full((h, w), 0.55)
    else:
        raise ValueError(kind)
    img = np.where(inside, t * thick, 0.0)
    return png(_u12(img))


def _dicom(values: np.ndarray, *, body_part: str, modality: str = "DX") -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientID, ds.PatientName = modality, body_part.upper(), "ANON", "Test^Body"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.2]
    ds.PixelData = np.ascontiguousarray(values, dtype="<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2


def _grain(rng: np.random.Generator, shape: tuple[int, int], amount: float) -> np.ndarray:
    from scipy import ndimage as ndi

    return amount * ndi.gaussian_filter(rng.standard_normal(shape), 1.5)


def body_part(kind: str, seed: int = 0) -> bytes:
    """A synthetic radiograph of another body part as a DICOM (bright = bone/dense, as an X-ray)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    if kind in ("pydicom_ct", "pydicom_mr"):
        import pydicom
        from pydicom.data import get_testdata_file

        # the loader refuses Modality CT/MR outright; their pixels re-filed as a DX reach the guard
        a = pydicom.dcmread(get_testdata_file("CT_small.dcm" if kind == "pydicom_ct" else "MR_small.dcm")).pixel_array
        a = a.astype(np.float64)
        a = (a - a.min()) / (np.ptp(a) + 1e-9)
        return _dicom(_u12(a), body_part="head" if kind == "pydicom_mr" else "chest")
    if kind == "chest":
        h, w = 1100, 1000
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        img = 0.75 - 0.1 * (yy / h)  # soft tissue everywhere
        for cx in (0.3 * w, 0.7 * w):  # lungs: dark
            img = np.where(_ellipse(yy, xx, 0.48 * h, cx, 0.33 * h, 0.17 * w) < 1, 0.25, img)
        img = np.where(_ellipse(yy, xx, 0.62 * h, 0.55 * w, 0.16 * h, 0.14 * w) < 1, 0.7, img)  # heart
        img = np.where(np.abs(xx - 0.5 * w) < 0.04 * w, 0.85, img)  # spine
        for i in range(10):  # ribs: bright arcs
            y0 = 0.2 * h + i * 0.065 * h
            for side in (-1, 1):
                arc = y0 - 0.05 * h + 0.35 * h * ((xx - 0.5 * w) / w) ** 2 * 2
                band = (np.abs(yy - arc) < 0.012 * h) & (side * (xx - 0.5 * w) > 0.04 * w) & \
                       (side * (xx - 0.5 * w) < 0.42 * w)
                img = np.where(band, img + 0.18, img)
        img = np.where((xx < 0.04 * w) | (xx > 0.96 * w), 0.05, img)  # air beside the shoulders
    elif kind == "hand":
        h, w = 900, 700
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        img = np.full((h, w), 0.04)
        palm = _ellipse(yy, xx, 0.72 * h, 0.5 * w, 0.2 * h, 0.27 * w) < 1
        img = np.where(palm, 0.35, img)
        for k, ang in enumerate(np.linspace(-0.5, 0.5, 5)):
            cx, cy = 0.5 * w + (k - 2) * 0.12 * w, 0.55 * h
            length = (0.38 if k else 0.25) * h
            for j in range(3):  # phalanges along the finger
                py = cy - (j + 0.5) * length / 3 * np.cos(ang)
                px = cx + (j + 0.5) * length / 3 * np.sin(ang) * 1.5
                img = np.where(_ellipse(yy, xx, py, px, length / 7, 0.045 * w, ang) < 1.6, np.maximum(img, 0.35), img)
                img = np.where(_ellipse(yy, xx, py, px, length / 8, 0.022 * w, ang) < 1, 0.85, img)
            img = np.where(_ellipse(yy, xx, 0.72 * h, cx, 0.1 * h, 0.02 * w) < 1, 0.8, img)  # metacarpal
    elif kind == "skull":
        h, w = 900, 760
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        e = _ellipse(yy, xx, 0.5 * h, 0.5 * w, 0.42 * h, 0.4 * w)
        img = np.where(e < 1, 0.45, 0.03)
        img = np.where((e < 1) & (e > 0.85), 0.9, img)  # calvarium
        for cx in (0.36 * w, 0.64 * w):
            img = np.where(_ellipse(yy, xx, 0.55 * h, cx, 0.07 * h, 0.08 * w) < 1, 0.2, img)  # orbits
        img = np.where(_ellipse(yy, xx, 0.82 * h, 0.5 * w, 0.08 * h, 0.25 * w) < 1, 0.8, img)  # jaw
    elif kind == "knee":
        h, w = 1000, 700
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        img = np.where(np.abs(xx - 0.5 * w) < 0.33 * w, 0.3, 0.03)  # the leg's soft tissue
        img = np.where((np.abs(xx - 0.5 * w) < 0.16 * w) & (yy < 0.45 * h), 0.85, img)  # femur
        img = np.where(_ellipse(yy, xx, 0.45 * h, 0.5 * w, 0.07 * h, 0.22 * w) < 1, 0.85, img)  # condyles
        img = np.where((np.abs(xx - 0.5 * w) < 0.15 * w) & (yy > 0.55 * h), 0.8, img)  # tibia
        img = np.where(_ellipse(yy, xx, 0.55 * h, 0.5 * w, 0.04 * h, 0.2 * w) < 1, 0.8, img)  # plateau
    else:
        raise ValueError(kind)
    img = ndi.gaussian_filter(img, 3) + _grain(rng, img.shape, 0.02)
    return _dicom(_u12(img), body_part=kind)


def film_mammogram(seed: int = 0) -> bytes:
    """A scanned-film-like mammogram (tests/dicomfixtures.synthetic_film) as a DICOM."""
    from dicomfixtures import synthetic_film

    values, _ = synthetic_film(1024, 700, seed=seed)
    return _dicom(values, body_part="breast", modality="MG")


def kinds() -> dict[str, Callable[[], bytes]]:
    """Every kind the guard must put out of domain: ``group/name`` -> a function answering the file's bytes."""
    out: dict[str, Callable[[], bytes]] = {}
    for name in PHOTOS:
        out[f"photo/{name}"] = lambda name=name: photograph(name)
    for name in NOISE:
        out[f"noise/{name}"] = lambda name=name: noise(name)
    for name in TEXTURES:
        out[f"texture/{name}"] = lambda name=name: texture_phantom(name)
    for name in BODY_PARTS:
        out[f"dicom/{name}"] = lambda name=name: body_part(name)
    return out
