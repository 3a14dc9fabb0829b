"""The whole-image training stage (``deepminer train-whole``, issue 21).

A patch model (``deepminer train``) sees 25 %-wide patches; a served model sees a whole mammogram. The
step from patches to an image is where the patch models failed (a GAP demo that never said "normal",
a WILDCAT model that always did). As the field's anchors do (Shen et al. 2019 "end2end-all-conv",
GMIC, WILDCAT on whole chest X-rays), this stage starts from a patch model and trains its top layers
and head **on whole images at the scale they are served, with image-level labels only** (lesion masks
stay for evaluation):

* every image is brought to the model's scale: long side ``long_side`` for a phantom of the data's
  size, i.e. ``mm_per_px = spacing * size / long_side`` (:mod:`deepminer.model_scale`), the tissue
  mask applied as the server applies it (:func:`deepminer.data.tissue.tissue_region`);
* the backbone before ``train_from`` stays frozen (ImageNet weights); its outputs for each image and
  its flips are computed once and kept in memory (float16; ``trunk_cache`` keeps them in a file for the
  next run on the same data): an epoch only runs the top of the network;
* the head pools the class maps over the **breast cells** only (:func:`deepminer.models.fcn.breast_cells`):
  GAP = their mean (DeepMiner's CAM stays exact), WILDCAT = top-k + alpha x bottom-k with k a share of
  the breast cells; the loss is the 3-class cross-entropy of the pooled logits (class-balanced), so
  "normal" is a class the image-level answer can reach;
* BatchNorm layers keep their statistics (whole-image batches are small and mostly normal tissue);
* the model with the lowest validation loss is kept; then a temperature and a benign/malignant
  mixing rate are fitted on the validation logits (:func:`fit_image_calibration`) so the image-level
  probabilities are calibrated (``deepminer calibrate`` refits them on other images).

The checkpoint records ``meta["scale"]`` and ``meta["image_level"]`` (pool, temperature, mix), which the
engine's image rule (:func:`deepminer.explain.engine.image_probabilities`) and the server's scale
(:func:`deepminer.model_scale.input_side`) read.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepminer import CLASSES
from deepminer.errors import InputError

BEST, METRICS_FILE = "best.pt", "metrics.json"


@dataclass
class WholeImageConfig:
    """Everything a whole-image run depends on (saved in ``metrics.json`` and the checkpoint's meta)."""

    model: str                    #: the patch model it starts from (our checkpoint format)
    data: str                     #: a dataset folder with train and val splits (manifest.csv)
    out: str                      #: the run folder
    head: str | None = None       #: gap / wildcat; None: the start model's head
    wildcat_maps: int = 4
    wildcat_k: float = 0.05       #: share of the breast cells pooled at each end (or a count >= 1)
    wildcat_alpha: float = 0.7
    wildcat_surround: float = 0.0  #: beta of the local surround (class map = mean map - beta x ring mean; 0: none)
    long_side: int = 512          #: model-input long side of an image of the data's size
    train_from: str = "net.blocks.5"
    epochs: int = 15
    lr: float = 3e-3
    momentum: float = 0.9
    optimizer: str = "sgd"        #: sgd (momentum, weight decay) or adam (weight decay as L2; what --head-l1 needs to sparsify)
    weight_decay: float = 1e-4
    head_l1: float = 0.0          #: lambda of an L1 penalty on the head's unit weights (sparse evidence; 0: none)
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    flips: int = 2                #: flip variants of each training image: 1 none, 2 + left-right, 4 + up-down
    patience: int | None = 4
    trunk_cache: str | None = None  #: a file keeping the frozen trunk's outputs between runs (same data, trunk, scale)
    cache_at: str | None = None   #: where the cached trunk ends (default: ``train_from``; with ``head``, the whole
                                  #: backbone); a frozen stretch after it is run every epoch, without gradients
    limit: int | None = None      #: at most this many images per split (quick runs, tests)
    half: bool = False
    unit_activation: str | None = None   #: the unit layer's activation (relu lifts EfficientNet's ReLU6 cap)
    output_stride: int | None = None        #: the output stride it is trained (and served) at; None: the start model's
    serve_output_stride: int | None = None  #: the output stride the saved model is served at (trained at its own)
    command: str = ""

    def check(self) -> None:
        for name in ("epochs", "batch_size", "wildcat_maps"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.flips not in (1, 2, 4):
            raise InputError("--flips: 1 (none), 2 (left-right) or 4 (left-right and up-down)")
        if not 64 <= self.long_side <= 4096:
            raise InputError("--long-side: must be in 64..4096")
        if self.lr <= 0:
            raise InputError("--lr: must be positive")
        if self.head not in (None, "gap", "wildcat"):
            raise InputError(f"--head: unknown head {self.head!r}; known: gap, wildcat")
        if self.wildcat_k <= 0 or self.wildcat_alpha < 0:
            raise InputError("--wildcat-k must be positive and --wildcat-alpha 0 or more")
        if not math.isfinite(self.wildcat_surround) or self.wildcat_surround < 0:
            raise InputError("--wildcat-surround: must be 0 or more")
        if not math.isfinite(self.head_l1) or self.head_l1 < 0:
            raise InputError("--head-l1: must be 0 or more")
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"--optimizer: {self.optimizer!r} is not sgd or adam")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device: {self.device!r} is not auto, cpu or cuda")
        if not Path(self.data).is_dir():
            raise InputError(f"{self.data}: no such dataset folder")
        if not Path(self.model).is_file():
            raise InputError(f"{self.model}: no such checkpoint (--model)")


# -- data ----------------------------------------------------------------------------------------

def prepared_image(path: str | Path, long_side: int):
    """``(x (1, 1, h, w) float32 tensor at the model's scale, tissue-masked; the tissue mask at that
    scale)`` for one image file, as the server prepares it."""
    import torch
    import torch.nn.functional as F

    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_region
    from deepminer.explain.method_base import as_image

    loaded = load_image(str(path))
    pixels, _, region = tissue_region(loaded.pixels)
    t = as_image(pixels)
    h, w = t.shape
    f = long_side / max(h, w)
    x = t[None, None]
    if abs(f - 1.0) > 1e-9:
        size = (max(1, round(h * f)), max(1, round(w * f)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.float().contiguous(), torch.as_tensor(region)


def _rows(folder: str, split: str, limit: int | None, seed: int) -> list[dict]:
    from deepminer.data.dataset import read_manifest

    rows = [r for r in read_manifest(folder) if r.get("split") == split]
    if limit is not None and len(rows) > limit:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(rows), size=limit, replace=False).tolist())
        rows = [rows[i] for i in keep]
    return rows


class TrunkCache:
    """The frozen trunk's outputs (float16) for every image of a split and its flip variants, with
    the breast cells of the final map; grouped by input size so batches stack."""

    def __init__(self, trunk, rest, model, folder: str, rows: list[dict], long_side: int, *, flips: int,
                 device, progress: bool, desc: str):
        import torch
        from tqdm import tqdm

        from deepminer.models.fcn import breast_cells

        self.labels = np.array([CLASSES.index(r["label"]) for r in rows], dtype=np.int64)
        self.ids = [r["image_id"] for r in rows]
        variants = [(), (-1,), (-2,), (-1, -2)][:max(1, int(flips))]
        self.feats: list[torch.Tensor] = []   # per image (V, K', h', w') float16
        self.cells: list[torch.Tensor] = []   # per image (V, h, w) bool at the unit-map grid
        with torch.no_grad():
            for r in tqdm(rows, desc=desc, unit="img", disable=not progress, leave=False, file=sys.stderr):
                x, _ = prepared_image(Path(folder) / r["image"], long_side)
                x = x.to(device)
                xs = torch.cat([x.flip(v) if v else x for v in variants])
                t = trunk(model.normalize(xs))
                hw = tuple(rest(t[:1]).shape[-2:])
                self.feats.append(t.half().cpu())
                self.cells.append(breast_cells(xs, hw).cpu())

    @classmethod
    def cached(cls, path: str | None, key: dict, *args, **kwargs) -> "TrunkCache":
        """The cache of ``path`` when it was written for the same ``key`` (data, images, scale, trunk
        weights, flips), else computed (and written to ``path`` when given)."""
        import torch

        from deepminer.trunk import atomic_torch_save

        if path and Path(path).is_file():
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
                if obj.get("key") == key:
                    self = cls.__new__(cls)
                    self.labels = np.asarray(obj["labels"], dtype=np.int64)
                    self.ids, self.feats, self.cells = list(obj["ids"]), list(obj["feats"]), list(obj["cells"])
                    return self
            except Exception:  # noqa: BLE001 - a stale or broken cache is recomputed, never trusted
                pass
        self = cls(*args, **kwargs)
        if path:
            atomic_torch_save({"key": key, "labels": self.labels.tolist(), "ids": self.ids, "feats": self.feats,
                               "cells": self.cells}, Path(path))
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: list[int], batch_size: int, rng: np.random.Generator | None):
        """Batches of ``(feats, cells, labels)`` of images of one shape; a random flip each when
        ``rng`` is given, the unflipped image otherwise."""
        import torch

        groups: dict[tuple, list[int]] = {}
        for i in order:
            groups.setdefault(tuple(self.feats[i].shape[-2:]), []).append(i)
        chunks = []
        for idx in groups.values():
            chunks += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
        if rng is not None:
            rng.shuffle(chunks)
        for chunk in chunks:
            vs = [int(rng.integers(self.feats[i].shape[0])) if rng is not None else 0 for i in chunk]
            f = torch.stack([self.feats[i][v] for i, v in zip(chunk, vs)]).float()
            c = torch.stack([self.cells[i][v] for i, v in zip(chunk, vs)])
            yield f, c, torch.as_tensor(self.labels[chunk])


