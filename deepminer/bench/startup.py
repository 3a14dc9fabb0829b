"""The start-up rows: ``deepminer --help`` and ``deepminer inspect`` as fresh subprocesses."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.bench.common import TARGETS, check, median
from deepminer.errors import InputError

STARTUP_DICOM = (4500, 3000)  # (rows, columns) of the generated 16-bit DICOM that `inspect` reads
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"  # SOP class: Digital Mammography, for presentation


def command_wall_s(argv: Sequence[str], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``repeats`` runs of ``argv`` as a subprocess (output discarded), after
    ``warmup`` untimed runs (the OS file cache, Python's bytecode cache). A run that fails raises
    :class:`InputError` with the last line it wrote to stderr."""
    import subprocess

    if repeats < 1 or warmup < 0:
        raise InputError("--repeats must be >= 1, --warmup >= 0")
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise InputError(f"start-up: `{' '.join(argv)}` failed: {last}")
        if i >= warmup:
            times.append(wall)
    return times


def startup_dicom(path: str | os.PathLike, shape: tuple[int, int] = STARTUP_DICOM, seed: int = 0) -> Path:
    """Write a mammogram-like 16-bit MONOCHROME2 DICOM of ``shape`` (rows, columns), uncompressed: a
    bright half ellipse (the breast) against the left edge on a dark background, with noise."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    rows, cols = shape
    yy, xx = np.ogrid[0:rows, 0:cols]
    breast = (xx / cols) ** 2 + ((yy - rows / 2) / (rows / 2)) ** 2 < 0.8
    pixels = np.where(breast, 30000, 500).astype(np.uint16)
    pixels += np.random.default_rng(seed).integers(0, 2000, size=(rows, cols), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MG_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = UID(MG_FOR_PRESENTATION), meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "MG", "ANON", "Bench^Startup"
    ds.ImageLaterality, ds.ViewPosition = "L", "CC"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def measure_startup(*, repeats: int = 5, warmup: int = 1, python: str = sys.executable,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start-up wall time of ``python -m deepminer --help`` and of ``python -m deepminer inspect`` on
    a generated :data:`STARTUP_DICOM` 16-bit DICOM, each run as a fresh subprocess (medians of
    ``repeats`` after ``warmup``). ``startup_help_s`` is checked against :data:`TARGETS`."""
    with tempfile.TemporaryDirectory(prefix="deepminer-bench-startup-") as tmp:
        dicom = startup_dicom(Path(tmp) / "startup.dcm")
        commands = {"startup_help_s": [python, "-m", "deepminer", "--help"],
                    "startup_inspect_s": [python, "-m", "deepminer", "inspect", str(dicom)]}
        raw: dict[str, list[float]] = {}
        for key, argv in commands.items():
            if log:
                log(f"bench: start-up: {' '.join(['deepminer', *argv[3:]])} x {warmup} + {repeats}")
            raw[key] = command_wall_s(argv, repeats=repeats, warmup=warmup)
    res: dict[str, Any] = {k: median(v) for k, v in raw.items()}
    return {"command": f"{python} -m deepminer", "inspect_image": f"{STARTUP_DICOM[0]} x {STARTUP_DICOM[1]} "
            "(rows x columns) 16-bit DICOM, uncompressed", "repeats": repeats, "warmup": warmup, **res,
            "check": {"startup_help_s": check("startup_help_s", res["startup_help_s"])}, "raw": raw}


def format_startup(s: Mapping[str, Any]) -> list[str]:
    """The start-up rows of a :func:`measure_startup` result."""
    bound = TARGETS["startup_help_s"][1]
    return [f"start-up (fresh `python -m deepminer` subprocesses, wall s, median of {s['repeats']} "
            f"after {s['warmup']} warm-up):",
            f"  deepminer --help                                   {s['startup_help_s']:6.2f} s "
            f"{s['check']['startup_help_s']} (target <= {bound} s)",
            f"  deepminer inspect {STARTUP_DICOM[0]}x{STARTUP_DICOM[1]} 16-bit DICOM           "
            f"{s['startup_inspect_s']:6.2f} s"]
