"""CBIS-DDSM import: a TCIA download (four case-description CSVs, full-mammogram and ROI-mask DICOMs)
into a dataset folder (the contract in docs/data.md).

* One manifest row per full mammogram: the abnormalities of the CSVs are grouped by
  ``(patient_id, left or right breast, image view)``, across the mass and calcification sets, so
  ``image_id`` is e.g. ``P_00001_LEFT_CC``.
* ``label``: malignant when any abnormality is MALIGNANT, else benign (BENIGN and
  BENIGN_WITHOUT_CALLBACK are benign). CBIS-DDSM has no normal images.
* ``report``: one DDSM-style description per abnormality, joined with ``; `` (the format
  :func:`deepminer.concepts.parse_report` reads), e.g. ``LESION_TYPE MASS SHAPE IRREGULAR MARGINS
  SPICULATED; LESION_TYPE CALCIFICATION TYPE PLEOMORPHIC DISTRIBUTION CLUSTERED``. Multi-valued CBIS
  descriptors keep the DDSM ``-`` between values (``SHAPE IRREGULAR-ARCHITECTURAL_DISTORTION``:
  two shape values); empty and ``N/A`` descriptors are left out.
* ``lesion_mask``: the union of the abnormalities' ROI masks, 1 = benign, 2 = malignant (malignant wins
  where they overlap), resized (nearest) to the mammogram when a mask has another size.
* ``masks/<concept>/<image_id>.png``: for every concept of :mod:`deepminer.concepts` that a report in
  the import names, the union of the ROI masks of the abnormalities that name it (0/255; all zero
  when the image has none).
* Images: 16-bit PNG ``images/<image_id>.png`` (the loader's presentation values, ``sBIT`` = the DICOM's
  BitsStored).
* Splits, patient-disjoint: every patient of a CBIS test CSV -> ``test`` (also when the patient is in a
  training CSV too); the other patients are shuffled (seeded) into ``val`` (``val_fraction``, at least
  one patient when there are two or more) and ``train``.

The DICOMs are found robustly: the CSV path relative to the root (or to ``root/CBIS-DDSM``) when it
exists, else every ``*.dcm`` under the folder named by the path's first part (TCIA's newer downloads
name the study/series folders and files differently from the CSV). Among the candidates of an ROI
row (the CSV's "cropped image" and "ROI mask" paths are swapped in some rows) the mask is the one whose
SeriesDescription says "ROI mask", else the largest binary image.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from deepminer.errors import InputError

CSV_FILES = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}
COMMON_COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality id", "abnormality type",
                  "pathology", "image file path", "ROI mask file path")
KIND_COLUMNS = {"mass": ("mass shape", "mass margins"), "calc": ("calc type", "calc distribution")}
PATHOLOGY_LABEL = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign"}
LESION_VALUE = {"benign": 1, "malignant": 2}
_EMPTY = {"", "N/A", "NA", "NAN", "NONE", "NULL", "-"}


@dataclass
class Abnormality:
    """One CSV row."""

    kind: str  # mass | calc
    cbis_split: str  # train | test (which CSV)
    label: str  # benign | malignant
    report: str  # this abnormality's DDSM-style description
    image_path: str  # as written in the CSV
    roi_path: str
    crop_path: str
    where: str  # "file.csv:line" for messages


@dataclass
class CbisImage:
    """One full mammogram and its abnormalities."""

    image_id: str
    patient_id: str
    laterality: str  # LEFT | RIGHT
    view: str  # CC | MLO
    abnormalities: list[Abnormality] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "malignant" if any(a.label == "malignant" for a in self.abnormalities) else "benign"

    @property
    def report(self) -> str:
        return "; ".join(dict.fromkeys(a.report for a in self.abnormalities))

    @property
    def in_test_csv(self) -> bool:
        return any(a.cbis_split == "test" for a in self.abnormalities)


# ------------------------------------------------------------------------------------------- CSVs
def _bases(root: Path) -> list[Path]:
    return [b for b in (root, root / "CBIS-DDSM") if b.is_dir()]


def find_csvs(root: str | os.PathLike) -> dict[tuple[str, str], Path]:
    """The four case-description CSVs under ``root`` (or ``root/CBIS-DDSM``, ``root/csv``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such CBIS-DDSM folder")
    found = {}
    for key, name in CSV_FILES.items():
        for folder in (root, root / "CBIS-DDSM", root / "csv"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            raise InputError(f"{root / name}: missing (a CBIS-DDSM root holds the four case-description CSVs "
                             f"{', '.join(CSV_FILES.values())})")
    return found


def _norm_column(name: str) -> str:
    return " ".join(name.replace("_", " ").strip().lower().split())


def _clean(value: str | None) -> str:
    return (value or "").strip().strip('"').strip()


def _descriptor(value: str) -> str | None:
    """A CBIS descriptor as a DDSM keyword value: upper case, spaces -> ``_``, values joined by ``-``;
    None when empty or N/A."""
    parts = [re.sub(r"\s+", "_", p.strip().upper()) for p in _clean(value).split("-")]
    parts = [p for p in parts if p and p not in _EMPTY]
    return "-".join(parts) if parts else None


def describe(kind: str, first: str, second: str) -> str:
    """The DDSM-style report of one abnormality: ``LESION_TYPE MASS SHAPE .. MARGINS ..`` or
    ``LESION_TYPE CALCIFICATION TYPE .. DISTRIBUTION ..`` (empty descriptors left out)."""
    words = ["LESION_TYPE", "MASS" if kind == "mass" else "CALCIFICATION"]
    keys = ("SHAPE", "MARGINS") if kind == "mass" else ("TYPE", "DISTRIBUTION")
    for key, value in zip(keys, (first, second)):
        d = _descriptor(value)
        if d:
            words += [key, d]
    return " ".join(words)


def read_csv(path: Path, kind: str, cbis_split: str) -> list[tuple[tuple[str, str, str], Abnormality]]:
    """Rows of one case-description CSV as ``((patient, laterality, view), Abnormality)``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            columns = {_norm_column(c): c for c in header}
            wanted = COMMON_COLUMNS + KIND_COLUMNS[kind]
            missing = [c for c in wanted if _norm_column(c) not in columns]
            if missing:
                raise InputError(f"{path}: missing columns {', '.join(missing)}")
            col = {c: columns[_norm_column(c)] for c in wanted + ("cropped image file path",)
                   if _norm_column(c) in columns}
            records = list(reader)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 CSV file") from None
    except csv.Error as err:
        raise InputError(f"{path}: not a readable CSV file ({err})") from None
    out = []
    for i, rec in enumerate(records, start=2):
        where = f"{path.name}:{i}"

        def get(name: str, rec: dict[str, str] = rec) -> str:
            return _clean(rec.get(col.get(name, ""), ""))

        patient = get("patient_id")
        side = get("left or right breast").upper()
        view = get("image view").upper()
        pathology = get("pathology").upper()
        if not patient:
            raise InputError(f"{path}:{i}: empty patient_id")
        if side not in ("LEFT", "RIGHT"):
            raise InputError(f"{path}:{i}: left or right breast {side!r} is not LEFT/RIGHT")
        if view not in ("CC", "MLO"):
            raise InputError(f"{path}:{i}: image view {view!r} is not CC/MLO")
        if pathology not in PATHOLOGY_LABEL:
            raise InputError(f"{path}:{i}: pathology {pathology!r} not in {'/'.join(PATHOLOGY_LABEL)}")
        if not get("image file path") or not get("ROI mask file path"):
            raise InputError(f"{path}:{i}: empty image file path or ROI mask file path")
        first, second = KIND_COLUMNS[kind]
        abn = Abnormality(kind=kind, cbis_split=cbis_split, label=PATHOLOGY_LABEL[pathology],
                          report=describe(kind, get(first), get(second)), image_path=get("image file path"),
                          roi_path=get("ROI mask file path"), crop_path=get("cropped image file path"),
                          where=where)
        out.append(((patient, side, view), abn))
    return out


def read_cases(root: str | os.PathLike) -> list[CbisImage]:
    """All full mammograms of a CBIS-DDSM root with their abnormalities, sorted by image id."""
    images: dict[tuple[str, str, str], CbisImage] = {}
    for (kind, cbis_split), path in find_csvs(root).items():
        for key, abn in read_csv(path, kind, cbis_split):
            patient, side, view = key
            img = images.setdefault(key, CbisImage(f"{patient}_{side}_{view}", patient, side, view))
            img.abnormalities.append(abn)
    return sorted(images.values(), key=lambda im: im.image_id)


def assign_splits(images: list[CbisImage], *, val_fraction: float = 0.15, seed: int = 0) -> dict[str, str]:
    """Patient -> split: CBIS test patients -> test; the rest shuffled (seeded) into val/train."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val-fraction: {val_fraction} not in [0, 1)")
    test = sorted({im.patient_id for im in images if im.in_test_csv})
    rest = sorted({im.patient_id for im in images} - set(test))
    order = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
    n_val = int(round(val_fraction * len(order)))
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(1, n_val), len(order) - 1)
    split = {p: "test" for p in test}
    split.update({p: ("val" if i < n_val else "train") for i, p in enumerate(order)})
    return split