# -- the model -----------------------------------------------------------------------------------

def _start_model(cfg: WholeImageConfig):
    """``(model, converted)``: the start model, with a fresh WILDCAT head if asked for one (unit weights
    copied into every map; ``converted`` True then)."""
    import torch

    from deepminer.models import load_model
    from deepminer.models.fcn import GAPHead
    from deepminer.models.wildcat import WildcatHead

    model = load_model(cfg.model)
    head = cfg.head or model.head_type
    converted = False
    if head == "wildcat" and model.head_type == "wildcat" and model.head.num_maps == cfg.wildcat_maps:
        model.head.k, model.head.alpha = cfg.wildcat_k, float(cfg.wildcat_alpha)  # the patch head, pooled anew
        model.head.surround = float(cfg.wildcat_surround)
    elif head == "wildcat":
        converted = True
        old = model.head
        new = WildcatHead(model.num_units, len(model.classes), maps=cfg.wildcat_maps, k=cfg.wildcat_k,
                          alpha=cfg.wildcat_alpha, surround=cfg.wildcat_surround)
        with torch.no_grad():
            w = old.unit_weights.detach()  # (C, K): every map of a class starts at the class's weights
            new.conv.weight.copy_(w.repeat_interleave(cfg.wildcat_maps, 0)[:, :, None, None])
            if isinstance(old, GAPHead):
                b = old.fc.bias
            else:
                b = old.conv.bias
                b = None if b is None else b.view(len(model.classes), -1).mean(1)
            bias = new.conv.bias
            if b is not None and bias is not None:
                bias.copy_(b.detach().repeat_interleave(cfg.wildcat_maps))
        model.head = new
        model.head_type = "wildcat"
    elif head != model.head_type:
        raise InputError(f"--head gap: {cfg.model} has a {model.head_type} head; a GAP model starts from a GAP model")
    return model, converted


