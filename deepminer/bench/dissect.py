"""The dissection row: :func:`deepminer.atlas.profile_batch` vs the bare forward, items/s on the same
in-memory batches of phantom patches."""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepminer.bench.common import (DISSECT_BATCHES, DISSECT_IMAGE_PX, PATCHES_PER_IMAGE, log_rep, median,
                                    timed)
from deepminer.errors import InputError

@dataclass
class PhantomPatches:
    """A temporary phantom data set (every image in split ``test``) with its ``patches.csv``."""

    folder: Path
    items: int
    images: int
    _tmp: Any = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def phantom_patches(min_items: int, *, image_px: int = DISSECT_IMAGE_PX, seed: int = 0,
                    workdir: str | os.PathLike | None = None) -> PhantomPatches:
    """Write a phantom data set into a temporary folder and a patch table of its first
    ``min_items`` patches (fewer only when three tries at more images do not give that many)."""
    from deepminer.data.patches import PATCHES_CSV, extract_patches
    from deepminer.data.phantoms import generate_dataset

    tmp = tempfile.TemporaryDirectory(prefix="deepminer-bench-", dir=workdir)
    count = max(1, math.ceil(min_items / PATCHES_PER_IMAGE))
    for attempt in range(3):
        folder = Path(tmp.name) / f"data{attempt}"
        generate_dataset(folder, count, seed, image_px, splits={"test": 1.0})
        table = extract_patches(folder, progress=False)
        if len(table) >= min_items or attempt == 2:
            break
        count = math.ceil(count * min_items / max(1, len(table))) + 1
    if table.empty:
        tmp.cleanup()
        raise InputError("bench: the phantom data set gave no patches")
    table = table.iloc[:max(1, min_items)]  # exactly the batches asked for (rows are grouped by image)
    table.to_csv(folder / PATCHES_CSV, index=False, lineterminator="\n")
    return PhantomPatches(folder, len(table), int(table["image_id"].nunique()), tmp)


def _patch_batches(folder: Path, batch_size: int, patch_px: int, device: torch.device
                   ) -> tuple[list[torch.Tensor], np.ndarray]:
    """The ``test`` patches of ``folder`` in dissection order (grouped by image), read once and kept
    on ``device`` as batches of ``batch_size``, and the image index of each patch."""
    from deepminer.data.patches import PATCHES_CSV, PatchDataset, read_patches, split_table

    refs = split_table(read_patches(folder / PATCHES_CSV), "test")
    codes = refs["image_id"].map({v: j for j, v in enumerate(dict.fromkeys(refs["image_id"]))}).to_numpy()
    order = np.argsort(codes, kind="stable")
    ds = PatchDataset(folder, refs.iloc[order].reset_index(drop=True), size=patch_px, augment=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
    return list(x.split(batch_size)), codes[order].astype(np.int64)


def _profile_all(model: torch.nn.Module, batches: Sequence[torch.Tensor], state: Any) -> None:
    from deepminer.atlas import profile_batch

    for xb in batches:
        profile_batch(model, xb, state)


def _forward_all(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> None:
    with torch.inference_mode():
        for xb in batches:
            model(xb)


def measure_dissect(model: torch.nn.Module, device: torch.device, *, batch_size: int, repeats: int,
                    warmup: int, patch_px: int = 224, image_px: int = DISSECT_IMAGE_PX,
                    batches: int = DISSECT_BATCHES, log: Callable[[str], None] | None = None, label: str = "",
                    workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Dissection's per-batch step (:func:`deepminer.atlas.profile_batch`) vs the bare forward
    ``model(x)``, items/s over the same in-memory batches of phantom patches, interleaved (a fresh
    :class:`~deepminer.atlas.ProfileState` each repetition, made before the clock starts); see the
    module docstring."""
    from functools import partial

    from deepminer.atlas import ProfileState

    data = phantom_patches(batch_size * batches, image_px=image_px, workdir=workdir)
    try:
        xs, image_index = _patch_batches(data.folder, batch_size, patch_px, device)
    finally:
        data.cleanup()
    n = sum(int(xb.shape[0]) for xb in xs)
    raw: dict[str, list[float]] = {"dissect_items_per_s": [], "forward_items_per_s": []}
    raw_cpu: dict[str, list[float]] = {"dissect_ms": [], "forward_ms": []}
    for i in range(warmup + repeats):
        state = ProfileState(model, n, image_index, device=device)
        d_ms, d_cpu = timed(partial(_profile_all, model, xs, state), device)
        f_ms, f_cpu = timed(partial(_forward_all, model, xs), device)
        got = {"dissect_items_per_s": n / max(d_ms / 1000.0, 1e-12),
               "forward_items_per_s": n / max(f_ms / 1000.0, 1e-12)}
        if i >= warmup:
            for key, v in got.items():
                raw[key].append(v)
            raw_cpu["dissect_ms"].append(d_cpu)
            raw_cpu["forward_ms"].append(f_cpu)
        log_rep(log, f"{label} dissection", i, warmup, repeats, got)
    med = {k: median(v) for k, v in raw.items()}
    cpu = {k: median(v) for k, v in raw_cpu.items()}
    return {
        "method": "deepminer.atlas.profile_batch (forward + streaming quantile tails, top-k heaps, influence "
                  "counts, embedding) vs model(x), on the same in-memory batches",
        "items": n, "images": data.images, "batch_size": batch_size, "patch_px": patch_px,
        **med,
        "dissect_vs_forward": med["dissect_items_per_s"] / med["forward_items_per_s"],
        "cpu": {**cpu, "dissect_vs_forward": cpu["forward_ms"] / max(cpu["dissect_ms"], 1e-9)},
        "raw": raw, "raw_cpu": raw_cpu,
    }