# ------------------------------------------------------------------------------------------ DICOMs
def _csv_path(text: str) -> PurePosixPath:
    return PurePosixPath(_clean(text).replace("\\", "/").strip("/"))


def _candidates(root: Path, text: str) -> tuple[Path | None, list[Path]]:
    """``(exact path or None, every *.dcm under the folder named by the path's first part)``."""
    rel = _csv_path(text)
    exact = None
    folder_files: list[Path] = []
    for base in _bases(root):
        if exact is None and rel.parts and (base / rel).is_file():
            exact = base / rel
        if rel.parts and (base / rel.parts[0]).is_dir():
            folder_files += sorted((base / rel.parts[0]).rglob("*.dcm"))
    return exact, folder_files


def _header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise InputError(f"{path}: not a readable DICOM file ({' '.join(str(err).split())[:120]})") from None


def _pixels_of(ds) -> int:
    try:
        return int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        return 0


def resolve_image(root: Path, abn: Abnormality) -> Path:
    """The full-mammogram DICOM of a CSV row (InputError naming the CSV path when none is found)."""
    exact, files = _candidates(root, abn.image_path)
    if exact is not None:
        return exact
    if not files:
        raise InputError(f"{abn.where}: full mammogram DICOM {_csv_path(abn.image_path)} not found under {root}")
    if len(files) == 1:
        return files[0]
    headers = [(f, _header(f)) for f in files]
    full = [f for f, ds in headers if "FULL MAMMOGRAM" in str(ds.get("SeriesDescription", "")).upper()]
    return full[0] if full else max(headers, key=lambda fh: _pixels_of(fh[1]))[0]


