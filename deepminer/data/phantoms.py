"""Phantom mammograms with ground-truth concept masks (``deepminer phantoms``).

Each patient is one breast (laterality L or R) seen in a CC and an MLO view. An image is a digitized-
film-like 16-bit PNG (12 bits used, brighter = denser, background near 0): a breast outline with a
skin line and a nipple, the pectoral muscle in the top chest-wall corner of MLO views, fatty to
extremely dense fibroglandular tissue (a 1/f^3 power-law texture, the exponent published breast-
texture models use, thresholded inside a density envelope), thin curved vessels, and the findings.
The chest wall is on the left of left breasts and on the right of right breasts (mirror images).

This module writes data sets (``generate_dataset``, ``write_phantom``); what a phantom shows is
drawn in :mod:`deepminer.data.phantom_findings` (the findings and the label rule) and rendered in
:mod:`deepminer.data.phantom_render`; both are re-exported here.

**Determinism.** Every image is drawn from generators seeded by ``(seed, patient, stream)`` only, so
images can be made in any order and the same arguments give the same bytes, on every x86-64 CPU: the
transcendental functions come from :mod:`deepminer.portable_math` (numpy's own pick SIMD kernels by
CPU and differ in the last bit between machines with and without AVX-512 or AVX2).
"""
from __future__ import annotations

import io
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from deepminer import CLASSES
from deepminer.data.phantom_findings import (
    _CALC_DISTRIBUTION as _CALC_DISTRIBUTION,
    ASPECT,
    BENIGN_CALCS as BENIGN_CALCS,
    BENIGN_MARGINS as BENIGN_MARGINS,
    BENIGN_SHAPES as BENIGN_SHAPES,
    BITS,
    CALC_TYPES,
    CONTRAST as CONTRAST,
    DEFAULT_LABEL_MIX,
    DEFAULT_SPLITS,
    DENSITIES as DENSITIES,
    LATERALITIES as LATERALITIES,
    MALIGNANT_CALCS as MALIGNANT_CALCS,
    MALIGNANT_MARGINS as MALIGNANT_MARGINS,
    MASS_MARGINS,
    MASS_SHAPES,
    MAX_SIZE,
    MIN_SIZE,
    OVERLAP,
    PHANTOM_CONCEPTS,
    VIEWS,
    Finding,
    Patient,
    draw_patient,
    image_id as image_id,
    looks_malignant,
    patient_id,
    report_line,
)
from deepminer.data.io import png16  # the one 16-bit PNG writer (re-exported here, its old home)
from deepminer.data.phantom_render import Phantom, powerlaw_noise, render_phantom
from deepminer.errors import InputError


# --------------------------------------------------------------------------- writing a dataset
@lru_cache(maxsize=4)
def _zero_png(h: int, w: int) -> bytes:
    return _png8(np.zeros((h, w), np.uint8))


