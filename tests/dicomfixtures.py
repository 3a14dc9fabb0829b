"""Test helpers that WRITE real files: DICOM through pydicom (uncompressed and RLE Lossless), a synthetic
scanned-film mammogram with burned-in text and a film border, and a tiny CBIS-DDSM download in the real
folder and CSV layout. Nothing here is mocked: the library under test reads these files as it would read
files from a scanner or from TCIA."""
from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_dicom(path: str | Path, values: np.ndarray | None, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, rle: bool = False, fast_rle: bool = False,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                laterality: str | None = None, view: str | None = None, patient_id: str = "ANON",
                series_description: str | None = None, sop_class: str = MG_FOR_PRESENTATION,
                transfer_syntax: str | None = None, rows_cols: tuple[int, int] | None = None,
                frame: bytes | None = None, study_uid: str | None = None, accession: str | None = None,
                orientation: tuple[str, str] | None = None) -> Path:
    """Write ``values`` ((H, W) uint8/uint16/int16, or (H, W, 3) uint8 RGB) as a DICOM Part 10 file.

    ``values=None`` writes a header-only file (no Pixel Data); ``rows_cols`` overrides Rows/Columns.
    ``rle`` compresses with pydicom's own RLE Lossless encoder, ``fast_rle`` with :func:`rle_frame`
    (literal packets only: valid RLE, and quick for full-size images). ``transfer_syntax`` labels the
    file with another syntax (the pixel bytes are then whatever ``values`` holds, e.g. for a file a
    reader must refuse); ``frame`` stores these encapsulated bytes instead (RLE Lossless unless
    ``transfer_syntax`` says otherwise), ``values`` then only gives the header. ``study_uid``,
    ``accession`` and ``orientation`` (Patient Orientation) file several images as one study.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if accession is not None:
        ds.AccessionNumber = accession
    if orientation:
        ds.PatientOrientation = list(orientation)
    ds.Modality = "MG"
    ds.PatientID = patient_id
    ds.PatientName = "Test^Phantom"
    if series_description:
        ds.SeriesDescription = series_description
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    if values is None:
        ds.Rows, ds.Columns = rows_cols or (64, 64)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.save_as(path, enforce_file_format=True)
        return path
    values = np.ascontiguousarray(values)
    ds.Rows, ds.Columns = int(values.shape[0]), int(values.shape[1])
    if values.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = values.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if values.dtype.kind == "i" else 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = values.tobytes()
    if rows_cols:  # a header that lies about the size (a decompression-bomb test)
        ds.Rows, ds.Columns = rows_cols
    if rle:
        ds.compress(RLELossless, values)
    elif fast_rle:
        ds.PixelData = encapsulate([rle_frame(values)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        meta.TransferSyntaxUID = RLELossless
    elif transfer_syntax or frame is not None:
        ds.PixelData = encapsulate([values.tobytes() if frame is None else frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        meta.TransferSyntaxUID = transfer_syntax or RLELossless
    ds.save_as(path, enforce_file_format=True)
    return path


def write_exam(folder: str | Path, *, seed: int = 0, patients: tuple[int, int] = (0, 1), height: int = 1024,
               width: int | None = None, patient_id: str = "EXAM0001", accession: str | None = None,
               upscale: int = 1, orientation: bool = False) -> dict[str, Path]:
    """A 4-view screening exam (RCC, LCC, RMLO, LMLO) of one study as uncompressed 16-bit (12 stored) MG
    DICOMs, from phantoms: phantom patient ``patients[0]`` as the right breast and ``patients[1]`` as
    the left one (a phantom patient is one breast seen CC and MLO), rendered ``height / upscale`` high,
    enlarged ``upscale`` times (nearest) and padded on the nipple side to ``width`` (a 4,500 x 3,000
    full-field size is ``height=4500, width=3000, upscale=3``). ``orientation`` writes Patient
    Orientation (row direction P for right views, A for left ones). Returns ``{"RCC": path, ...}``."""
    from pydicom.uid import generate_uid

    from deepminer.data.phantoms import render_phantom

    folder = Path(folder)
    study = generate_uid()
    out = {}
    for lat, index in zip(("R", "L"), patients):
        for view in ("CC", "MLO"):
            ph = render_phantom(seed, index, size=height // upscale, view=view, laterality=lat)
            img = np.clip(ph.image, 0, 4095).astype(np.uint16)
            if upscale > 1:
                img = img.repeat(upscale, axis=0).repeat(upscale, axis=1)
            img = img[:height]
            if width is not None and img.shape[1] < width:  # the chest wall stays at its edge
                pad = ((0, 0), (width - img.shape[1], 0)) if lat == "R" else ((0, 0), (0, width - img.shape[1]))
                img = np.pad(img, pad)
            img = img[:, :width] if width is not None else img
            orient = (("P" if lat == "R" else "A"), ("L" if lat == "R" else "R") if view == "CC" else "F")
            out[f"{lat}{view}"] = write_dicom(folder / f"{lat}{view}.dcm", img, bits_stored=12, laterality=lat,
                                              view=view, patient_id=patient_id, study_uid=study,
                                              accession=accession, orientation=orient if orientation else None)
    return out


def rle_frame(values: np.ndarray) -> bytes:
    """One RLE Lossless frame (PS3.5 G) of a single-sample image, every row as literal packets of at
    most 128 bytes: a valid encoding (the worst case for a decoder), built with numpy in milliseconds."""
    h, w = values.shape
    nbytes = values.dtype.itemsize
    big = values.astype(values.dtype.newbyteorder(">"), copy=False).view(np.uint8).reshape(h, w, nbytes)
    segments = []
    for k in range(nbytes):  # most significant byte first
        plane = np.ascontiguousarray(big[:, :, k])
        q, r = divmod(w, 128)
        parts = []
        if q:
            full = plane[:, :q * 128].reshape(h, q, 128)
            parts.append(np.concatenate([np.full((h, q, 1), 127, np.uint8), full], axis=2).reshape(h, -1))
        if r:
            parts.append(np.concatenate([np.full((h, 1), r - 1, np.uint8), plane[:, q * 128:]], axis=1))
        seg = np.concatenate(parts, axis=1).tobytes()
        segments.append(seg + b"\x00" * (len(seg) % 2))
    header = np.zeros(16, dtype="<u4")
    header[0] = nbytes
    offset = 64
    for i, seg in enumerate(segments):
        header[i + 1] = offset
        offset += len(seg)
    return header.tobytes() + b"".join(segments)


def render_text(shape: tuple[int, int], text: str, xy: tuple[int, int], height: int) -> np.ndarray:
    """Boolean mask of ``text`` drawn with PIL at ``xy`` (top-left), letters about ``height`` px tall."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    font = ImageFont.load_default(size=height)
    ImageDraw.Draw(canvas).text(xy, text, fill=255, font=font)
    return np.asarray(canvas) > 127


