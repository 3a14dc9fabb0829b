"""The DICOM results row: SEG + SR + SC of one explained full-field DICOM, built and serialised."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from deepminer.bench.common import check, median
from deepminer.bench.startup import STARTUP_DICOM, startup_dicom
from deepminer.models.fcn import FCN

def measure_dicom_results(model: FCN, *, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Wall ms of :func:`deepminer.dicom_results.build_results` + serialising the three objects
    (``DicomResults.to_bytes``) for a :data:`STARTUP_DICOM` 16-bit DICOM explained by ``model``
    (max side 1024, top unit maps), the decoded pixels given (as the CLI and the workbench have them);
    the decode itself is reported apart (``decode_ms``). ``dicom_results_ms`` is checked."""
    from deepminer.dicom_results import build_results, decode_pixels, read_source
    from deepminer.explain import explain_image

    with tempfile.TemporaryDirectory(prefix="deepminer-bench-dicom-") as tmp:
        source = read_source(startup_dicom(Path(tmp) / "results.dcm"))
    t0 = time.perf_counter()
    pixels = decode_pixels(source)
    decode_ms = (time.perf_counter() - t0) * 1000.0
    expl = explain_image(model, pixels, max_side=1024, unit_maps="top")
    times, cpu, sizes = [], [], {}
    for i in range(warmup + repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        sizes = {k: len(v) for k, v in build_results(source, expl, pixels=pixels).to_bytes().items()}
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
            cpu.append((time.process_time() - c0) * 1000.0)
    ms = median(times)
    return {"image": f"{STARTUP_DICOM[0]} x {STARTUP_DICOM[1]} (rows x columns) 16-bit DICOM, uncompressed",
            "dicom_results_ms": ms, "cpu_ms": median(cpu), "decode_ms": decode_ms, "bytes": sizes,
            "repeats": repeats, "check": {"dicom_results_ms": check("dicom_results_ms", ms)},
            "raw": {"dicom_results_ms": times, "cpu_ms": cpu}}
