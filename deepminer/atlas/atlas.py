"""Reading a unit atlas folder (``atlas.json`` + ``atlas.npz`` + ``references.csv``).

The galleries are rendered on demand from the reference images (nothing is stored as pixels): the
crop of each top-activating patch, and the unit's response on it (its stored small map upsampled
bilinearly and thresholded at the unit's threshold, :func:`deepminer.explain.units.unit_masks`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.errors import InputError
from deepminer.explanation import class_index
from deepminer.model_folder import ATLAS_FILES, ATLAS_JSON, ATLAS_NPZ, REFERENCES



def _box(values: Any) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in values)
    return x0, y0, x1, y1


@dataclass
class TopPatch:
    """One entry of a unit's gallery."""

    rank: int
    reference: int  #: row of ``references.csv``
    image_id: str
    image: str  #: image path relative to the data folder
    box: tuple[int, int, int, int]  #: x0, y0, x1, y1 in source-image pixels (x1/y1 exclusive)
    activation: float  #: the unit's max activation on the patch


class Atlas:
    """A unit atlas written by :func:`deepminer.atlas.dissect`. ``Atlas.load(path)``."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray], references):
        self.path, self.meta, self.arrays, self.references = path, meta, arrays, references

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Atlas":
        import pandas as pd

        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: no such atlas folder")
        for name in ATLAS_FILES:
            if not (path / name).is_file():
                raise InputError(f"{path / name}: missing (an atlas folder needs {', '.join(ATLAS_FILES)})")
        try:
            meta = json.loads((path / ATLAS_JSON).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"{path / ATLAS_JSON}: not valid JSON ({type(err).__name__})") from None
        if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("deepminer-atlas/"):
            raise InputError(f"{path / ATLAS_JSON}: not a deepminer atlas (no 'format' deepminer-atlas/...)")
        try:
            with np.load(path / ATLAS_NPZ, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - a damaged npz raises zipfile, ValueError, OSError or EOFError
            raise InputError(f"{path / ATLAS_NPZ}: unreadable ({type(err).__name__})") from None
        refs = pd.read_csv(path / REFERENCES, dtype={"image_id": str, "image": str})
        return cls(path, meta, arrays, refs)

    # -- basics ----------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_units(self) -> int:
        return int(self.arrays["thresholds"].shape[0])

    @property
    def quantile(self) -> float:
        return float(self.meta["quantile"])

    @property
    def thresholds(self) -> np.ndarray:
        """``[K]`` float32: each unit's activation threshold (its ``quantile`` over the references)."""
        return self.arrays["thresholds"]

    @property
    def concepts(self) -> list[str]:
        return list(self.meta["data"].get("concepts") or [])

    @property
    def iou(self) -> np.ndarray:
        """``[K, n_concepts]`` Network Dissection IoU summed over the references."""
        return self.arrays["iou"]

    @property
    def embedding(self) -> np.ndarray:
        """``[n_images, K]`` float32: each unit's max activation per reference image."""
        return self.arrays["embedding"].astype(np.float32)

    @property
    def unit_coords(self) -> np.ndarray:
        """``[K, 2]``: the units' PCA coordinates (Lu & Perer's unit embedding)."""
        return self.arrays["pca"]

    @property
    def mask_fraction(self) -> np.ndarray | None:
        """``[K]``: the mean share of a reference patch inside each unit's mask, over all references
        (:func:`deepminer.atlas.stats.mask_sizes`); None for an atlas dissected before it existed."""
        v = self.arrays.get("mask_fraction")
        return None if v is None else np.asarray(v, dtype=np.float32)

    @property
    def roi_fraction(self) -> np.ndarray:
        """``[K]``: the mean share of each unit's top-k gallery patches inside its mask (Peck's ROI
        size); computed from the stored gallery maps for an atlas dissected before it was stored."""
        v = self.arrays.get("roi_fraction")
        if v is None:
            from deepminer.atlas.stats import mask_sizes

            import torch

            maps = torch.from_numpy(self.arrays["topk_maps"].astype(np.float32))
            grid = int(self.meta.get("iou", {}).get("grid", 64))
            v = mask_sizes(np.zeros(self.num_units), 1, grid, maps, maps.shape[1], self.thresholds,
                           maps.shape[1])["roi_fraction"]
            self.arrays["roi_fraction"] = v
        return np.asarray(v, dtype=np.float32)

    def _cls(self, cls: str | int) -> int:
        return class_index(self.classes, cls)

    def _checked_unit(self, unit: int) -> int:
        """``unit`` as an int, checked to be a unit of this atlas (0..K-1)."""
        if not 0 <= int(unit) < self.num_units:
            raise InputError(f"unit {unit} out of range 0..{self.num_units - 1}")
        return int(unit)

    # -- influence -------------------------------------------------------------------------------
    def top_units(self, cls: str | int, n: int | None = None) -> list[int]:
        """The most frequently influential units of a class (DeepMiner's top 20), best first."""
        top = self.meta["per_class"][self.classes[self._cls(cls)]]["top_units"]
        return list(top if n is None else top[:n])

    def frequency(self, cls: str | int) -> np.ndarray:
        """``[K]``: how often each unit was among the top 8 of a patch predicted as ``cls``."""
        return self.arrays["frequency"][self._cls(cls)]

    def coverage(self, cls: str | int) -> float | None:
        """Share of the per-patch top-8 slots of ``cls`` that its top units hold (None: never predicted)."""
        return self.meta["per_class"][self.classes[self._cls(cls)]]["coverage"]

    # -- galleries -------------------------------------------------------------------------------
    def topk(self, unit: int) -> list[TopPatch]:
        """The unit's top-activating reference patches, highest activation first."""
        u = self._checked_unit(unit)
        out = []
        for r, (ref, act) in enumerate(zip(self.arrays["topk_index"][u], self.arrays["topk_activation"][u])):
            row = self.references.iloc[int(ref)]
            out.append(TopPatch(rank=r, reference=int(ref), image_id=str(row["image_id"]), image=str(row["image"]),
                                box=_box(self.arrays["topk_box"][u, r]), activation=float(act)))
        return out

    def render_topk(self, unit: int, data_root: str | os.PathLike | None = None, size: int = 128,
                    k: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """The unit's gallery rendered from the reference images: per top patch ``(crop, mask)`` with
        ``crop`` uint8 ``(size, size)`` (the patch resized, 255 = brightest) and ``mask`` bool
        ``(size, size)`` (the unit's response above its threshold). ``data_root``: where the
        reference data folder is now (default: where it was when dissected)."""
        import torch
        import torch.nn.functional as F

        from deepminer.data.io import load_image
        from deepminer.explain.units import unit_masks

        u = self._checked_unit(unit)
        root = Path(data_root or self.meta["data"]["folder"])
        entries = self.topk(u)[:k]
        maps = self.arrays["topk_maps"][u].astype(np.float32)
        t = self.thresholds[u:u + 1]
        loaded: dict[str, np.ndarray] = {}
        out = []
        for e in entries:
            if e.image not in loaded:
                p = root / e.image
                if not p.is_file():
                    raise InputError(f"{p}: reference image missing (pass data_root= where the data folder is now)")
                loaded[e.image] = load_image(p).pixels
            x0, y0, x1, y1 = e.box
            crop = torch.from_numpy(np.ascontiguousarray(loaded[e.image][y0:y1, x0:x1]))[None, None]
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True)[0, 0].clamp(0, 1)
            img = np.round(crop.numpy() * 255.0).astype(np.uint8)
            mask = unit_masks(maps[e.rank][None], t, (size, size))[0]
            out.append((img, mask))
        return out

    # -- labels ----------------------------------------------------------------------------------
    def suggested_label(self, unit: int) -> tuple[str, float] | None:
        """``(concept, IoU)`` of the unit's best concept, or None when the data set had no concept
        masks or the best IoU is below ``min_label_iou`` (0.04, Network Dissection)."""
        u = self._checked_unit(unit)
        if not self.concepts:
            return None
        row = self.iou[u]
        best = int(np.argmax(row))
        if row[best] < float(self.meta["iou"]["min_label_iou"]):
            return None
        return self.concepts[best], float(row[best])

    def summary(self) -> dict[str, Any]:
        """A small dict for printing: counts, coverage per class, labelled units."""
        labelled = sum(self.suggested_label(u) is not None for u in range(self.num_units))
        return {"references": self.meta["counts"]["references"], "units": self.num_units,
                "coverage": {c: self.coverage(c) for c in self.classes}, "labelled_units": labelled}
