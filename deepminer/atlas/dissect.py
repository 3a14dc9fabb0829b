"""Unit dissection: profile every unit of a model's last convolutional layer over a reference set.

One pass over the DeepMiner patches of a split (:func:`deepminer.data.patches.load_or_extract`),
forward only, batch by batch (tqdm bar). Each batch is one call of :func:`profile_batch`, which
works on the unit maps ``(B, K, h, w)`` and nothing else (cheap tensor ops, no second forward) and
folds them into a :class:`ProfileState`:

* every activation goes into :class:`~deepminer.atlas.stats.TailQuantile` (per-unit threshold at
  ``quantile``, exact while it fits the memory budget);
* each unit's max activation per patch goes into :class:`~deepminer.atlas.stats.TopItems` (the
  top-activating patches with their small unit maps: the gallery and what IoU needs), into the
  per-image embedding (running max) and into DeepMiner's influence counts (per patch, influence of
  unit k = max activation x FC weight for the class the *patch is predicted as*; the top 8 units of
  each patch are counted for that class).

After the pass, Network Dissection IoU is summed over the set from the stored maps of the patches
where a unit exceeds its threshold (every such patch is in the unit's heap when the heap holds at
least as many patches as there are activations above the threshold; ``iou_complete`` says so per
unit) and the concept masks, read once per image. See ``docs/atlas.md``.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepminer import __version__
from deepminer.atlas.stats import (TailQuantile, TopItems, coverage, influence_counts, mask_sizes, pca_2d,
                                   rank_by_frequency, sample_per_item, tail_length)
from deepminer.errors import InputError
from deepminer.model_folder import ATLAS, ATLAS_JSON, ATLAS_NPZ, REFERENCES
from deepminer.defaults import INFLUENCE_TOP, IOU_SIZE, MEMORY_MB, MIN_LABEL_IOU, QUANTILE, TOP_UNITS, TOPK
from deepminer.models.fcn import patch_px
from deepminer.runtime import resolve_device

FORMAT = "deepminer-atlas/1"

__all__ = ["FORMAT", "IOU_SIZE", "MEMORY_MB", "QUANTILE", "TOPK", "ProfileResult", "ProfileState", "check_writable",
           "concept_fractions", "dissect", "heap_plan", "mask_sizes", "profile_batch"]


def _load_model(model) -> tuple[Any, dict]:
    from deepminer.models import FCN, load_model
    from deepminer.models.checkpoints import file_sha256, weights_sha256

    info: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"{path}: no such model file")
        net = load_model(path)
        info.update(path=str(path.resolve()), file_sha256=file_sha256(path),
                    name=path.parent.name if path.stem == "model" else path.stem)
    elif isinstance(model, FCN):
        net = model
        info["name"] = getattr(model, "name", None) or model.arch
    else:
        raise InputError(f"model: expected an FCN or a checkpoint path, got {type(model).__name__}")
    info.update(arch=net.arch, layer=net.layer, head=net.head_type, classes=list(net.classes),
                num_units=int(net.num_units), weights_sha256=weights_sha256(net))
    return net, info


def concept_fractions(data: Path, image_id: str, boxes: np.ndarray, concepts: list[str], s: int
                      ) -> tuple[np.ndarray, list[tuple[np.ndarray, torch.Tensor]]]:
    """Concept coverage of the patches ``boxes`` of one image on an ``s x s`` grid per patch.

    Each concept mask is read once; a cell's value is the share of its pixels in the concept (area
    downsampling, so sums are pixel counts at grid scale and small findings never vanish). Returns
    the summed area per concept ``(n_c,)`` and, per box, the sparse ``(concept ids, (n, s*s))``
    of the concepts present in it.
    """
    from deepminer.data.dataset import mask_path
    from deepminer.evaluation.masks import read_mask

    area = np.zeros(len(concepts))
    present, masks = [], []
    for c, name in enumerate(concepts):
        p = mask_path(data, name, image_id)
        if p.is_file():
            m = read_mask(p)
            if m.any():
                present.append(c)
                masks.append(torch.from_numpy(m > 0))
    empty = (np.zeros(0, dtype=np.int64), torch.zeros(0, s * s))
    out: list[tuple[np.ndarray, torch.Tensor]] = [empty] * len(boxes)
    if not present:
        return area, out
    stack = torch.stack(masks)                                           # (n_p, H, W) bool
    ids = np.asarray(present)
    hits = [i for i, (x0, y0, x1, y1) in enumerate(boxes) if stack[:, y0:y1, x0:x1].any()]
    sides = {(int(boxes[i][3] - boxes[i][1]), int(boxes[i][2] - boxes[i][0])) for i in hits}
    for hw in sides:                                                      # patches of one size at once
        group = [i for i in hits if (boxes[i][3] - boxes[i][1], boxes[i][2] - boxes[i][0]) == hw]
        step = max(1, (1 << 24) // max(1, len(present) * hw[0] * hw[1]))
        for g0 in range(0, len(group), step):
            part = group[g0:g0 + step]
            crops = torch.stack([stack[:, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes[part]]).float()
            fr = F.interpolate(crops, size=(s, s), mode="area").flatten(2)   # (n, n_p, s*s)
            tot = fr.sum(dim=2)                                               # (n, n_p)
            area[ids] += tot.sum(dim=0).double().numpy()
            for j, i in enumerate(part):
                keep = (tot[j] > 0).numpy()
                out[i] = (ids[keep], fr[j, keep])
    return area, out


def _dissect_iou(data: Path, refs, concepts: list[str], thresholds: np.ndarray, scores: torch.Tensor,
                 index: torch.Tensor, maps: torch.Tensor, iou_size: int, progress: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Network Dissection IoU ``(K, n_c)`` summed over the references, with its counts
    (intersection ``(K, n_c)``, unit area ``(K,)``, concept area ``(n_c,)``, in grid cells).

    A unit mask can be non-empty only on a patch where the unit's max exceeds its threshold; those
    patches are the first entries of the unit's heap (``scores``/``index``/``maps``), so only
    those (unit, patch) pairs are upsampled (:func:`deepminer.explain.units.unit_masks`)."""
    from tqdm import tqdm

    from deepminer.atlas.stats import iou_from_counts
    from deepminer.explain.units import unit_masks

    k, n_c, cells = scores.shape[0], len(concepts), iou_size * iou_size
    above = scores > torch.from_numpy(thresholds.astype(np.float32))[:, None]
    pair_unit, pair_slot = (t.numpy() for t in above.nonzero(as_tuple=True))
    pair_item = index.numpy()[pair_unit, pair_slot]
    needed = set(np.unique(pair_item).tolist())
    concept_area = np.zeros(n_c)
    fracs: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
    boxes_all = refs[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.int64)
    groups = refs.groupby("image_id", sort=False).indices
    for image_id, rows in tqdm(groups.items() if n_c else (), desc="concept masks", unit="img",
                               disable=not progress, leave=False):
        area, per_box = concept_fractions(data, image_id, boxes_all[rows], concepts, iou_size)
        concept_area += area
        fracs.update((int(r), f) for r, f in zip(rows, per_box) if int(r) in needed and len(f[0]))
    inter = np.zeros((k, n_c))
    unit_area = np.zeros(k)
    step = max(1, (1 << 22) // cells)
    for s0 in range(0, len(pair_unit), step):                     # (unit, patch) pairs, vectorised
        u, items = pair_unit[s0:s0 + step], pair_item[s0:s0 + step]
        m = unit_masks(maps[u, pair_slot[s0:s0 + step]].float(), thresholds[u], (iou_size, iou_size))
        m = m.reshape(len(u), cells)
        np.add.at(unit_area, u, m.sum(axis=1))
        for j in np.flatnonzero([int(i) in fracs for i in items]):   # pairs whose patch holds a concept
            cids, frac = fracs[int(items[j])]
            inter[u[j], cids] += frac.double().numpy() @ m[j].astype(np.float64)
    return iou_from_counts(inter, unit_area, concept_area), inter, unit_area, concept_area


def check_writable(out: Path) -> None:
    """Fail early, with one line, when ``out`` cannot be written (before any long work); creates
    nothing (the probe goes into the nearest existing ancestor and is removed)."""
    import shutil
    import tempfile

    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"{out}: cannot write here ({anc} is not a folder)")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=anc), ignore_errors=True)
    except OSError as err:
        raise InputError(f"{out}: cannot write here ({err.strerror or type(err).__name__})") from None


