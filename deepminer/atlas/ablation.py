"""Is influence causal? DeepMiner ranks units by influence (max activation x the unit's weight for
the class); here each unit is silenced alone (its activations set to zero before the head) on every
reference patch of an atlas, and the drop in the class's probability and logit is measured. Per
class, the Spearman rank correlation between the influence ranking and the measured effect says how
far influence predicts what a unit does to the decision.

One forward per batch of reference patches; the K single-unit ablations come from the unit maps
through the head: both heads' class maps are linear in the units (``class_logits(f) = sum_k
unit_weights[:, k] * f_k + bias``, :mod:`deepminer.models.wildcat`; with a WILDCAT surround, of the
units' local contrasts), so silencing unit k subtracts ``unit_weights[:, k] * f_k`` (``* contrast(f_k)``)
from the class maps, which are then pooled by the head's own pooling
(GAP: mean; WILDCAT: top-k + alpha x bottom-k), exactly as a forward with that channel zeroed
(tests/test_ablation.py checks it against a hooked full forward).

Per reference patch b, unit k and class c:

* ``influence[b, c, k] = max activation of k on b x unit_weights[c, k]`` (DeepMiner);
* ``prob_drop[b, c, k] = p_c(b) - p_c(b with k silenced)``, ``logit_drop`` likewise for the pooled logit.

Per class, the means are taken over the patches **predicted as that class** (DeepMiner's influence
counts are made for the predicted class, :func:`deepminer.atlas.stats.influence_counts`); the
correlations are over the K units. ``frequency`` is the atlas's own ranking (how often a unit is
among a patch's 8 most influential, :func:`deepminer.atlas.stats.rank_by_frequency`).

Written as ``ATLAS/ablation.json`` (:func:`atlas_ablation`, the ``deepminer atlas-ablation`` command).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.atomic import atomic_file
from deepminer.errors import InputError
from deepminer.model_folder import ABLATION

FORMAT = "deepminer-atlas-ablation/1"
FILE = ABLATION  #: ``ATLAS/ablation.json``
TOP = 20  #: the top-k overlap reported (the atlas's top 20 units per class)


def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given their average rank (``scipy.stats.rankdata``'s default)."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    first = np.r_[True, s[1:] != s[:-1]]  # start of each run of equal values
    run = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # average of 1-based ranks start+1..end
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = avg[run]
    return ranks


def spearman(x: Any, y: Any) -> float | None:
    """Spearman's rank correlation (Pearson of the average ranks); None when either side is
    constant (undefined)."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.shape != ry.shape:
        raise ValueError(f"spearman: {rx.shape[0]} vs {ry.shape[0]} values")
    dx, dy = rx - rx.mean(), ry - ry.mean()
    den = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return None if den == 0.0 else float((dx * dy).sum() / den)


def single_unit_effects(model: Any, feats: Any, units_chunk: int = 256) -> tuple[Any, Any, Any, Any]:
    """For unit maps ``feats (B, K, h, w)``: ``(influence, prob_drop, logit_drop, pred)``, the first
    three ``(B, C, K)`` float64 tensors (see the module docstring), ``pred (B,)`` the predicted class.
    Silencing unit k = subtracting ``unit_weights[:, k] * f_k`` from the class maps (a WILDCAT head with a
    surround: ``unit_weights[:, k] * contrast(f_k)``, :mod:`deepminer.models.wildcat`), then the head's
    pooling."""
    import torch

    with torch.inference_mode():
        f = feats.float()
        b, k = int(f.shape[0]), int(f.shape[1])
        maps = model.class_logits(f).float()                    # (B, C, h, w)
        c = int(maps.shape[1])
        pooled = model.pool(maps).double()                      # (B, C)
        probs = torch.softmax(pooled, 1)
        w = model.unit_weights.float()                          # (C, K)
        influence = (f.amax(dim=(2, 3))[:, None, :] * w[None]).double()  # (B, C, K)
        contrast = getattr(model.head, "contrast", None)
        g = contrast(f) if contrast is not None else f         # what each unit adds to the class maps, per weight
        prob_drop = torch.empty(b, c, k, dtype=torch.float64, device=f.device)
        logit_drop = torch.empty_like(prob_drop)
        for s in range(0, k, units_chunk):
            e = min(k, s + units_chunk)
            # (B, n, C, h, w): the class maps with unit s..e-1 silenced, one at a time
            after = maps[:, None] - w[:, s:e].T[None, :, :, None, None] * g[:, s:e, None]
            pa = model.pool(after.reshape(b * (e - s), c, *after.shape[-2:])).double().reshape(b, e - s, c)
            logit_drop[:, :, s:e] = (pooled[:, None, :] - pa).transpose(1, 2)
            prob_drop[:, :, s:e] = (probs[:, None, :] - torch.softmax(pa, 2)).transpose(1, 2)
        return influence, prob_drop, logit_drop, pooled.argmax(1)