def _rescale_head(model, rest, cache: "TrunkCache", batch_size: int, device) -> float:
    """Bring a converted WILDCAT head to the scale of its training logits; return the factor.

    Every map starts at its class's GAP weights, but top-k pooling of a map is many times its mean,
    so the first logits are far too large (the softmax saturates; only the misclassified images give
    a gradient). WILDCAT pooling is positively homogeneous (``pool(s * map) = s * pool(map)`` for
    ``s > 0``), so multiplying the 1x1 weights and biases by ``1 / T``, with ``T`` the temperature
    that fits the TRAINING logits, gives the same argmax, maps of the same shape, and logits at the
    scale the loss expects (only ever shrunk: a training set the start model already separates would
    ask for ever larger logits). The validation split is not used."""
    import torch

    from deepminer.metrics import fit_temperature

    logits, labels = _evaluate(model, rest, cache, batch_size, device)
    factor = min(1.0, 1.0 / float(fit_temperature(logits, labels, bounds=(0.05, 1000.0))))
    with torch.no_grad():
        model.head.conv.weight.mul_(factor)
        if model.head.conv.bias is not None:
            model.head.conv.bias.mul_(factor)
    return factor


def _weights_key(module) -> str:
    """sha256 of a module's state (the frozen trunk a cache was computed with)."""
    from deepminer.models.checkpoints import weights_sha256

    return weights_sha256(module)