class _OneImageAtATime(torch.utils.data.Dataset):
    """A :class:`~deepminer.data.patches.PatchDataset` read in order that keeps only the current
    image decoded (patches are grouped by image), so memory does not grow with the split."""

    def __init__(self, ds):
        self.ds, self._current = ds, None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image_id = self.ds.table["image_id"].iat[i]
        if image_id != self._current:
            getattr(self.ds, "_cache", {}).clear()
            self._current = image_id
        return self.ds[i]


# -- the streaming pass: one batch at a time ------------------------------------------------------

def heap_plan(units: int, positions: int, items: int, quantile: float, topk: int, budget: int
              ) -> tuple[int, torch.dtype]:
    """Capacity and map dtype of the per-unit heaps within 3/4 of ``budget`` bytes: enough patches
    for every activation above the ``quantile`` threshold (what exact IoU needs), at least ``topk``,
    at most ``items``; float32 maps when the heaps fit (x2 while merging), else float16, else fewer
    patches."""
    need = min(items, tail_length(items * positions, quantile))
    share = budget * 3 // 4
    dtype = torch.float32 if 2 * 4 * units * positions * need <= share else torch.float16
    cap_mem = share // (2 * dtype.itemsize * units * positions)
    return min(items, max(topk, min(need, cap_mem))), dtype