def atlas_ablation(model: Any, atlas_dir: str | os.PathLike, data: str | os.PathLike | None = None, *,
                   batch_size: int = 32, device: str | None = "auto", progress: bool = True) -> dict[str, Any]:
    """Measure every unit's single-unit ablation effect over the reference patches of the atlas at
    ``atlas_dir`` (its ``references.csv``, read from ``data``: default the folder the atlas was
    made from) and write ``atlas_dir/ablation.json``; returns its content. ``model``: an FCN or a
    checkpoint path; it must be the model the atlas profiles (same ``weights_sha256``)."""
    import torch
    from tqdm import tqdm

    from deepminer.atlas.atlas import Atlas
    from deepminer.data.patches import PatchDataset
    from deepminer.models import load_model
    from deepminer.models.checkpoints import weights_sha256
    from deepminer.runtime import resolve_device

    t0 = time.perf_counter()
    atlas = Atlas.load(atlas_dir)
    dev = resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise InputError(f"{model}: no such model file")
        model = load_model(model, map_location=dev)
    model = model.to(dev).eval()
    digest = weights_sha256(model)
    profiled = (atlas.meta.get("model") or {}).get("weights_sha256")
    if profiled and profiled != digest:
        raise InputError(f"{atlas_dir}: the atlas profiles weights {profiled[:12]}..., not this model's "
                         f"{digest[:12]}... (rebuild the atlas with `deepminer dissect`)")
    if list(model.classes) != atlas.classes or int(model.num_units) != atlas.num_units:
        raise InputError(f"{atlas_dir}: the atlas's classes/units ({'/'.join(atlas.classes)}, {atlas.num_units}) "
                         f"are not the model's ({'/'.join(model.classes)}, {model.num_units})")
    source = atlas.meta.get("data") or {}
    folder = Path(data) if data is not None else Path(str(source.get("folder", "")))
    if not (folder / "manifest.csv").is_file():
        raise InputError(f"{folder}: no manifest.csv (the atlas's reference data set; pass --data, e.g. "
                         "var/reference-1024, made by scripts/model_store.sh)")
    refs = atlas.references
    if len(refs) == 0:
        raise InputError(f"{atlas_dir}: the atlas has no reference patches")
    size = int(source.get("patch_size") or 224)
    ds = PatchDataset(folder, refs, size=size, augment=False, classes=tuple(model.classes))
    c, k = len(model.classes), int(model.num_units)
    sums = {name: np.zeros((c, k), np.float64) for name in ("influence", "prob_drop", "logit_drop")}
    counts = np.zeros(c, np.int64)
    for start in tqdm(range(0, len(ds), batch_size), desc="atlas-ablation", unit="batch", disable=not progress):
        x = torch.stack([ds[i][0] for i in range(start, min(len(ds), start + batch_size))])
        with torch.inference_mode():
            feats = model.forward_features(x.to(dev))
        infl, pdrop, ldrop, pred = single_unit_effects(model, feats)
        onehot = torch.nn.functional.one_hot(pred, c).double()  # (B, C): the class each patch is predicted as
        for name, t in (("influence", infl), ("prob_drop", pdrop), ("logit_drop", ldrop)):
            sums[name] += torch.einsum("bc,bck->ck", onehot, t).cpu().numpy()
        counts += onehot.sum(0).long().cpu().numpy()
    frequency = atlas.arrays.get("frequency")
    per_class: dict[str, Any] = {}
    for i, cls in enumerate(model.classes):
        n = int(counts[i])
        entry: dict[str, Any] = {"patches": n}
        if n == 0:
            entry["note"] = "no reference patch is predicted as this class: nothing to correlate"
            per_class[cls] = entry
            continue
        mean = {name: sums[name][i] / n for name in sums}
        by_infl = np.argsort(-mean["influence"], kind="stable")[:TOP]
        by_effect = np.argsort(-mean["prob_drop"], kind="stable")[:TOP]
        entry.update({
            "spearman_influence_prob_drop": spearman(mean["influence"], mean["prob_drop"]),
            "spearman_influence_logit_drop": spearman(mean["influence"], mean["logit_drop"]),
            "top_by_influence": [int(u) for u in by_infl],
            "top_by_effect": [int(u) for u in by_effect],
            "top_overlap": len(set(by_infl.tolist()) & set(by_effect.tolist())),
            "mean_influence": _rounded(mean["influence"]),
            "mean_prob_drop": _rounded(mean["prob_drop"]),
            "mean_logit_drop": _rounded(mean["logit_drop"]),
        })
        if frequency is not None:
            entry["spearman_frequency_prob_drop"] = spearman(frequency[i], mean["prob_drop"])
            top_freq = atlas.top_units(cls)[:TOP]
            entry["atlas_top_units"] = [int(u) for u in top_freq]
            entry["atlas_top_overlap"] = len(set(int(u) for u in top_freq) & set(by_effect.tolist()))
        per_class[cls] = entry
    result = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"weights_sha256": digest, "arch": getattr(model, "arch", ""),
                  "head": getattr(model, "head_type", "gap"), "units": k, "classes": list(model.classes)},
        "references": {"patches": len(refs), "patch_size": size, "split": source.get("split")},
        "method": "each unit silenced alone (activations set to zero before the head) on every reference patch; "
                  "means over the patches predicted as the class; Spearman over the units",
        "top": TOP,
        "per_class": per_class,
        "timing_s": round(time.perf_counter() - t0, 2),
    }
    out = Path(atlas_dir) / FILE
    with atomic_file(out, "w") as fh:
        fh.write(json.dumps(result, indent=1) + "\n")
    return result


def load_ablation(atlas_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``atlas_dir/ablation.json`` (:func:`atlas_ablation`), or None when there is none; a damaged
    file is a one-line :class:`InputError`."""
    path = Path(atlas_dir) / FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({type(err).__name__})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} file")
    return body


def _rounded(a: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(a, dtype=np.float64)]