def resolve_roi_candidates(root: Path, abn: Abnormality) -> list[Path]:
    """DICOMs that may be the ROI mask of a CSV row, the most likely first."""
    exact_roi, files = _candidates(root, abn.roi_path)
    exact_crop, crop_files = _candidates(root, abn.crop_path) if abn.crop_path else (None, [])
    pool = list(dict.fromkeys([p for p in (exact_roi, exact_crop) if p] + files + crop_files))
    if not pool:
        raise InputError(f"{abn.where}: ROI mask DICOM {_csv_path(abn.roi_path)} not found under {root}")
    if len(pool) == 1:
        return pool
    headers = [(f, _header(f)) for f in pool]

    def rank(fh):
        desc = str(fh[1].get("SeriesDescription", "")).upper()
        return (0 if "ROI MASK" in desc else 2 if "CROP" in desc else 1, -_pixels_of(fh[1]), fh[0] != exact_roi)

    return [f for f, _ in sorted(headers, key=rank)]


def _binary(pixels: np.ndarray) -> bool:
    """Exactly two values, 0 and one above it (an ROI mask, whatever its bit depth)."""
    top = float(pixels.max())
    return top > 0.0 and not np.any((pixels > 0.0) & (pixels < top))


def load_roi_mask(candidates: list[Path], abn: Abnormality, shape: tuple[int, int]) -> np.ndarray:
    """The first binary image among ``candidates`` (see :func:`resolve_roi_candidates`) as a bool mask of
    ``shape`` (nearest-neighbour resize when needed)."""
    import cv2

    from deepminer.data.io import load_image

    tried = []
    for path in candidates:
        pixels = load_image(path).pixels
        if _binary(pixels):
            mask = pixels > 0.0
            if mask.shape != shape:
                mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]),
                                  interpolation=cv2.INTER_NEAREST).astype(bool)
            return mask
        tried.append(path.name)
    raise InputError(f"{abn.where}: no binary ROI mask among {', '.join(tried)} "
                     f"(for {_csv_path(abn.roi_path)})")


