"""The dataset-folder contract (docs/data.md, docs/architecture.md), written once.

A dataset folder holds ``manifest.csv`` with :data:`MANIFEST_COLUMNS` (paths relative to the folder,
``split`` in :data:`SPLITS`, patient-disjoint; ``label`` in :data:`deepminer.CLASSES`) and
``masks/<concept>/<image_id>.png`` for every concept that has pixel ground truth.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path

from deepminer import CLASSES
from deepminer.atomic import atomic_file, staged_output  # noqa: F401 (re-exported: their old home)
from deepminer.errors import InputError

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("image_id", "patient_id", "view", "split", "label", "image", "lesion_mask", "report")
SPLITS = ("train", "val", "test", "holdout")


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """Rows of ``folder/manifest.csv`` as dicts; a one-line :class:`InputError` when the folder, file,
    columns or values are wrong."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: no such dataset folder")
    if not path.is_file():
        raise InputError(f"{path}: missing (a dataset folder needs {MANIFEST})")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing columns {', '.join(missing)}")
            rows = list(reader)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 CSV file") from None
    for i, row in enumerate(rows, start=2):
        if row["label"] not in CLASSES:
            raise InputError(f"{path}:{i}: label {row['label']!r} not in {'/'.join(CLASSES)}")
        if row["split"] not in SPLITS:
            raise InputError(f"{path}:{i}: split {row['split']!r} not in {'/'.join(SPLITS)}")
    return rows


def write_manifest(folder: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write ``manifest.csv`` (columns in contract order, extra keys ignored, LF line ends)."""
    path = Path(folder) / MANIFEST
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in MANIFEST_COLUMNS})
    return path


def mask_path(folder: str | os.PathLike, concept: str, image_id: str) -> Path:
    return Path(folder) / "masks" / concept / f"{image_id}.png"


def concepts_in(folder: str | os.PathLike) -> list[str]:
    """Concepts with pixel ground truth in a dataset folder (sorted)."""
    root = Path(folder) / "masks"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


#: what a model's ``trained_on`` says of data made by ``deepminer phantoms``
SYNTHETIC_PHANTOMS = "synthetic phantoms (deepminer phantoms)"


def describe_dataset(folder: str | os.PathLike) -> str:
    """What a dataset folder holds, in words, for a model's ``trained_on``: synthetic phantoms (the
    folder has ``phantoms.json``), a CBIS-DDSM import (``cbis_import.json``), else its name."""
    root = Path(folder)
    if (root / "phantoms.json").is_file():
        return SYNTHETIC_PHANTOMS
    if (root / "cbis_import.json").is_file():
        return "CBIS-DDSM (deepminer import-cbis)"
    return f"the dataset folder {root.name!r}"


#: the optional manifest column giving an image's pixel spacing (mm); a phantom folder's ``phantoms.json``
#: gives one for all its images (``pixel_spacing_mm``, or its ``size`` for folders written before that)
SPACING_COLUMN = "pixel_spacing_mm"


def pixel_spacing(folder: str | os.PathLike, row: dict | None = None) -> float | None:
    """The pixel spacing (mm) of an image of a dataset folder, where the folder says: the row's
    :data:`SPACING_COLUMN` when the manifest has one, else the folder's ``phantoms.json``
    (:func:`deepminer.model_scale.phantom_spacing_mm` of its ``size`` when it records no spacing), else
    None. An image's own file (DICOM Pixel Spacing, :attr:`deepminer.data.io.LoadedImage.spacing_mm`)
    goes first where it has one (:func:`deepminer.model_scale.input_side` takes either)."""
    from deepminer.model_scale import phantom_spacing_mm

    raw = str((row or {}).get(SPACING_COLUMN) or "").strip()
    try:
        if raw and float(raw) > 0:
            return float(raw)
    except ValueError:
        pass
    meta = _phantoms_json(str(Path(folder).resolve()))
    if meta.get(SPACING_COLUMN):
        return float(meta[SPACING_COLUMN])
    return phantom_spacing_mm(int(meta["size"])) if meta.get("size") else None


def _phantoms_json(folder: str) -> dict:
    try:
        meta = json.loads((Path(folder) / "phantoms.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