@dataclass
class ProfileResult:
    """What a finished pass gives (:meth:`ProfileState.result`), on the CPU."""

    thresholds: np.ndarray     # (K,) float32
    scores: torch.Tensor       # (K, M) the heaps: max activation per patch, descending
    index: torch.Tensor        # (K, M) reference rows of the heap entries
    maps: torch.Tensor         # (K, M, h, w) their unit maps
    complete: np.ndarray       # (K,) bool: every patch above the threshold is in the heap
    counts: np.ndarray         # (C, K) int64 influence frequency
    sums: np.ndarray           # (C, K) float64 summed influence
    preds: np.ndarray          # (N,) int64 predicted class per patch
    embedding: np.ndarray      # (n_images, K) float16 max activation per image
    threshold_method: str
    heap_patches: int
    heap_dtype: str
    map_hw: tuple[int, int]


class ProfileState:
    """The streaming statistics of one dissection pass over ``items`` reference patches of ``net``
    (on ``device``, default the model's), updated batch by batch by :func:`profile_batch`.

    ``image_index (items,)``: the image each patch comes from, ``0..n_images-1`` (default: all from
    one image). Memory stays within ``memory_mb`` (threshold tails 1/4, map heaps 3/4); both are
    sized on the first batch, when the unit-map size is known."""

    def __init__(self, net, items: int, image_index: Sequence[int] | np.ndarray | None = None, *,
                 quantile: float = QUANTILE, topk: int = TOPK, memory_mb: float = MEMORY_MB, seed: int = 0,
                 device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else net.device
        self.units, self.classes, self.items = int(net.num_units), len(net.classes), int(items)
        index = np.zeros(self.items, dtype=np.int64) if image_index is None else np.asarray(image_index)
        self.image_index = torch.from_numpy(index.astype(np.int64))
        self.quantile, self.topk, self.seed = float(quantile), int(topk), int(seed)
        self.budget = int(memory_mb * (1 << 20))
        self.weights = net.unit_weights.detach().float().to(self.device)
        self.slots = min(INFLUENCE_TOP, self.units)
        self.tails: TailQuantile | None = None
        self.heap: TopItems | None = None
        self.map_hw: tuple[int, int] = (0, 0)
        n_images = int(index.max()) + 1 if self.items else 0
        self.counts = torch.zeros(self.classes, self.units, dtype=torch.long, device=self.device)
        self.sums = torch.zeros(self.classes, self.units, dtype=torch.float64, device=self.device)
        self.emb = torch.full((n_images, self.units), -float("inf"), device=self.device)
        self.preds = torch.empty(self.items, dtype=torch.long)
        self.seen = 0

    def _start(self, map_hw: tuple[int, int]) -> tuple[TailQuantile, TopItems]:
        self.map_hw = map_hw
        pos = map_hw[0] * map_hw[1]
        per_item = sample_per_item(pos, self.items, self.units, self.quantile, self.budget // 4)
        self.tails = TailQuantile(self.units, self.quantile, self.items, pos, per_item=per_item, seed=self.seed,
                                  device=self.device)
        capacity, dtype = heap_plan(self.units, pos, self.items, self.quantile, self.topk, self.budget)
        self.heap = TopItems(self.units, capacity, map_hw, device=self.device, dtype=dtype)
        return self.tails, self.heap

    def update(self, feats: torch.Tensor, pred: torch.Tensor) -> None:
        """Fold one batch in: unit maps ``feats (B, K, h, w)`` of the next ``B`` patches and their
        predicted classes ``pred (B,)``."""
        if self.tails is None or self.heap is None:
            tails, heap = self._start((int(feats.shape[2]), int(feats.shape[3])))
        else:
            tails, heap = self.tails, self.heap
        b, start = feats.shape[0], self.seen
        if start + b > self.items:
            raise ValueError(f"profile: more than the {self.items} patches announced")
        idx = torch.arange(start, start + b)
        item_max = feats.amax(dim=(2, 3))                           # (B, K)
        tails.update(feats.transpose(0, 1).reshape(self.units, b, -1))
        heap.update(item_max, idx.to(self.device), feats)
        c, s = influence_counts(item_max, self.weights, pred, top=self.slots)
        self.counts += c
        self.sums += s
        self.emb.scatter_reduce_(0, self.image_index[idx].to(self.device)[:, None].expand(-1, self.units),
                                 item_max.float(), reduce="amax")
        self.preds[start:start + b] = pred.cpu()
        self.seen += b

    def result(self) -> ProfileResult:
        """Thresholds, heaps, influence counts, predictions and embedding of everything seen."""
        if self.tails is None or self.heap is None:
            raise ValueError("profile: no batch was profiled")
        tails, heap = self.tails, self.heap
        thresholds = tails.result().float().numpy()
        scores, index, maps = (t.cpu() for t in heap.result())
        complete = (heap.capacity >= self.items) | (scores[:, -1].numpy() <= thresholds)
        method = "exact" if tails.exact else f"sampled: {tails.per_item} of {tails.positions} positions per patch"
        return ProfileResult(thresholds=thresholds, scores=scores, index=index, maps=maps, complete=complete,
                             counts=self.counts.cpu().numpy(), sums=self.sums.cpu().numpy(),
                             preds=self.preds.numpy(), embedding=self.emb.cpu().numpy().astype(np.float16),
                             threshold_method=method, heap_patches=int(heap.capacity),
                             heap_dtype=str(heap.dtype).replace("torch.", ""), map_hw=self.map_hw)


def profile_batch(net, x: torch.Tensor, state: ProfileState) -> torch.Tensor:
    """One dissection step: forward a batch of patches ``x (B, 1, H, W)`` through ``net`` (the
    unit maps and the predicted class of each patch, one forward under ``torch.inference_mode``)
    and fold it into ``state``: the streaming per-unit quantile tails, the top-k heaps with their
    unit maps, DeepMiner's influence counts for the predicted class, the per-image embedding.

    Batches must come in the order of the state's patches (``image_index``). Calling this on every
    batch and then :meth:`ProfileState.result` is exactly the pass :func:`dissect` makes. Returns the
    predicted classes ``(B,)``."""
    with torch.inference_mode():
        x = x.to(state.device, non_blocking=True)
        feats = net.forward_features(x)                            # (B, K, h, w)
        pred = net.pool(net.class_logits(feats)).argmax(dim=1)
        state.update(feats, pred)
    return pred


def dissect(model, data: str | os.PathLike, split: str = "test", out: str | os.PathLike = ATLAS, *,
            quantile: float = QUANTILE, topk: int = TOPK, batch_size: int = 32,
            device: str | torch.device | None = None, patch_size: int | None = None,
            patches: str | os.PathLike | None = None, iou_size: int = IOU_SIZE, memory_mb: float = MEMORY_MB,
            progress: bool = True, seed: int = 0):
    """Profile every unit of ``model`` (an :class:`~deepminer.models.FCN` or a checkpoint path) over
    the patches of ``split`` of dataset folder ``data`` and write the atlas folder ``out``
    (``atlas.json``, ``atlas.npz``, ``references.csv``; staged, moved into place on success).

    ``patch_size``: side the patches are resized to (default: the checkpoint's ``meta['patch_size']``,
    else 224); ``patches``: a patch table CSV (default ``data/patches.csv`` or extracted now);
    ``memory_mb``: budget of the streaming state (threshold tail 1/4, map heaps 3/4). Returns the
    :class:`~deepminer.atlas.Atlas`.
    """
    from deepminer.atlas.atlas import Atlas

    if not 0.0 < quantile < 1.0:
        raise InputError(f"quantile: must be in (0, 1), got {quantile}")
    if topk < 1 or batch_size < 1 or iou_size < 1 or memory_mb <= 0:
        raise InputError("topk, batch_size, iou_size and memory_mb must be positive")
    out = Path(out)
    check_writable(out)
    dev = resolve_device(device)
    net, model_info = _load_model(model)
    meta, arrays, refs_out = _profile(net, model_info, Path(data), split, dev, quantile=quantile, topk=topk,
                                      batch_size=batch_size, patch_size=patch_size, patches=patches, iou_size=iou_size,
                                      memory_mb=memory_mb, progress=progress, seed=seed)
    _write_atlas(out, meta, arrays, refs_out)
    return Atlas.load(out)


def _write_atlas(out: Path, meta: dict, arrays: dict[str, Any], refs_out) -> None:
    """The three atlas files, staged beside ``out`` and moved into place; a one-line error if not."""
    from deepminer.atomic import staged_output

    try:
        with staged_output(out) as stage:
            np.savez_compressed(stage / ATLAS_NPZ, **arrays)
            refs_out.to_csv(stage / REFERENCES, index=False, lineterminator="\n")
            with open(stage / ATLAS_JSON, "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=1)
                fh.write("\n")
    except OSError as err:
        raise InputError(f"{out}: cannot write ({err.strerror or type(err).__name__})") from None


def _profile(net, model_info: dict, data: Path, split: str, dev: torch.device, *, quantile: float, topk: int,
             batch_size: int, patch_size: int | None, patches, iou_size: int, memory_mb: float, progress: bool,
             seed: int):
    """The pass over the references and everything computed from it: ``(meta, arrays, references)``."""
    from deepminer.data.dataset import concepts_in

    image_paths, refs, image_ids, image_index = _reference_set(data, split, patches, progress)
    concepts = concepts_in(data)
    psize = patch_px(net, patch_size)
    loader = _patch_loader(data, refs, psize, batch_size)

    t0, c0 = time.perf_counter(), time.process_time()
    net = net.to(dev).eval()
    state = ProfileState(net, len(refs), image_index, quantile=quantile, topk=topk, memory_mb=memory_mb, seed=seed,
                         device=dev)
    _stream(net, loader, state, progress)
    pass_s, pass_cpu = time.perf_counter() - t0, time.process_time() - c0
    res = state.result()
    iou_sum, _, unit_area, _ = _dissect_iou(data, refs, concepts, res.thresholds, res.scores, res.index, res.maps,
                                            iou_size, progress)
    iou = iou_sum.astype(np.float32).reshape(state.units, len(concepts))
    sizes = mask_sizes(unit_area, len(refs), iou_size, res.maps, res.scores.shape[1], res.thresholds, topk)
    n_pred = np.bincount(res.preds, minlength=state.classes)
    top_units = rank_by_frequency(res.counts, res.sums)[:, :min(TOP_UNITS, state.units)]
    cover = coverage(res.counts, top_units, n_pred, state.slots)
    pca = pca_2d(res.embedding.T.astype(np.float64)).astype(np.float32)  # the PCA of the values as stored
    total_s = time.perf_counter() - t0

    arrays = {**_atlas_arrays(res, iou, pca, refs, topk), **sizes}
    timing = {"pass_s": round(pass_s, 3), "total_s": round(total_s, 3), "pass_cpu_s": round(pass_cpu, 3),
              "patches_per_s": round(len(refs) / max(pass_s, 1e-9), 2), "device": str(dev),
              "batch_size": batch_size}
    source = {"folder": str(data.resolve()), "split": split, "patch_size": psize,
              "patches": str(Path(patches).resolve()) if patches else None, "concepts": concepts}
    meta = _atlas_meta(model_info, list(net.classes), source, quantile, state, res, arrays, top_units, cover, n_pred,
                       iou_size, refs["label"].tolist(), image_ids, timing)
    return meta, arrays, _references_out(refs, image_paths, list(net.classes), res.preds, image_index)


def _reference_set(data: Path, split: str, patches, progress: bool):
    """``(image paths by id, references grouped by image, image ids, image index per reference)``:
    the patches of ``split``, rows of one image together (first-seen image order kept)."""
    from deepminer.data.dataset import read_manifest
    from deepminer.data.patches import load_or_extract, split_table

    manifest = read_manifest(data)
    image_paths = {r["image_id"]: r["image"] for r in manifest}
    table = load_or_extract(data, patches, progress=progress)
    refs = split_table(table, split, source=str(patches) if patches else f"{data} patches")
    image_ids = list(dict.fromkeys(refs["image_id"]))
    code = {v: j for j, v in enumerate(image_ids)}
    image_index = refs["image_id"].map(code).to_numpy(dtype=np.int64)
    order = np.argsort(image_index, kind="stable")               # group patches by image
    return image_paths, refs.iloc[order].reset_index(drop=True), image_ids, image_index[order]


def _patch_loader(data: Path, refs, size: int, batch_size: int):
    """Batches of the reference patches resized to ``size``, in order, one image decoded at a time."""
    from deepminer.data.patches import PatchDataset

    ds = PatchDataset(data, refs, size=size, augment=False)
    return torch.utils.data.DataLoader(_OneImageAtATime(ds), batch_size=batch_size, shuffle=False, num_workers=0)


def _stream(net, loader, state: ProfileState, progress: bool) -> None:
    """:func:`profile_batch` on every batch of ``loader`` (tqdm bar)."""
    from tqdm import tqdm

    for x, _ in tqdm(loader, desc="dissect", unit="batch", disable=not progress):
        profile_batch(net, x, state)


def _atlas_arrays(res: ProfileResult, iou: np.ndarray, pca: np.ndarray, refs, topk: int) -> dict[str, np.ndarray]:
    """The arrays of ``atlas.npz`` (the first ``topk`` heap entries are the galleries)."""
    kk = min(topk, res.scores.shape[1])
    top = res.index[:, :kk].numpy()
    boxes = refs[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.int32)
    return {
        "thresholds": res.thresholds.astype(np.float32),
        "max": res.scores[:, 0].numpy().astype(np.float32),
        "embedding": res.embedding,
        "pca": pca,
        "topk_index": top.astype(np.int32),
        "topk_box": boxes[top],
        "topk_activation": res.scores[:, :kk].numpy().astype(np.float32),
        "topk_maps": res.maps[:, :kk].numpy().astype(np.float16),
        "frequency": res.counts.astype(np.int64),
        "influence_sum": res.sums.astype(np.float64),
        "iou": iou,
        "iou_complete": res.complete.astype(bool),
    }


def _unit_entries(arrays: dict[str, np.ndarray], concepts: list[str]) -> list[dict[str, Any]]:
    """``atlas.json`` ``units``: threshold, max and best concept (with its IoU) of every unit."""
    iou, complete = arrays["iou"], arrays["iou_complete"]
    best = iou.argmax(axis=1) if concepts else np.zeros(len(arrays["thresholds"]), dtype=np.int64)
    units = []
    for u in range(len(arrays["thresholds"])):
        entry: dict[str, Any] = {"unit": u, "threshold": float(arrays["thresholds"][u]),
                                 "max": float(arrays["max"][u]), "concept": None, "iou": 0.0}
        if "mask_fraction" in arrays:
            entry.update(mask_fraction=round(float(arrays["mask_fraction"][u]), 6),
                         roi_fraction=round(float(arrays["roi_fraction"][u]), 6))
        if concepts:
            entry.update(concept=concepts[best[u]], iou=round(float(iou[u, best[u]]), 6),
                         iou_complete=bool(complete[u]))
        units.append(entry)
    return units


def _per_class(classes: list[str], top_units: np.ndarray, counts: np.ndarray, cover: np.ndarray,
               n_pred: np.ndarray) -> dict[str, dict[str, Any]]:
    """``atlas.json`` ``per_class``: predicted patches, top units, their frequency, coverage."""
    out = {}
    for c, name in enumerate(classes):
        top = top_units[c].tolist()
        out[name] = {"predicted_patches": int(n_pred[c]), "top_units": top,
                     "frequency": [int(counts[c, u]) for u in top],
                     "coverage": None if np.isnan(cover[c]) else round(float(cover[c]), 6)}
    return out


def _atlas_meta(model_info: dict, classes: list[str], source: dict, quantile: float, state: ProfileState,
                res: ProfileResult, arrays: dict[str, np.ndarray], top_units: np.ndarray, cover: np.ndarray,
                n_pred: np.ndarray, iou_size: int, labels: list[str], image_ids: list[str], timing: dict) -> dict:
    """The content of ``atlas.json``."""
    return {
        "format": FORMAT,
        "deepminer_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_info,
        "classes": classes,
        "data": source,
        "quantile": quantile,
        "threshold_method": res.threshold_method,
        "influence": {"top": state.slots, "top_units": int(top_units.shape[1]),
                      "counted_for": "the class each patch is predicted as"},
        "iou": {"grid": iou_size, "min_label_iou": MIN_LABEL_IOU, "heap_patches": res.heap_patches,
                "heap_dtype": res.heap_dtype, "complete_units": int(res.complete.sum())},
        "mask_size": _mask_size_summary(arrays),
        "counts": {"references": state.items, "images": len(image_ids), "units": state.units,
                   "map_size": list(res.map_hw), "topk": int(arrays["topk_index"].shape[1]),
                   "labels": {n: labels.count(n) for n in classes},
                   "predicted": {n: int(n_pred[c]) for c, n in enumerate(classes)}},
        "per_class": _per_class(classes, top_units, res.counts, cover, n_pred),
        "units": _unit_entries(arrays, source["concepts"]),
        "images": image_ids,
        "timing": timing,
    }


def _mask_size_summary(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``atlas.json`` ``mask_size``: what the two size arrays mean and their mean and median over units."""
    out: dict[str, Any] = {"unit": "fraction of a reference patch inside the unit's mask (grid iou.grid)",
                           "mask_fraction": "mean over all reference patches",
                           "roi_fraction": "mean over the unit's top-k gallery patches"}
    for key in ("mask_fraction", "roi_fraction"):
        v = np.asarray(arrays[key], dtype=np.float64)
        out[f"{key}_mean"] = round(float(v.mean()), 6) if v.size else None
        out[f"{key}_median"] = round(float(np.median(v)), 6) if v.size else None
    return out


def _references_out(refs, image_paths: dict[str, str], classes: list[str], preds: np.ndarray,
                    image_index: np.ndarray):
    """``references.csv``: the reference patches in atlas order with their image, prediction and
    embedding row."""
    out = refs[["image_id", "x0", "y0", "x1", "y1", "label"]].copy()
    out.insert(0, "index", np.arange(len(refs)))
    out.insert(2, "image", [image_paths[i] for i in refs["image_id"]])
    out["pred"] = [classes[p] for p in preds.tolist()]
    out["image_index"] = image_index
    return out
