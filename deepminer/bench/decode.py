"""The input rows: a full-field image decoded and its tissue mask found (what every request of a
full-field mammogram pays before the model), and the GloVe word vectors loaded (what the first text
agreement of a process pays). Both were wall-clock limits inside tests; they are measured here."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deepminer.bench.common import TARGETS, check, log_rep, median
from deepminer.bench.startup import STARTUP_DICOM, startup_dicom


def decode_inputs(folder: Path, shape: tuple[int, int] = STARTUP_DICOM) -> dict[str, Path]:
    """The same mammogram-like 16-bit ``shape`` (rows, columns) image as an uncompressed DICOM
    (:func:`~deepminer.bench.startup.startup_dicom`), an RLE Lossless DICOM (pydicom's encoder) and a
    16-bit PNG, in ``folder``: ``{"png", "dicom", "dicom-rle"}``."""
    import pydicom
    from pydicom.uid import RLELossless

    from deepminer.data.phantoms import png16

    files = {"dicom": startup_dicom(folder / "full-field.dcm", shape)}
    ds = pydicom.dcmread(files["dicom"])
    pixels = ds.pixel_array
    ds.compress(RLELossless, pixels)
    files["dicom-rle"] = folder / "full-field-rle.dcm"
    ds.save_as(files["dicom-rle"], enforce_file_format=True)
    files["png"] = folder / "full-field.png"
    files["png"].write_bytes(png16(pixels, bits=16))
    return files


def measure_decode(*, repeats: int = 5, warmup: int = 1, shape: tuple[int, int] = STARTUP_DICOM,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Wall and process-CPU seconds of :func:`deepminer.data.io.load_image` + :func:`deepminer.data.tissue.
    tissue_mask` of a full-field ``shape`` image in each of :func:`decode_inputs`' formats (medians of
    ``repeats`` after ``warmup``, formats interleaved). ``decode_mask_s`` is the slowest format's
    median wall time, checked against :data:`~deepminer.bench.common.TARGETS`."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_mask

    with tempfile.TemporaryDirectory(prefix="deepminer-bench-decode-") as tmp:
        files = decode_inputs(Path(tmp), shape)
        raw: dict[str, list[float]] = {k: [] for k in files}
        raw_cpu: dict[str, list[float]] = {k: [] for k in files}
        for i in range(warmup + repeats):
            for kind, path in files.items():
                c0, t0 = time.process_time(), time.perf_counter()
                tissue_mask(load_image(path).pixels)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if i >= warmup:
                    raw[kind].append(wall)
                    raw_cpu[kind].append(cpu)
            log_rep(log, "decode + mask", i, warmup, repeats, {k: v[-1] for k, v in raw.items() if v})
    per = {k: median(v) for k, v in raw.items()}
    worst = max(per.values())
    return {"image": f"{shape[0]} x {shape[1]} (rows x columns) 16-bit", "formats": list(files),
            "decode_mask_s": worst, "per_format_s": per, "cpu_s": {k: median(v) for k, v in raw_cpu.items()},
            "repeats": repeats, "check": {"decode_mask_s": check("decode_mask_s", worst)},
            "raw": raw, "raw_cpu": raw_cpu}


def measure_word_vectors(*, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Wall seconds to load the GloVe word vectors into a fresh
    :class:`~deepminer.evaluation.text.WordVectors` (memory-map the matrix, build the word index) and
    look one word up; medians of ``repeats`` after ``warmup``. ``word_vectors_load_s`` is checked."""
    from deepminer.evaluation.text import WordVectors

    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        wv = WordVectors().load()
        wv.vector("mass")
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    s = median(times)
    return {"what": "GloVe 6B 50d: matrix memory-mapped, word index built, one lookup", "words": len(wv),
            "word_vectors_load_s": s, "repeats": repeats,
            "check": {"word_vectors_load_s": check("word_vectors_load_s", s)}, "raw": times}


def format_inputs(d: Mapping[str, Any] | None, w: Mapping[str, Any] | None) -> list[str]:
    """The input rows of :func:`measure_decode` / :func:`measure_word_vectors` results (either may be None)."""
    out = []
    if d:
        each = ", ".join(f"{k} {v:.2f} s" for k, v in d["per_format_s"].items())
        out.append(f"full-field decode + tissue mask ({d['image']}): slowest {d['decode_mask_s']:.2f} s "
                   f"{d['check']['decode_mask_s']} (target <= {TARGETS['decode_mask_s'][1]:g} s); {each}")
    if w:
        out.append(f"word vectors ({w['what']}): {w['word_vectors_load_s']:.2f} s "
                   f"{w['check']['word_vectors_load_s']} (target <= {TARGETS['word_vectors_load_s'][1]:g} s)")
    return out