def synthetic_film(height: int = 600, width: int = 400, *, seed: int = 0, touch_top: bool = True,
                   border: str = "top") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A scanned-film-like MLO mammogram, 12 bits in uint16, MONOCHROME2 (bright = dense).

    Breast against the left (chest-wall) edge with a pectoral muscle, a fatty periphery that fades to a
    faint skin line, parenchymal texture; a noisy background with a scanner gradient; a bright film
    border strip along ``border`` (top/bottom/right) that the breast touches when ``touch_top``; a dark
    strip along the right edge; bright burned-in text ("R MLO", a case number) and a label sticker with
    dark text. Returns the values and the ground-truth masks ``breast``, ``text``, ``border``, ``label``.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = 220 + 120 * (xx / width) + rng.normal(0, 25, (height, width))
    cy = 0.42 * height if touch_top else 0.5 * height
    ry = 0.5 * height if touch_top else 0.4 * height
    r = np.sqrt((xx / (0.62 * width)) ** 2 + ((yy - cy) / ry) ** 2)
    breast = r < 1.0
    thick = np.sqrt(np.clip(1 - r ** 2, 0, 1))
    texture = ndi.gaussian_filter(rng.normal(0, 1, (height, width)), 4) * 4
    tissue = 140 + 1300 * thick ** 0.8 + 350 * texture * thick
    pectoral = (xx / (0.3 * width) + yy / (0.45 * height)) < 1.0
    tissue = np.where(pectoral, tissue + 700, tissue)
    img = np.where(breast | pectoral, bg + tissue, bg)
    truth = breast | pectoral

    strips = np.zeros((height, width), bool)
    s = max(4, int(0.04 * height))
    if border == "top":
        strips[:s, :] = True
    elif border == "bottom":
        strips[-s:, :] = True
    elif border == "right":
        strips[:, -max(4, int(0.05 * width)):] = True
    img = np.where(strips, 3700 + rng.normal(0, 20, (height, width)), img)
    dark = np.zeros_like(strips)
    if border != "right":
        dark[:, -max(2, int(0.015 * width)):] = True
        img = np.where(dark, 15.0, img)
    truth &= ~strips & ~dark

    text = render_text((height, width), "R MLO", (int(0.68 * width), int(0.86 * height)), max(12, height // 22))
    text |= render_text((height, width), "0031-2", (int(0.72 * width), int(0.08 * height)), max(10, height // 30))
    img = np.where(text, 4000.0, img)
    label = np.zeros_like(strips)
    ly, lx = int(0.93 * height), int(0.06 * width)
    label[ly:ly + max(10, height // 25), lx:lx + width // 4] = True
    label_text = render_text((height, width), "DDSM", (lx + 3, ly), max(8, height // 32)) & label
    img = np.where(label, 3300.0, img)
    img = np.where(label_text, 600.0, img)
    truth &= ~label & ~text
    values = np.clip(np.rint(img), 0, 4095).astype(np.uint16)
    return values, {"breast": truth, "text": text, "border": strips | dark, "label": label}


# ---------------------------------------------------------------------------------- CBIS-DDSM fixture
MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]
CALC_COLUMNS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
    return path


def _uid(rng: np.random.Generator) -> str:
    return "1.3.6.1.4.1.9590.100.1.2." + "".join(str(d) for d in rng.integers(0, 10, 38))


def write_cbis_fixture(root: str | Path, *, seed: int = 0) -> dict:
    """A tiny CBIS-DDSM download in the real layout: the four case-description CSVs (real column names,
    ``breast_density`` in the mass CSVs and ``breast density`` in the calc CSVs) at ``root``, the DICOMs
    under ``root/CBIS-DDSM/``. Three patients, five full mammograms, seven abnormalities:

    * P_00001 LEFT CC: a malignant mass (train) and a benign calcification (train) on the same image;
      the calcification's ROI mask is half size. The mass ROI path carries the trailing newline of the
      real CSVs. P_00001 LEFT MLO: a BENIGN_WITHOUT_CALLBACK mass.
    * P_00002 RIGHT MLO: two calcifications (train) stored in TCIA's newer naming (study/series folders
      and ``1-1.dcm`` differ from the CSV paths); abnormality 2 has the ROI mask and cropped image
      paths swapped (a known CBIS-DDSM quirk) and no SeriesDescription to tell them apart.
    * P_00003: a malignant mass in the TEST CSV (LEFT CC) and a benign calcification in the TRAINING
      CSV (RIGHT CC): a patient in both sets.

    Returns the ground truth: ``images`` image_id -> uint16 pixels, ``rois`` (image_id, kind, abn id) ->
    bool mask at the image size, and ``dicoms`` (all paths written).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    top = root / "CBIS-DDSM"
    h, w = 96, 64
    truth: dict = {"images": {}, "rois": {}, "dicoms": []}
    rows: dict[tuple[str, str], list[dict]] = {(k, s): [] for k in ("mass", "calc") for s in ("train", "test")}
    img_paths: dict[str, str] = {}

    def mammogram(image_id: str) -> np.ndarray:
        if image_id not in truth["images"]:
            truth["images"][image_id] = rng.integers(1000, 60000, (h, w)).astype(np.uint16)
        return truth["images"][image_id]

    def roi(image_id: str, y: int, x: int, r: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w]
        return (yy - y) ** 2 + (xx - x) ** 2 <= r * r

    def case(kind, split, patient, side, view, abn, pathology, d1, d2, mask, *, new_layout=False,
             swap=False, half=False, newline=False):
        image_id = f"{patient}_{side}_{view}"
        prefix = {"mass": "Mass", "calc": "Calc"}[kind] + ("-Training" if split == "train" else "-Test")
        case_dir = f"{prefix}_{patient}_{side}_{view}"
        img = mammogram(image_id)
        truth["rois"][(image_id, kind, abn)] = mask
        csv_img = img_paths.setdefault(case_dir, f"{case_dir}/{_uid(rng)}/{_uid(rng)}/000000.dcm")
        roi_study, roi_series = _uid(rng), _uid(rng)
        csv_crop = f"{case_dir}_{abn}/{roi_study}/{roi_series}/000000.dcm"
        csv_roi = f"{case_dir}_{abn}/{roi_study}/{roi_series}/000001.dcm"
        mask_px = mask
        if half:
            mask_px = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w // 2, h // 2),
                                                                                     Image.NEAREST)) > 127
        ys, xs = np.nonzero(mask)
        crop = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        crop = np.pad(crop, ((0, max(0, 32 - crop.shape[0])), (0, max(0, 32 - crop.shape[1]))), mode="edge")
        mask_u8 = mask_px.astype(np.uint8) * 255
        if new_layout:  # TCIA's newer download naming
            disk_img = f"{case_dir}/07-20-2016-DDSM-NA-01234/1.000000-full mammogram images-04321/1-1.dcm"
            if swap:  # one series folder, no descriptions, mask is 1-2.dcm
                disk_crop = f"{case_dir}_{abn}/08-29-2017-DDSM-NA-5555/1.000000-ROI mask images-7777/1-1.dcm"
                disk_roi = f"{case_dir}_{abn}/08-29-2017-DDSM-NA-5555/1.000000-ROI mask images-7777/1-2.dcm"
                desc_crop = desc_roi = None
            else:
                disk_crop = f"{case_dir}_{abn}/08-29-2017-DDSM-NA-5555/1.000000-cropped images-8888/1-1.dcm"
                disk_roi = f"{case_dir}_{abn}/08-29-2017-DDSM-NA-5555/1.000000-ROI mask images-7777/1-1.dcm"
                desc_crop, desc_roi = "cropped images", "ROI mask images"
        else:
            disk_img, disk_crop, disk_roi = csv_img, csv_crop, csv_roi
            desc_crop, desc_roi = "cropped images", "ROI mask images"
        pid = case_dir
        if not (top / disk_img).exists():
            truth["dicoms"].append(write_dicom(top / disk_img, img, photometric="MONOCHROME2", patient_id=pid,
                                               series_description="full mammogram images",
                                               sop_class=SECONDARY_CAPTURE))
        truth["dicoms"].append(write_dicom(top / disk_crop, crop, patient_id=f"{pid}_{abn}",
                                           series_description=desc_crop, sop_class=SECONDARY_CAPTURE))
        truth["dicoms"].append(write_dicom(top / disk_roi, mask_u8, patient_id=f"{pid}_{abn}",
                                           series_description=desc_roi, sop_class=SECONDARY_CAPTURE))
        if swap:
            csv_roi, csv_crop = csv_crop, csv_roi
        row = {"patient_id": patient, "breast_density": 2, "breast density": 2, "left or right breast": side,
               "image view": view, "abnormality id": abn, "abnormality type": "mass" if kind == "mass" else
               "calcification", "assessment": 4, "pathology": pathology, "subtlety": 3,
               "image file path": csv_img, "cropped image file path": csv_crop,
               "ROI mask file path": csv_roi + ("\n" if newline else "")}
        row.update({"mass shape": d1, "mass margins": d2} if kind == "mass" else
                   {"calc type": d1, "calc distribution": d2})
        rows[(kind, split)].append(row)

    case("mass", "train", "P_00001", "LEFT", "CC", 1, "MALIGNANT", "IRREGULAR-ARCHITECTURAL_DISTORTION",
         "SPICULATED", roi("P_00001_LEFT_CC", 30, 20, 9), newline=True)
    case("calc", "train", "P_00001", "LEFT", "CC", 1, "BENIGN", "PLEOMORPHIC", "CLUSTERED",
         roi("P_00001_LEFT_CC", 70, 40, 8), half=True)
    case("mass", "train", "P_00001", "LEFT", "MLO", 1, "BENIGN_WITHOUT_CALLBACK", "OVAL", "CIRCUMSCRIBED",
         roi("P_00001_LEFT_MLO", 50, 30, 10))
    case("calc", "train", "P_00002", "RIGHT", "MLO", 1, "BENIGN_WITHOUT_CALLBACK", "PUNCTATE-PLEOMORPHIC",
         "CLUSTERED", roi("P_00002_RIGHT_MLO", 20, 20, 6), new_layout=True)
    case("calc", "train", "P_00002", "RIGHT", "MLO", 2, "BENIGN", "AMORPHOUS", "N/A",
         roi("P_00002_RIGHT_MLO", 60, 40, 7), new_layout=True, swap=True)
    case("mass", "test", "P_00003", "LEFT", "CC", 1, "MALIGNANT", "LOBULATED", "ILL_DEFINED",
         roi("P_00003_LEFT_CC", 40, 30, 12))
    case("calc", "train", "P_00003", "RIGHT", "CC", 1, "BENIGN", "VASCULAR", "",
         roi("P_00003_RIGHT_CC", 45, 25, 5))
    names = {("mass", "train"): "mass_case_description_train_set.csv",
             ("mass", "test"): "mass_case_description_test_set.csv",
             ("calc", "train"): "calc_case_description_train_set.csv",
             ("calc", "test"): "calc_case_description_test_set.csv"}
    for key, name in names.items():
        write_csv(root / name, MASS_COLUMNS if key[0] == "mass" else CALC_COLUMNS, rows[key])
    return truth


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for a file (warnings are not errors)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy is missing: apt-get install dicom3tools (bash scripts/setup.sh as root)"
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    assert any(re.match(r"^(Warning|Error|Segmentation|Comprehensive|Secondary|SOP)", ln) or ln.strip()
               for ln in lines), "dciodvfy printed nothing"
    return [ln for ln in lines if ln.startswith("Error")]


# ------------------------------------------------------------------------- real-archive quirk corpus
#: the quirks of DICOMs from real mammography archives (digitized film, CBIS-DDSM, vendors), each
#: written by :func:`write_quirk`; REFUSED ones cannot give a valid result and are refused in one line
QUIRKS = ("film_cc", "film_mlo", "invalid_orientation", "series_laterality", "patient_id_only",
          "retired_pn", "latin1_name", "utf8_name", "no_dates", "old_dates", "monochrome1", "bits12",
          "imager_spacing_only", "no_spacing", "rle", "rle_cross_rows", "jpeg2000", "jpegls", "deflated", "voi_lut_sequence")
REFUSED = {"multi_frame": "multi-frame", "non_mg": "not a mammogram"}


def quirk_pixels(height: int = 384, *, laterality: str = "L", view: str = "CC", seed: int = 0) -> np.ndarray:
    """A phantom breast as 12-bit values in uint16, the chest wall on the image's left for a left
    breast and on its right for a right one (as a film digitizer stores them)."""
    from deepminer.data.phantoms import render_phantom

    ph = render_phantom(seed, 0 if laterality == "R" else 1, size=height, view=view, laterality=laterality)
    return np.clip(ph.image, 0, 4095).astype(np.uint16)


def write_quirk(path: str | Path, quirk: str, *, laterality: str = "L", view: str = "CC",
                study_uid: str | None = None, patient_id: str | None = None, height: int = 384) -> Path:
    """One source DICOM with ``quirk`` (:data:`QUIRKS` or :data:`REFUSED`), of a ``laterality``
    ``view`` mammogram. Unless the quirk is about it: laterality only in the series' Laterality, the
    view only in a single-valued Patient Orientation (as digitized-film archives write them), no
    ImageLaterality/ViewPosition, a retired-form name, ISO_IR 100."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

    path = Path(path)
    values = quirk_pixels(height, laterality=laterality, view=view)
    photometric = "MONOCHROME1" if quirk == "monochrome1" else "MONOCHROME2"
    if quirk == "monochrome1":
        values = (4095 - values).astype(np.uint16)
    pid = patient_id or "FILM0001"
    if quirk == "patient_id_only":
        pid = f"Mass-Training_P_00001_{'LEFT' if laterality == 'L' else 'RIGHT'}_{view}"
    write_dicom(path, values, photometric=photometric, bits_stored=12, patient_id=pid, study_uid=study_uid,
                fast_rle=quirk in ("rle", "film_cc", "film_mlo"))
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "DOE, JANE"
    ds.StudyDate, ds.StudyTime = "19980312", "101500"
    ds.PixelSpacing = [0.05, 0.05]
    if quirk != "patient_id_only":
        ds.Laterality = laterality
        ds.PatientOrientation = view
    if quirk == "patient_id_only":
        ds.PatientOrientation = ""
    elif quirk == "invalid_orientation":
        ds.PatientOrientation = ["L", view]  # second value not a direction
        ds.ViewPosition = view
    elif quirk == "series_laterality":
        ds.ViewPosition = view
        ds.PatientOrientation = ""
    elif quirk == "retired_pn":
        ds.PatientName = "SMITH, MARY ANN"
        ds.ReferringPhysicianName = "JONES, P"
    elif quirk == "latin1_name":
        ds.PatientName = "Müller^Jürgen"
        ds.InstitutionName = "Klinik Köln"
    elif quirk == "utf8_name":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "山田^太郎=ヤマダ^タロウ"
        ds.StudyDescription = "Μαστογραφία"
    elif quirk == "no_dates":
        for kw in ("StudyDate", "StudyTime"):
            delattr(ds, kw)
    elif quirk == "old_dates":
        ds.StudyDate, ds.StudyTime = "1998.03.12", "10:15:00"
        ds.PatientBirthDate = "19451345"  # month 13: not a date
    elif quirk == "imager_spacing_only":
        del ds.PixelSpacing
        ds.ImagerPixelSpacing = [0.07, 0.07]
    elif quirk == "no_spacing":
        del ds.PixelSpacing
    elif quirk == "voi_lut_sequence":
        item = pydicom.Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.add_new("LUTData", "OW", np.linspace(0, 65535, 4096).astype("<u2").tobytes())
        ds.VOILUTSequence = pydicom.Sequence([item])
    elif quirk == "multi_frame":
        ds.NumberOfFrames = 2
        ds.PixelData = values.tobytes() * 2
    elif quirk == "non_mg":
        ds.Modality = "CT"
    if quirk == "jpeg2000":  # Pillow's OpenJPEG writes the lossless (5-3 wavelet) codestream
        import io as _io

        buf = _io.BytesIO()
        Image.fromarray(values).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    elif quirk == "jpegls":
        ds.compress(JPEGLSLossless, values)
    elif quirk == "deflated":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif quirk == "rle_cross_rows":  # PackBits packets that run over row ends, as some encoders write
        set_rle_cross_rows(ds, values)
    ds.save_as(path, enforce_file_format=True)
    return path


def set_rle_cross_rows(ds: Dataset, values: np.ndarray) -> None:
    """Store uint16 ``values`` in ``ds`` as RLE Lossless whose PackBits packets run over row ends
    (each byte segment encoded as one long row), as some archives' encoders write them."""
    from deepminer.rle import packbits_rows

    big = values.astype(">u2").view(np.uint8).reshape(*values.shape, 2)
    segs = [packbits_rows(np.ascontiguousarray(big[:, :, b]).reshape(1, -1)) for b in range(2)]
    head = np.zeros(16, "<u4")
    head[0], head[1], head[2] = 2, 64, 64 + len(segs[0])
    ds.Rows, ds.Columns = values.shape
    ds.PixelData = encapsulate([head.tobytes() + b"".join(segs)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless
