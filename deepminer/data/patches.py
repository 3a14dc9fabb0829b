"""DeepMiner patches: the sliding-window patch table that training and unit profiling read.

Rules (DeepMiner, Wu et al. 2018; docs/data.md):

* the patch side is ``side_frac`` (25%) of the image width; windows move by ``stride_frac`` (50%) of
  the side, and one more window is added flush with the right/bottom edge when the grid stops short
  of it, so every pixel is covered;
* a window is kept when at least ``min_tissue`` (50%) of it is breast tissue
  (:func:`deepminer.data.tissue.tissue_mask`);
* label: a patch is **malignant** if at least ``min_lesion`` (30%) of its pixels are malignant lesion
  *or* it holds at least 30% of the pixels of some malignant finding; else **benign** by the same two
  tests on benign lesion; else **normal**. Malignant takes precedence over benign (a patch that
  qualifies for both is malignant). A *finding* is an 8-connected component of pixels of one value
  in the lesion mask (1 = benign, 2 = malignant). Boundaries are inclusive: exactly 30% counts.

The table (:data:`BASE_COLUMNS` + ``frac_<concept>`` per concept mask in the folder) is a pandas
DataFrame saved as ``patches.csv`` in the dataset folder. :class:`PatchDataset` turns it into
``(1, size, size)`` tensors for torch.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from deepminer import CLASSES
from deepminer.errors import InputError

PATCHES_CSV = "patches.csv"
BASE_COLUMNS = ("image_id", "patient_id", "split", "x0", "y0", "x1", "y1", "label", "tissue")
LESION_VALUES = {1: "benign", 2: "malignant"}
_EPS = 1e-9  # fractions are ratios of pixel counts; keep "exactly 30%" inclusive despite rounding


def patch_boxes(height: int, width: int, side_frac: float = 0.25, stride_frac: float = 0.5
                ) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes ``(x0, y0, x1, y1)`` (x1/y1 exclusive) over an ``height x width`` image.

    ``side = round(side_frac * width)``, ``stride = max(1, round(stride_frac * side))``; a last
    window flush with the far edge is added when the regular grid leaves a strip uncovered.
    """
    side = max(1, int(round(side_frac * width)))
    stride = max(1, int(round(stride_frac * side)))
    if side > height or side > width:
        return []

    def starts(length: int) -> list[int]:
        s = list(range(0, length - side + 1, stride))
        if s[-1] + side < length:
            s.append(length - side)
        return s

    return [(x, y, x + side, y + side) for y in starts(height) for x in starts(width)]


def patch_label(lesion_crop: np.ndarray, finding_fractions: Iterable[tuple[int, float]] = (),
                *, min_lesion: float = 0.3) -> str:
    """The DeepMiner label of one patch.

    ``lesion_crop``: the patch's crop of the lesion mask (0 none, 1 benign, 2 malignant).
    ``finding_fractions``: ``(value, fraction)`` for each finding touching the patch, ``fraction``
    = share of that finding's pixels that lie inside the patch. Malignant wins over benign.
    """
    crop = np.asarray(lesion_crop)
    n = max(1, crop.size)
    fractions = list(finding_fractions)
    for value in (2, 1):
        area = float(np.count_nonzero(crop == value)) / n
        held = max((f for v, f in fractions if v == value), default=0.0)
        if area >= min_lesion - _EPS or held >= min_lesion - _EPS:
            return LESION_VALUES[value]
    return "normal"


def label_findings(lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected findings of a lesion mask: ``(labels, values, sizes)``.

    ``labels`` is an int32 map (0 = background, i = finding i), ``values[i]`` the lesion value of
    finding i and ``sizes[i]`` its pixel count (index 0 unused). 8-connectivity, per value.
    """
    from scipy import ndimage

    lesion = np.asarray(lesion)
    labels = np.zeros(lesion.shape, dtype=np.int32)
    values, n = [0], 0
    for value in (1, 2):
        lab, k = ndimage.label(lesion == value, structure=np.ones((3, 3), dtype=bool))
        if k:
            labels[lab > 0] = lab[lab > 0] + n
            values += [value] * k
            n += k
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return labels, np.asarray(values, dtype=np.int64), sizes


def image_patches(tissue: np.ndarray, lesion: np.ndarray | None = None,
                  concepts: Mapping[str, np.ndarray] | None = None, *, side_frac: float = 0.25,
                  stride_frac: float = 0.5, min_tissue: float = 0.5, min_lesion: float = 0.3) -> list[dict]:
    """Patches of one image from its arrays: ``[{x0, y0, x1, y1, label, tissue, frac_<c>...}]``.

    ``tissue``: bool (H, W); ``lesion``: 0/1/2 (H, W) or None (no finding); ``concepts``: name ->
    mask (H, W), non-zero = concept present.
    """
    tissue = np.asarray(tissue, dtype=bool)
    h, w = tissue.shape
    boxes = np.asarray(patch_boxes(h, w, side_frac, stride_frac), dtype=np.int64).reshape(-1, 4)
    if not len(boxes):
        return []
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float64)
    frac_tissue = box_sums(tissue, boxes) / area
    keep = frac_tissue >= min_tissue - _EPS
    if lesion is None:
        lesion = np.zeros((h, w), dtype=np.uint8)
    lesion = np.asarray(lesion)
    has_lesion = box_sums(lesion > 0, boxes) > 0
    found = label_findings(lesion) if has_lesion.any() else None
    concept_fracs = {k: box_sums(np.asarray(v) > 0, boxes) / area for k, v in (concepts or {}).items()}
    rows = []
    for j in np.flatnonzero(keep):
        x0, y0, x1, y1 = (int(v) for v in boxes[j])
        label = "normal"
        if has_lesion[j] and found is not None:  # found is set whenever any box has lesion
            labels, values, sizes = found
            crop_labels = labels[y0:y1, x0:x1]
            ids, counts = np.unique(crop_labels[crop_labels > 0], return_counts=True)
            findings = [(int(values[i]), float(c) / float(sizes[i])) for i, c in zip(ids, counts)]
            label = patch_label(lesion[y0:y1, x0:x1], findings, min_lesion=min_lesion)
        row = {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "label": label, "tissue": round(float(frac_tissue[j]), 4)}
        for name, fr in concept_fracs.items():
            row[f"frac_{name}"] = round(float(fr[j]), 4)
        rows.append(row)
    return rows


def box_sums(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Number of true pixels of ``mask`` inside each box ``(x0, y0, x1, y1)`` (summed-area table)."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(np.asarray(mask, dtype=np.int64), 0), 1, out=sat[1:, 1:])
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]).astype(np.float64)


def extract_patches(folder: str | os.PathLike, *, side_frac: float = 0.25, stride_frac: float = 0.5,
                    min_tissue: float = 0.5, min_lesion: float = 0.3, progress: bool = True):
    """The patch table of a dataset folder (pandas DataFrame, :data:`BASE_COLUMNS` + ``frac_<c>``).

    Reads every manifest row: the image through :func:`deepminer.data.io.load_image`, its tissue
    mask, lesion mask and concept masks. Splits come from the manifest (patient-disjoint there).
    """
    import pandas as pd
    from tqdm import tqdm

    from deepminer.data.dataset import concepts_in, mask_path, read_manifest
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_mask
    from deepminer.evaluation.masks import read_mask

    folder = Path(folder)
    rows = read_manifest(folder)
    concepts = concepts_in(folder)
    out: list[dict] = []
    for row in tqdm(rows, desc="patches", unit="img", disable=not progress, leave=False):
        pixels = load_image(folder / row["image"]).pixels
        shape = pixels.shape
        lesion = None
        if row["lesion_mask"]:
            lesion = read_mask(folder / row["lesion_mask"], shape)
            bad = np.setdiff1d(np.unique(lesion), [0, 1, 2])
            if bad.size:
                raise InputError(f"{folder / row['lesion_mask']}: lesion values must be 0/1/2, found {int(bad[0])}")
        cmasks = {}
        for c in concepts:
            p = mask_path(folder, c, row["image_id"])
            if p.is_file():
                cmasks[c] = read_mask(p, shape)
            else:
                cmasks[c] = np.zeros(shape, dtype=np.uint8)
        for patch in image_patches(tissue_mask(pixels), lesion, cmasks, side_frac=side_frac,
                                   stride_frac=stride_frac, min_tissue=min_tissue, min_lesion=min_lesion):
            out.append({"image_id": row["image_id"], "patient_id": row["patient_id"], "split": row["split"],
                        **patch})
    columns = list(BASE_COLUMNS) + [f"frac_{c}" for c in concepts]
    return pd.DataFrame(out, columns=columns)


def read_patches(path: str | os.PathLike):
    """Read a ``patches.csv`` (checking its columns and labels) as a DataFrame."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such patch table (run 'deepminer patches --data DIR')")
    try:
        df = pd.read_csv(path, dtype={"image_id": str, "patient_id": str, "split": str, "label": str})
    except Exception as err:  # noqa: BLE001 - pandas raises many types (parser, encoding, empty file)
        raise InputError(f"{path}: not a readable CSV ({type(err).__name__})") from None
    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {', '.join(missing)}")
    bad = sorted(set(df["label"]) - set(CLASSES))
    if bad:
        raise InputError(f"{path}: label {bad[0]!r} not in {'/'.join(CLASSES)}")
    return df


def load_or_extract(folder: str | os.PathLike, patches: str | os.PathLike | None = None, **kwargs):
    """The patch table for ``folder``: ``patches`` if given, else ``folder/patches.csv`` if it
    exists, else extracted now (not written)."""
    if patches is not None:
        return read_patches(patches)
    default = Path(folder) / PATCHES_CSV
    if default.is_file():
        return read_patches(default)
    return extract_patches(folder, **kwargs)


def split_table(table, split: str, source: str = "patch table"):
    """Rows of one split (index reset); :class:`InputError` when there are none."""
    part = table[table["split"] == split].reset_index(drop=True)
    if part.empty:
        raise InputError(f"{source}: no patches in split {split!r}")
    return part


def subsample(table, n: int | None, seed: int):
    """At most ``n`` rows of ``table``, stratified by label (a fixed, seeded draw)."""
    if n is None or len(table) <= n:
        return table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    frac = n / len(table)
    keep = []
    for _, idx in table.groupby("label").indices.items():
        k = max(1, int(round(frac * len(idx))))
        keep.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    return table.iloc[sorted(keep)].reset_index(drop=True)


def cap_per_class(table, n: int | None, seed: int):
    """At most ``n`` rows of each label (a fixed, seeded draw; order kept)."""
    if n is None:
        return table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for _, idx in table.groupby("label").indices.items():
        keep.extend(idx if len(idx) <= n else rng.choice(idx, size=n, replace=False))
    return table.iloc[sorted(int(i) for i in keep)].reset_index(drop=True)


class PatchDataset:
    """Torch dataset over a patch table: ``(x, y)`` with ``x`` a ``(1, size, size)`` float32 tensor
    in [0, 1] (the crop resized with antialiased bilinear interpolation) and ``y`` the class index.

    Each image is loaded once through :func:`deepminer.data.io.load_image` and kept in memory as
    uint16. ``augment=True`` flips horizontally and vertically at random (the only augmentation).
    """

    def __init__(self, folder: str | os.PathLike, table, size: int = 224, augment: bool = False,
                 classes: Sequence[str] = CLASSES):
        from deepminer.data.dataset import read_manifest

        self.folder = Path(folder)
        self.table = table.reset_index(drop=True)
        self.size = int(size)
        self.augment = bool(augment)
        self.classes = tuple(classes)
        bad = sorted(set(self.table["label"]) - set(self.classes))
        if bad:
            raise InputError(f"patch table: label {bad[0]!r} not in {'/'.join(self.classes)}")
        images = {r["image_id"]: r["image"] for r in read_manifest(self.folder)}
        missing = sorted(set(self.table["image_id"]) - set(images))
        if missing:
            raise InputError(f"patch table: image_id {missing[0]!r} not in {self.folder / 'manifest.csv'}")
        self._paths = {i: self.folder / images[i] for i in self.table["image_id"].unique()}
        self._cache: dict[str, np.ndarray] = {}
        self._boxes = self.table[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.int64)
        self._ids = self.table["image_id"].to_numpy()
        self.labels = np.array([self.classes.index(v) for v in self.table["label"]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def _image(self, image_id: str) -> np.ndarray:
        img = self._cache.get(image_id)
        if img is None:
            from deepminer.data.io import load_image

            px = load_image(self._paths[image_id]).pixels
            img = np.round(np.clip(px, 0.0, 1.0) * 65535.0).astype(np.uint16)
            self._cache[image_id] = img
        return img

    def preload(self, progress: bool = False) -> "PatchDataset":
        """Load every image now (before forking DataLoader workers, so they share the cache)."""
        from tqdm import tqdm

        for i in tqdm(list(self._paths), desc="loading images", unit="img", disable=not progress, leave=False):
            self._image(i)
        return self

    def crop(self, i: int) -> np.ndarray:
        """Patch ``i`` at full resolution, float32 in [0, 1] (no resize, no flip)."""
        x0, y0, x1, y1 = self._boxes[i]
        img = self._image(self._ids[i])
        if y1 > img.shape[0] or x1 > img.shape[1]:
            raise InputError(f"{self._paths[self._ids[i]]}: patch box {x0},{y0},{x1},{y1} outside the "
                             f"{img.shape[1]}x{img.shape[0]} image")
        return img[y0:y1, x0:x1].astype(np.float32) / 65535.0

    def __getitem__(self, i: int):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(self.crop(int(i)))[None, None]
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        x = x[0]
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            if torch.rand(()) < 0.5:
                x = x.flip(-2)
        return x.contiguous(), int(self.labels[i])