# ------------------------------------------------------------------------------------------ import
def import_cbis(root: str | os.PathLike, out: str | os.PathLike, *, val_fraction: float = 0.15, seed: int = 0,
                limit: int | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the dataset folder ``out`` from the CBIS-DDSM download at ``root``; returns a summary
    (counts per split and label). Nothing is left in ``out`` when it fails."""
    from tqdm import tqdm

    from deepminer.concepts import concepts_from_report
    from deepminer.atomic import staged_output
    from deepminer.data.dataset import write_manifest

    root, out = Path(root), Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists (use --overwrite to replace it)")
    images = read_cases(root)
    if not images:
        raise InputError(f"{root}: the case-description CSVs list no images")
    split_of = assign_splits(images, val_fraction=val_fraction, seed=seed)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit: must be a positive integer, got {limit}")
        images = images[:limit]
    # find every DICOM before decoding anything, so a missing one fails in seconds
    paths = {im.image_id: resolve_image(root, im.abnormalities[0]) for im in images}
    rois = {id(a): resolve_roi_candidates(root, a) for im in images for a in im.abnormalities}
    per_abn = {id(a): [c.name for c in concepts_from_report(a.report)] for im in images for a in im.abnormalities}
    concepts = sorted({c for names in per_abn.values() for c in names})

    rows = []
    try:
        with contextlib.ExitStack() as stack:  # the bar closes (ends its line) before an error is printed
            stage = stack.enter_context(staged_output(out))
            for sub in ["images", "lesions"] + [f"masks/{c}" for c in concepts]:
                (stage / sub).mkdir(parents=True, exist_ok=True)
            bar = stack.enter_context(tqdm(total=len(images), desc="import-cbis", unit="image",
                                           disable=not progress))
            for im in images:
                _write_image(stage, im, paths[im.image_id], rois, per_abn, concepts)
                rows.append({"image_id": im.image_id, "patient_id": im.patient_id, "view": im.view,
                             "split": split_of[im.patient_id], "label": im.label,
                             "image": f"images/{im.image_id}.png", "lesion_mask": f"lesions/{im.image_id}.png",
                             "report": im.report})
                bar.update()
            write_manifest(stage, rows)
            summary = {
                "source": "CBIS-DDSM", "root": str(root), "seed": seed, "val_fraction": val_fraction,
                "images": len(rows), "patients": len({r["patient_id"] for r in rows}),
                "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")},
                "labels": {lab: sum(r["label"] == lab for r in rows) for lab in ("benign", "malignant")},
                "concepts": concepts,
            }
            (stage / "cbis_import.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    except OSError as err:
        raise InputError(f"{out}: cannot write ({err.strerror or err})") from None
    return summary


def _write_image(stage: Path, im: CbisImage, path: Path, rois: dict, per_abn: dict, concepts: list[str]) -> None:
    """One mammogram's image, lesion mask and concept masks into the staging folder."""
    from PIL import Image

    from deepminer.data.io import SPACING_TEXT, load_image, png16

    loaded = load_image(path)
    bits = min(16, max(1, loaded.bits_stored))
    values = np.rint(loaded.pixels * float((1 << bits) - 1)).astype(np.uint16)
    text = {"Laterality": im.laterality[0], "View": im.view}
    if loaded.spacing_mm:  # the DICOM's pixel spacing, kept (the model's scale rule reads it)
        text[SPACING_TEXT] = f"{loaded.spacing_mm:.6g}"
    (stage / "images" / f"{im.image_id}.png").write_bytes(png16(values, bits=bits, text=text))
    shape = loaded.pixels.shape
    lesion = np.zeros(shape, np.uint8)
    cmasks = {c: np.zeros(shape, bool) for c in concepts}
    for abn in im.abnormalities:
        roi = load_roi_mask(rois[id(abn)], abn, shape)
        np.maximum(lesion, np.where(roi, np.uint8(LESION_VALUE[abn.label]), np.uint8(0)), out=lesion)
        for c in per_abn[id(abn)]:
            cmasks[c] |= roi
    Image.fromarray(lesion).save(stage / "lesions" / f"{im.image_id}.png", format="PNG")
    for c, m in cmasks.items():
        Image.fromarray(m.astype(np.uint8) * np.uint8(255)).save(stage / "masks" / c / f"{im.image_id}.png",
                                                                  format="PNG")


__all__ = ["Abnormality", "CSV_FILES", "CbisImage", "assign_splits", "describe", "find_csvs", "import_cbis",
           "load_roi_mask", "read_cases", "read_csv", "resolve_image", "resolve_roi_candidates"]