def _freeze_bn(model) -> None:
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _logits(model, rest, feats, cells):
    return model.pool(model.class_logits(rest(feats)), cells)


def _evaluate(model, rest, cache: TrunkCache, batch_size: int, device):
    """``(pooled logits (N, C) numpy, labels)`` of every image of ``cache`` (unflipped)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        order = list(range(len(cache)))
        # batches() groups by shape: keep track of the order it yields
        seen: list[int] = []
        groups: dict[tuple, list[int]] = {}
        for i in order:
            groups.setdefault(tuple(cache.feats[i].shape[-2:]), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                f = torch.stack([cache.feats[i][0] for i in chunk]).float().to(device)
                c = torch.stack([cache.cells[i][0] for i in chunk]).to(device)
                out.append(_logits(model, rest, f, c).float().cpu())
                seen += chunk
    logits = torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)), np.float32)
    back = np.empty_like(logits)
    back[np.array(seen, dtype=np.int64)] = logits
    return back, cache.labels


def _full_logits(model, folder: str, rows: list[dict], long_side: int, device, progress: bool) -> np.ndarray:
    """Pooled logits (N, C) of the whole model on each image of ``rows`` (unflipped), as served."""
    import torch
    from tqdm import tqdm

    from deepminer.models.fcn import breast_cells

    model.eval()
    out = []
    with torch.no_grad():
        for r in tqdm(rows, desc="validation at the served stride", unit="img", disable=not progress, leave=False,
                      file=sys.stderr):
            x, _ = prepared_image(Path(folder) / r["image"], long_side)
            maps = model.class_logits(model.forward_features(x.to(device)))
            out.append(model.pool(maps, breast_cells(x.to(device), tuple(maps.shape[-2:]))).float().cpu())
    return torch.cat(out).numpy()


def _nll(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    per = -logp[np.arange(len(labels)), labels]
    if weights is None:
        return float(per.mean())
    w = weights[labels]
    return float((per * w).sum() / w.sum())


def _summary(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, mix: float = 0.0) -> dict:
    from sklearn.metrics import roc_auc_score

    from deepminer.metrics import calibrated_probabilities

    p = calibrated_probabilities(logits, temperature, mix, _mix_pair(CLASSES))
    out: dict[str, Any] = {"images": int(len(labels)), "accuracy": float((p.argmax(1) == labels).mean()),
                           "predicted": {c: int((p.argmax(1) == i).sum()) for i, c in enumerate(CLASSES)}}
    for i, c in enumerate(CLASSES):
        y = labels == i
        out[f"auc_{c}"] = float(roc_auc_score(y, p[:, i])) if 0 < y.sum() < len(y) else None
    y = labels != 0
    out["auc_abnormal"] = float(roc_auc_score(y, 1 - p[:, 0])) if 0 < y.sum() < len(y) else None
    return out


def _mix_pair(classes) -> tuple[int, int] | None:
    """The indices of the calibration's mixed classes (:data:`deepminer.metrics.MIX_CLASSES`) in
    ``classes``, or None when the model lacks one of them."""
    from deepminer.metrics import MIX_CLASSES

    names = list(classes)
    a, b = MIX_CLASSES
    return (names.index(a), names.index(b)) if a in names and b in names else None


def fit_image_calibration(logits: np.ndarray, labels: np.ndarray, classes=CLASSES, *,
                          temperature_only: bool = False) -> tuple[dict, dict]:
    """Calibrate a whole-image model on validation logits ``(N, C)`` (pooled, as served) and their
    labels: :func:`deepminer.metrics.fit_calibration` (a temperature and the benign/malignant mix;
    ``temperature_only``: the temperature alone), and the temperature alone for comparison.

    Returns ``(fields for meta["image_level"]: {"temperature", "mix"}, report)``; the report holds
    the validation NLL and ECE before calibration, with the temperature alone and calibrated, and
    both fits, so a card can show what each step buys."""
    from deepminer.metrics import (TEMPERATURE_BOUNDS, calibrated_probabilities, expected_calibration_error,
                                   fit_calibration, fit_temperature)

    names = list(classes)
    pair = None if temperature_only else _mix_pair(names)
    t_alone = float(fit_temperature(logits, labels))
    fit = fit_calibration(logits, labels, pair=pair)
    fields = {"temperature": fit["temperature"],
              "mix": ({"classes": [names[pair[0]], names[pair[1]]], "rate": fit["mix"]} if pair is not None
                      else None)}

    def at(t: float, m: float) -> dict:
        p = calibrated_probabilities(logits, t, m, pair)
        y = np.asarray(labels, dtype=int)
        return {"temperature": t, "mix": m,
                "nll": float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], 1e-300, None)))),
                "ece": expected_calibration_error(y, p)}

    lo, hi = TEMPERATURE_BOUNDS
    report = {"images": int(len(labels)), "before": at(1.0, 0.0), "temperature_alone": at(t_alone, 0.0),
              # a fit at a bound: images the model separates perfectly ask for T -> 0 (too few or too easy)
              "at_bound": bool(min(abs(fit["temperature"] / lo - 1), abs(fit["temperature"] / hi - 1)) < 1e-3),
              "calibrated": at(fit["temperature"], fit["mix"]),
              "rule": ("softmax(pooled / T)" if pair is None else
                       f"softmax(pooled / T), then {names[pair[0]]} and {names[pair[1]]} mixed at rate m"),
              "fitted": f"minimum negative log-likelihood on the {len(labels)} validation images"}
    return fields, report


def train_whole(cfg: WholeImageConfig, *, progress: bool = True) -> dict:
    """Run the stage; write ``best.pt`` and ``metrics.json`` in ``cfg.out``; return the metrics."""
    import torch

    from deepminer.model_scale import breast_extent
    from deepminer.models import save_model
    from deepminer.runtime import resolve_device
    from deepminer.data.dataset import describe_dataset, pixel_spacing
    from deepminer.defaults import PROBE
    from deepminer.models.unit_layer import apply_unit_layer, unit_layer
    from deepminer.models.unit_layer import check as check_unit_layer
    from deepminer.trunk import freeze_before, split_features

    cfg.check()
    out = Path(cfg.out)
    if (out / BEST).exists():
        raise InputError(f"{out}: already holds a run ({BEST}); choose another --out")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, converted = _start_model(cfg)
    model = model.to(device)
    check_unit_layer(model.arch, None, cfg.serve_output_stride)  # the served stride, before an hour of training
    apply_unit_layer(model, activation=cfg.unit_activation, output_stride=cfg.output_stride)
    frozen = freeze_before(model, cfg.train_from)
    cache_at = cfg.cache_at or (None if cfg.train_from == PROBE else cfg.train_from)
    if cache_at is None:  # a linear probe: the whole backbone is the frozen trunk
        trunk, rest = model.features.eval(), torch.nn.Identity()
    else:
        trunk, rest = split_features(model, cache_at)
        if any(p.requires_grad for p in trunk.parameters()):
            raise InputError(f"--cache-at {cache_at}: layers before it are trained (--train-from {cfg.train_from}); "
                             "only a frozen trunk can be cached")
    rows_tr = _rows(cfg.data, "train", cfg.limit, cfg.seed)
    rows_va = _rows(cfg.data, "val", cfg.limit, cfg.seed + 1)
    if not rows_tr or not rows_va:
        raise InputError(f"{cfg.data}: needs images in both the train and the val split")
    t0 = time.time()
    key = {"data": str(Path(cfg.data).resolve()), "long_side": cfg.long_side, "cache_at": cache_at,
           "trunk": _weights_key(trunk), "flips": cfg.flips}
    record = dict(model.meta.get("unit_layer") or {})
    if cache_at is not None:
        record.pop("activation", None)  # the unit layer's activation lies after a partial trunk
    if record:
        key["unit_layer"] = record
    paths = [None, None] if not cfg.trunk_cache else [cfg.trunk_cache + ".train", cfg.trunk_cache + ".val"]
    train_c = TrunkCache.cached(paths[0], {**key, "ids": [r["image_id"] for r in rows_tr]},
                                trunk, rest, model, cfg.data, rows_tr, cfg.long_side, flips=cfg.flips, device=device,
                                progress=progress, desc="caching trunk outputs (train)")
    val_c = TrunkCache.cached(paths[1], {**key, "flips": 1, "ids": [r["image_id"] for r in rows_va]},
                              trunk, rest, model, cfg.data, rows_va, cfg.long_side, flips=1, device=device,
                              progress=progress, desc="caching trunk outputs (val)")
    prep_s = time.time() - t0
    # the scale: the data's long side brought to cfg.long_side
    from deepminer.data.io import load_image

    first = load_image(str(Path(cfg.data) / rows_tr[0]["image"]))
    native_long = max(first.pixels.shape)
    spacing = first.spacing_mm or pixel_spacing(cfg.data, rows_tr[0])
    extents = []
    for r in rows_tr[:200]:
        _, mask = prepared_image(Path(cfg.data) / r["image"], cfg.long_side)
        extents.append(breast_extent(mask.numpy()))
    scale = {"long_side": int(cfg.long_side),
             "mm_per_px": (float(spacing) * native_long / cfg.long_side) if spacing else None,
             "breast_extent_px": float(np.median(extents))}

    counts = np.bincount(train_c.labels, minlength=len(CLASSES)).astype(np.float64)
    class_w = counts.sum() / np.maximum(counts, 1) / len(CLASSES)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.as_tensor(class_w, dtype=torch.float32, device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adam" else
           torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    rng = np.random.default_rng(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    best_loss, best_state, best_epoch = math.inf, None, 0
    rescaled = _rescale_head(model, rest, train_c, cfg.batch_size, device) if converted else None
    logits0, labels_va = _evaluate(model, rest, val_c, cfg.batch_size, device)
    initial = {"val_loss": _nll(logits0, labels_va, class_w), **_summary(logits0, labels_va)}
    if rescaled is not None:
        initial["head_rescaled_by"] = rescaled
    t_train = time.time()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        _freeze_bn(model)
        total, n = 0.0, 0
        order = rng.permutation(len(train_c)).tolist()
        for f, c, y in train_c.batches(order, cfg.batch_size, rng):
            f, c, y = f.to(device), c.to(device), y.to(device)
            loss = loss_fn(_logits(model, rest, f, c), y)
            opt.zero_grad(set_to_none=True)
            (loss + cfg.head_l1 * model.unit_weights.abs().sum() if cfg.head_l1 else loss).backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        sched.step()
        logits, _ = _evaluate(model, rest, val_c, cfg.batch_size, device)
        val_loss = _nll(logits, labels_va, class_w)
        entry = {"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
                 "seconds": round(time.time() - t_train, 1), **_summary(logits, labels_va)}
        history.append(entry)
        if progress:
            print(f"epoch {epoch}: train {entry['train_loss']:.4f} val {val_loss:.4f} "
                  f"acc {entry['accuracy']:.3f} auc_mal {entry['auc_malignant']} auc_abn {entry['auc_abnormal']}",
                  file=sys.stderr)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif cfg.patience is not None and epoch - best_epoch >= cfg.patience:
            if progress:
                print(f"stopping after epoch {epoch}: no better validation loss for {cfg.patience} epochs",
                      file=sys.stderr)
            break
    train_s = time.time() - t_train
    assert best_state is not None
    model.load_state_dict(best_state)
    logits, _ = _evaluate(model, rest, val_c, cfg.batch_size, device)
    at_training_stride = None
    if cfg.serve_output_stride is not None and cfg.serve_output_stride != unit_layer(model).get("output_stride"):
        # served at another stride: the same weights on a finer map; the temperature is fitted on what is served
        at_training_stride = {"output_stride": unit_layer(model).get("output_stride"), **_summary(logits, labels_va)}
        apply_unit_layer(model, output_stride=cfg.serve_output_stride)
        logits = _full_logits(model, cfg.data, rows_va, cfg.long_side, device, progress)
    calibration, calib_report = fit_image_calibration(logits, labels_va, model.classes)
    temperature, mix = calibration["temperature"], (calibration["mix"] or {}).get("rate", 0.0)
    head_kw = dict(getattr(model.head, "head_kwargs", {}))
    image_level = {"pool": "breast cells: " + ("mean" if model.head_type == "gap" else
                                                f"wildcat top-k + {head_kw.get('alpha')} x bottom-k, k {head_kw.get('k')}"
                                                + (f", class maps minus {head_kw['surround']:g} x their ring mean "
                                                   "(cells 2 away)" if head_kw.get("surround") else "")),
                   **calibration, "trained": "whole images, image-level labels",
                   "breast_cell_share": 0.5}
    metrics: dict[str, Any] = {
        "config": asdict(cfg), "frozen_parameters": len(frozen), "scale": scale, "image_level": image_level,
        "data": {"train_images": len(rows_tr), "val_images": len(rows_va),
                 "train_labels": {c: int((train_c.labels == i).sum()) for i, c in enumerate(CLASSES)},
                 "spacing_mm": spacing},
        "initial": initial, "history": history, "best_epoch": best_epoch,
        "val": {"before_temperature": _summary(logits, labels_va),
                "after_temperature": _summary(logits, labels_va, temperature, mix),
                "nll_before": _nll(logits, labels_va), "nll_after": calib_report["calibrated"]["nll"],
                "calibration": calib_report, "at_training_stride": at_training_stride},
        "unit_layer": unit_layer(model),
        "head_weights": head_weight_spread(model),
        "seconds": {"cache": round(prep_s, 1), "train": round(train_s, 1)},
    }
    start_meta = dict(model.meta)
    # a whole-image model can be the start (e.g. a WILDCAT head trained on a GAP model's units): keep its record
    start_stage = "whole-image" if start_meta.get("whole_image") else "patch"
    metrics["start"] = {"model": cfg.model, "stage": start_stage, "head_converted": converted,
                        "head_rescaled_by": rescaled}
    meta = {**{k: v for k, v in start_meta.items() if k in ("data", "patch_size", "image_width", "seed")},
            "trained_on": describe_dataset(cfg.data),  # what the UI and the API say next to every answer
            "scale": scale, "image_level": image_level, "whole_image": {
                "start_model": cfg.model, "config": asdict(cfg), "best_epoch": best_epoch,
                "val": metrics["val"]["after_temperature"], "seconds": metrics["seconds"]},
            **({"unit_layer": model.meta["unit_layer"]} if model.meta.get("unit_layer") else {}),
            **({"start_whole_image": start_meta["whole_image"]} if start_stage == "whole-image" else {}),
            "patch_model": (start_meta.get("patch_model") if start_stage == "whole-image" else
                            {k: v for k, v in start_meta.items() if k in ("epoch", "val_loss", "recipe", "trained_on")})}
    save_model(model.cpu(), out / BEST, half=cfg.half, **meta)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1, default=str) + "\n", encoding="utf-8")
    return metrics


def head_weight_spread(model, share: float = 0.9) -> dict[str, Any]:
    """How concentrated a head's unit weights are, per class: the L1 norm of ``unit_weights[c]`` and how
    many units hold ``share`` of it (largest first), of how many (what ``--head-l1`` changes)."""
    import torch

    with torch.no_grad():
        w = model.unit_weights.detach().float().abs().cpu()
    out: dict[str, Any] = {"share": share, "units": int(w.shape[1]), "classes": {}}
    for c, row in zip(model.classes, w):
        total = float(row.sum())
        cum = torch.cumsum(torch.sort(row, descending=True).values, 0)
        n = int((cum < share * total).sum()) + 1 if total > 0 else 0
        out["classes"][c] = {"l1": round(total, 4), "units_holding_share": min(n, int(w.shape[1]))}
    return out


def command_line(argv: list[str]) -> str:
    return "deepminer train-whole " + " ".join(shlex.quote(a) for a in argv)


# -- calibrating a trained model anew --------------------------------------------------------------

def served_logits(model, folder: str, split: str, *, limit: int | None = None,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """``(pooled logits (N, C), labels (N,), predictions)`` of a whole-image model on every image of
    ``split``, made exactly as the server makes them (:func:`deepminer.image_eval.predict_images`: the
    model's own scale, breast pooling) with its calibration set aside (T = 1, no mix): the logits
    are ``log p`` (a softmax's log is the logits less a constant per image, which no calibration sees;
    p is clipped at 1e-45, the smallest float32, so a logit gap is read up to about 103)."""
    from deepminer.explain.engine import image_level
    from deepminer.image_eval import predict_images, probability_matrix

    level = image_level(model)
    if level is None:
        raise InputError("calibrate: not a whole-image model (no meta['image_level']); "
                         "train one with deepminer train-whole")
    saved = model.meta["image_level"]
    model.meta["image_level"] = {**saved, "temperature": 1.0, "mix": None}
    try:
        preds = predict_images(model, folder, split, limit=limit, progress=progress)
    finally:
        model.meta["image_level"] = saved
    y, probs = probability_matrix(preds, model.classes)
    return np.log(np.clip(probs, 1e-45, None)), y, preds


def calibrate_model(model_path: str, folder: str, out: str, *, split: str = "val", limit: int | None = None,
                    temperature_only: bool = False, half: bool | None = None, command: str = "",
                    progress: bool = True) -> dict:
    """Refit a whole-image model's calibration (:func:`fit_image_calibration`) on the labelled images
    of ``split`` of ``folder``, as served (:func:`served_logits`), and write the same weights with the
    new ``meta["image_level"]`` (``temperature``, ``mix``, and ``calibrated_on``: the data, the split,
    the images, the fit's report, the command) to ``out``. ``half``: store float16 (default: as the
    input checkpoint is stored). Returns the report. Use images the model was not trained on."""
    import torch

    from deepminer.data.dataset import describe_dataset
    from deepminer.models import load_model, save_model
    from deepminer.models.checkpoints import torch_load

    if Path(out).resolve() == Path(model_path).resolve():
        raise InputError(f"{out}: the output must be a new file, not the model it calibrates")
    model = load_model(model_path)
    logits, y, _ = served_logits(model, folder, split, limit=limit, progress=progress)
    if len(set(y.tolist())) < 2:
        raise InputError(f"{folder}: split {split!r} holds one class only; calibration needs several")
    fields, report = fit_image_calibration(logits, y, model.classes, temperature_only=temperature_only)
    report.update(fitted=f"minimum negative log-likelihood on the {len(y)} images of split {split!r} of {Path(folder).name}",
                  data=describe_dataset(folder), folder=str(Path(folder).resolve()), split=split,
                  previous={k: model.meta["image_level"].get(k) for k in ("temperature", "mix")},
                  command=command)
    meta = dict(model.meta)
    meta["image_level"] = {**meta["image_level"], **fields, "calibrated_on": report}
    if half is None:
        state = torch_load(model_path, "cpu")["state_dict"]
        half = any(v.dtype == torch.float16 for v in state.values())
    save_model(model, out, half=half, **meta)
    return report