def _png8(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _mask_bytes(m: np.ndarray) -> bytes:
    if not m.any():
        return _zero_png(*m.shape)
    return _png8(m.astype(np.uint8) * np.uint8(255))


def write_phantom(folder: Path, ph: Phantom) -> dict:
    """Write one phantom's PNGs into a dataset folder; returns its manifest row (split left empty). The
    image's PNG text chunks say its laterality, view and pixel spacing (mm, ``PixelSpacing``: a phantom
    of any size is :data:`~deepminer.model_scale.PHANTOM_HEIGHT_MM` high), which the loader reads."""
    from deepminer.data.io import SPACING_TEXT
    from deepminer.model_scale import phantom_spacing_mm

    iid = ph.image_id
    spacing = f"{phantom_spacing_mm(int(ph.image.shape[0])):.6g}"
    (folder / "images" / f"{iid}.png").write_bytes(
        png16(ph.image, bits=BITS, text={"Laterality": ph.laterality, "View": ph.view, SPACING_TEXT: spacing}))
    for name in PHANTOM_CONCEPTS:
        (folder / "masks" / name / f"{iid}.png").write_bytes(_mask_bytes(ph.masks[name]))
    lesion = ""
    if ph.lesion.any():
        lesion = f"lesions/{iid}.png"
        (folder / lesion).write_bytes(_png8(ph.lesion))
    return {"image_id": iid, "patient_id": ph.patient.patient_id, "view": ph.view, "label": ph.label,
            "image": f"images/{iid}.png", "lesion_mask": lesion, "report": ph.report}


def _balanced(rng: np.random.Generator, n: int, fractions: dict[str, float]) -> list[str]:
    """``n`` names in the given fractions (largest remainders), shuffled."""
    keys = list(fractions)
    total = sum(fractions.values())
    raw = np.array([fractions[k] / total * n for k in keys])
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    out = [k for k, c in zip(keys, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def plan_patients(count: int, seed: int, label_mix: dict[str, float] | None = None,
                  splits: dict[str, float] | None = None) -> list[tuple[int, str, str, tuple[str, ...]]]:
    """(patient index, label, split, views) for a data set of ``count`` images: labels in the
    ``label_mix`` fractions by patient, splits assigned per patient and stratified by label."""
    n_pat = -(-count // 2)
    rng = np.random.default_rng([int(seed), 1 << 30])
    labels = _balanced(rng, n_pat, label_mix or DEFAULT_LABEL_MIX)
    split_of: dict[int, str] = {}
    for lab in CLASSES:
        idx = [i for i, label in enumerate(labels) if label == lab]
        for i, sp in zip(idx, _balanced(rng, len(idx), splits or DEFAULT_SPLITS)):
            split_of[i] = sp
    plan: list[tuple[int, str, str, tuple[str, ...]]] = []
    for i in range(n_pat):
        views = VIEWS if 2 * i + 1 < count else VIEWS[:1]
        plan.append((i, labels[i], split_of[i], views))
    return plan


def _fractions(values: dict[str, float] | None, default: dict[str, float], what: str) -> dict[str, float]:
    vals = dict(default if values is None else values)
    unknown = set(vals) - set(default)
    if unknown:
        raise InputError(f"{what}: unknown name(s) {', '.join(sorted(unknown))}")
    vals = {k: float(vals.get(k, 0.0)) for k in default}
    if any(not math.isfinite(v) or v < 0 for v in vals.values()):
        raise InputError(f"{what}: fractions must be finite and >= 0")
    if abs(sum(vals.values()) - 1) > 1e-6:
        raise InputError(f"{what}: fractions must sum to 1, got {sum(vals.values()):g}")
    return vals


def _render_job(job):
    seed, index, size, label, view, overlap, folder = job
    ph = render_phantom(seed, index, size, label, view, overlap=overlap)
    return write_phantom(Path(folder), ph)


def generate_dataset(out: str | os.PathLike, count: int, seed: int, size: int = 1024, *,
                     splits: dict[str, float] | None = None, label_mix: dict[str, float] | None = None,
                     overlap: float = OVERLAP, jobs: int = 1, progress: bool = False) -> Path:
    """Write a phantom data set of ``count`` images (``ceil(count / 2)`` patients, CC then MLO) into
    ``out`` (a dataset folder, the contract in docs/data.md); the same arguments give the same bytes."""
    from deepminer.data.dataset import staged_output, write_manifest
    from deepminer.model_scale import phantom_spacing_mm

    if isinstance(count, bool) or int(count) != count or count < 1:
        raise InputError(f"count: must be a positive integer, got {count}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed: must be a non-negative integer, got {seed}")
    size = int(size)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size: {size} out of range {MIN_SIZE}..{MAX_SIZE}")
    if not 0 <= overlap <= 0.5:
        raise InputError(f"overlap: {overlap} out of range 0..0.5")
    splits = _fractions(splits, DEFAULT_SPLITS, "splits")
    label_mix = _fractions(label_mix, DEFAULT_LABEL_MIX, "label-mix")
    out = Path(out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{out}: cannot write ({parent} is not a folder)")
            break
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.csv").exists())):
        raise InputError(f"{out}: exists and is not a dataset folder; refusing to overwrite it")
    plan = plan_patients(int(count), int(seed), label_mix, splits)
    jobs_list = [(int(seed), i, size, lab, v, float(overlap)) for i, lab, _, views in plan for v in views]
    split_of = {patient_id(i): sp for i, _, sp, _ in plan}
    try:
        with staged_output(out) as stage:
            for sub in ["images", "lesions"] + [f"masks/{c}" for c in PHANTOM_CONCEPTS]:
                (stage / sub).mkdir(parents=True, exist_ok=True)
            work = [j + (str(stage),) for j in jobs_list]
            rows = _run_jobs(work, jobs, progress)
            for row in rows:
                row["split"] = split_of[row["patient_id"]]
            write_manifest(stage, rows)
            meta = {"generator": "deepminer phantoms", "seed": int(seed), "count": int(count), "size": size,
                    "width": int(round(ASPECT * size)), "bits_stored": BITS,
                    "pixel_spacing_mm": phantom_spacing_mm(size), "splits": splits,
                    "label_mix": label_mix, "overlap": float(overlap), "concepts": list(PHANTOM_CONCEPTS)}
            (stage / "phantoms.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    except OSError as err:
        raise InputError(f"{out}: cannot write ({err.strerror or err})") from None
    return out


def _run_jobs(work: list, jobs: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=len(work), unit="img", desc="phantoms", disable=not progress)
    rows: list[dict] = []
    try:
        if jobs <= 1:
            for job in work:
                rows.append(_render_job(job))
                bar.update()
        else:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(jobs) as pool:
                for row in pool.imap(_render_job, work, chunksize=2):
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()
    return rows


__all__ = ["CALC_TYPES", "Finding", "MASS_MARGINS", "MASS_SHAPES", "PHANTOM_CONCEPTS", "Patient",
           "Phantom", "VIEWS", "draw_patient", "generate_dataset", "looks_malignant", "plan_patients",
           "png16", "powerlaw_noise", "render_phantom", "report_line", "write_phantom"]
