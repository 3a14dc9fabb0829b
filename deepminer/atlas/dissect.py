"""Unit dissection: profile every unit of a model's last convolutional layer over a reference set.

One pass over the DeepMiner patches of a split (:func:`deepminer.data.patches.load_or_extract`),
forward only, batch by batch (tqdm bar). Per batch, on the unit maps ``(B, K, h, w)`` and nothing
else (cheap tensor ops, no second forward):

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

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepminer import __version__
from deepminer.errors import InputError

FORMAT = "deepminer-atlas/1"
QUANTILE = 0.99
TOPK = 16
INFLUENCE_TOP = 8          # DeepMiner: the top 8 units of each patch
TOP_UNITS = 20             # DeepMiner: the 20 most frequently influential units per class
IOU_SIZE = 64              # concept grid of the IoU (per patch, s x s cells)
MIN_LABEL_IOU = 0.04       # Network Dissection: a unit is a detector of its best concept above this
DEFAULT_PATCH_SIZE = 224
MEMORY_MB = 1024


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, float32 CPU bytes), sorted by name."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    from deepminer.train import resolve_device

    if isinstance(device, torch.device):
        device = str(device)
    try:
        dev = resolve_device(device or "auto")
    except RuntimeError as err:
        raise InputError(f"--device {device}: {str(err).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here")
    return dev


def _patch_size(model, patch_size: int | None) -> int:
    if patch_size:
        return int(patch_size)
    meta = getattr(model, "meta", None) or {}
    for key in ("patch_size", "input_size", "size"):
        if isinstance(meta.get(key), int) and meta[key] > 0:
            return int(meta[key])
    return DEFAULT_PATCH_SIZE


def _load_model(model) -> tuple[Any, dict]:
    from deepminer.models import FCN, load_model

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
                num_units=int(net.num_units), weights_sha256=state_sha256(net))
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
    from deepminer.data.patches import read_mask

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
    for image_id, rows in tqdm(groups.items(), desc="concept masks", unit="img", disable=not progress,
                               leave=False):
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


def dissect(model, data: str | os.PathLike, split: str = "test", out: str | os.PathLike = "atlas", *,
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
    from deepminer.data.dataset import staged_output

    if not 0.0 < quantile < 1.0:
        raise InputError(f"quantile: must be in (0, 1), got {quantile}")
    if topk < 1 or batch_size < 1 or iou_size < 1 or memory_mb <= 0:
        raise InputError("topk, batch_size, iou_size and memory_mb must be positive")
    out = Path(out)
    check_writable(out)
    dev = _resolve_device(device)
    net, model_info = _load_model(model)
    meta, arrays, refs_out = _profile(net, model_info, Path(data), split, dev, quantile=quantile, topk=topk,
                                      batch_size=batch_size, patch_size=patch_size, patches=patches, iou_size=iou_size,
                                      memory_mb=memory_mb, progress=progress, seed=seed)
    try:
        with staged_output(out) as stage:
            np.savez_compressed(stage / "atlas.npz", **arrays)
            refs_out.to_csv(stage / "references.csv", index=False, lineterminator="\n")
            with open(stage / "atlas.json", "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=1)
                fh.write("\n")
    except OSError as err:
        raise InputError(f"{out}: cannot write ({err.strerror or type(err).__name__})") from None
    return Atlas.load(out)


def _profile(net, model_info: dict, data: Path, split: str, dev: torch.device, *, quantile: float, topk: int,
             batch_size: int, patch_size: int | None, patches, iou_size: int, memory_mb: float, progress: bool,
             seed: int):
    """The pass over the references and everything computed from it: ``(meta, arrays, references)``."""
    from tqdm import tqdm

    from deepminer.atlas.stats import (TailQuantile, TopItems, coverage, influence_counts, pca_2d, rank_units,
                                       sample_per_item, tail_length)
    from deepminer.data.dataset import concepts_in, read_manifest
    from deepminer.data.patches import PatchDataset, load_or_extract, split_table

    manifest = read_manifest(data)
    image_paths = {r["image_id"]: r["image"] for r in manifest}
    table = load_or_extract(data, patches, progress=progress)
    refs = split_table(table, split, source=str(patches) if patches else f"{data} patches")
    image_ids = list(dict.fromkeys(refs["image_id"]))
    code = {v: j for j, v in enumerate(image_ids)}
    image_index_np = refs["image_id"].map(code).to_numpy(dtype=np.int64)
    order = np.argsort(image_index_np, kind="stable")            # group patches by image
    refs, image_index_np = refs.iloc[order].reset_index(drop=True), image_index_np[order]
    image_index = torch.from_numpy(image_index_np)
    concepts = concepts_in(data)
    psize = _patch_size(net, patch_size)
    ds = PatchDataset(data, refs, size=psize, augment=False)
    n_items = len(ds)
    loader = torch.utils.data.DataLoader(_OneImageAtATime(ds), batch_size=batch_size, shuffle=False,
                                         num_workers=0)

    t0, c0 = time.perf_counter(), time.process_time()
    net = net.to(dev).eval()
    weights = net.unit_weights.detach().float()
    k_units, n_cls = int(net.num_units), len(net.classes)
    budget = int(memory_mb * (1 << 20))
    tq = heap = None
    counts = torch.zeros(n_cls, k_units, dtype=torch.long, device=dev)
    sums = torch.zeros(n_cls, k_units, dtype=torch.float64, device=dev)
    emb = torch.full((len(image_ids), k_units), -float("inf"), device=dev)
    preds = torch.empty(n_items, dtype=torch.long)
    slots = min(INFLUENCE_TOP, k_units)
    map_hw: tuple[int, ...] = (0, 0)
    start = 0
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc="dissect", unit="batch", disable=not progress):
            x = x.to(dev, non_blocking=True)
            b = x.shape[0]
            feats = net.forward_features(x)                            # (B, K, h, w)
            pred = net.pool(net.class_maps(feats)).argmax(dim=1)
            if tq is None:
                map_hw = tuple(feats.shape[2:])
                pos = map_hw[0] * map_hw[1]
                per_item = sample_per_item(pos, n_items, k_units, quantile, budget // 4)
                tq = TailQuantile(k_units, quantile, n_items, pos, per_item=per_item, seed=seed, device=dev)
                need = min(n_items, tail_length(n_items * pos, quantile))
                # float32 maps when the heaps fit the budget (x2 while merging), else float16, else fewer
                dtype = torch.float32 if 2 * 4 * k_units * pos * need <= budget * 3 // 4 else torch.float16
                cap_mem = (budget * 3 // 4) // (2 * dtype.itemsize * k_units * pos)
                heap = TopItems(k_units, min(n_items, max(topk, min(need, cap_mem))), map_hw,
                                device=dev, dtype=dtype)
            idx = torch.arange(start, start + b)
            item_max = feats.amax(dim=(2, 3))                           # (B, K)
            tq.update(feats.transpose(0, 1).reshape(k_units, b, -1))
            heap.update(item_max, idx.to(dev), feats)
            c, s = influence_counts(item_max, weights, pred, top=slots)
            counts += c
            sums += s
            emb.scatter_reduce_(0, image_index[idx].to(dev)[:, None].expand(-1, k_units), item_max.float(),
                                reduce="amax")
            preds[start:start + b] = pred.cpu()
            start += b
    pass_s, pass_cpu = time.perf_counter() - t0, time.process_time() - c0
    thresholds = tq.result().float().numpy()
    scores, index, maps = (t.cpu() for t in heap.result())
    complete = (heap.capacity >= n_items) | (scores[:, -1].numpy() <= thresholds)
    iou = np.zeros((k_units, len(concepts)), dtype=np.float32)
    if concepts:
        iou = _dissect_iou(data, refs, concepts, thresholds, scores, index, maps, iou_size,
                           progress)[0].astype(np.float32)
    counts_np, sums_np = counts.cpu().numpy(), sums.cpu().numpy()
    n_pred = np.bincount(preds.numpy(), minlength=n_cls)
    top_units = rank_units(counts_np, sums_np)[:, :min(TOP_UNITS, k_units)]
    cover = coverage(counts_np, top_units, n_pred, slots)
    embedding = emb.cpu().numpy().astype(np.float16)   # as stored; the PCA is of exactly these values
    pca = pca_2d(embedding.T.astype(np.float64)).astype(np.float32)
    total_s = time.perf_counter() - t0

    kk = min(topk, scores.shape[1])
    boxes = refs[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.int32)
    arrays = {
        "thresholds": thresholds.astype(np.float32),
        "max": scores[:, 0].numpy().astype(np.float32),
        "embedding": embedding,
        "pca": pca,
        "topk_index": index[:, :kk].numpy().astype(np.int32),
        "topk_box": boxes[index[:, :kk].numpy()],
        "topk_activation": scores[:, :kk].numpy().astype(np.float32),
        "topk_maps": maps[:, :kk].numpy().astype(np.float16),
        "frequency": counts_np.astype(np.int64),
        "influence_sum": sums_np.astype(np.float64),
        "iou": iou,
        "iou_complete": complete.astype(bool),
    }
    units = []
    best = iou.argmax(axis=1) if concepts else np.zeros(k_units, dtype=np.int64)
    for u in range(k_units):
        entry: dict[str, Any] = {"unit": u, "threshold": float(thresholds[u]), "max": float(arrays["max"][u]),
                                 "concept": None, "iou": 0.0}
        if concepts:
            entry.update(concept=concepts[best[u]], iou=round(float(iou[u, best[u]]), 6),
                         iou_complete=bool(complete[u]))
        units.append(entry)
    per_class = {}
    for c, name in enumerate(net.classes):
        top = top_units[c].tolist()
        per_class[name] = {"predicted_patches": int(n_pred[c]), "top_units": top,
                           "frequency": [int(counts_np[c, u]) for u in top],
                           "coverage": None if np.isnan(cover[c]) else round(float(cover[c]), 6)}
    labels = refs["label"].tolist()
    meta = {
        "format": FORMAT,
        "deepminer_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_info,
        "classes": list(net.classes),
        "data": {"folder": str(data.resolve()), "split": split, "patch_size": psize,
                 "patches": str(Path(patches).resolve()) if patches else None, "concepts": concepts},
        "quantile": quantile,
        "threshold_method": "exact" if tq.exact else
        f"sampled: {tq.per_item} of {tq.positions} positions per patch",
        "influence": {"top": slots, "top_units": int(top_units.shape[1]),
                      "counted_for": "the class each patch is predicted as"},
        "iou": {"grid": iou_size, "min_label_iou": MIN_LABEL_IOU, "heap_patches": int(heap.capacity),
                "heap_dtype": str(heap.dtype).replace("torch.", ""),
                "complete_units": int(complete.sum())},
        "counts": {"references": n_items, "images": len(image_ids), "units": k_units,
                   "map_size": list(map_hw), "topk": kk,
                   "labels": {n: labels.count(n) for n in net.classes},
                   "predicted": {n: int(n_pred[c]) for c, n in enumerate(net.classes)}},
        "per_class": per_class,
        "units": units,
        "images": image_ids,
        "timing": {"pass_s": round(pass_s, 3), "total_s": round(total_s, 3), "pass_cpu_s": round(pass_cpu, 3),
                   "patches_per_s": round(n_items / max(pass_s, 1e-9), 2), "device": str(dev),
                   "batch_size": batch_size},
    }
    refs_out = refs[["image_id", "x0", "y0", "x1", "y1", "label"]].copy()
    refs_out.insert(0, "index", np.arange(n_items))
    refs_out.insert(2, "image", [image_paths[i] for i in refs["image_id"]])
    refs_out["pred"] = [net.classes[p] for p in preds.tolist()]
    refs_out["image_index"] = image_index_np
    return meta, arrays, refs_out
