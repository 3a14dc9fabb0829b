"""``deepminer domain-fit``: the out-of-domain summary of a model (``domain.pt``, docs/domain.md)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from deepminer.domain import DomainModel

NAME = "domain-fit"
HELP = "fit a model's out-of-domain guard (frozen-trunk features of fresh phantoms of every size; or unit-max)"
DESCRIPTION = (
    "Kind frozen-trunk (the default): render --count fresh phantoms of each generator size in --sizes "
    "(--seed), judge each the server's way at the model's own scale (deepminer.model_scale.input_side: "
    "pixel spacing, breast extent, else long side <= 1024), describe it by the channel means and "
    "log-stds over the breast of two frozen backbone stages (net.blocks.2, net.blocks.4: before "
    "net.blocks.5, never fine-tuned) and simple image statistics, fit a Ledoit-Wolf Gaussian on two "
    "thirds and set the threshold at --percentile (99.5) of the held-out third's Mahalanobis "
    "distances. The file names a hash of the frozen layers: a model whose frozen layers differ is "
    "refused, a retrained head keeps it. Kind unit-max (--data): the older summary of the "
    "fine-tuned last layer's unit maxima of a dataset folder (Lee et al. 2018). Writes OUT (default: "
    "domain.pt beside the model), which the server, 'deepminer explain' and 'deepminer archive' pick "
    "up: every answer then carries input.domain = {score, threshold, in_domain, ...}."
)
KINDS = ("frozen-trunk", "unit-max")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.domain import DEFAULT_COMPONENTS, DEFAULT_TRANSFORM, GUARD_SIZES, TRANSFORMS
    from deepminer.geometry import DEFAULT_MAX_SIDE
    from deepminer.model_folder import DOMAIN

    parser.add_argument("--model", required=True, help="deepminer checkpoint (e.g. model_store/demo/model.pt)")
    parser.add_argument("--kind", choices=KINDS, default=KINDS[0],
                        help="frozen-trunk: fresh phantoms of every size (--sizes, --count, --seed); "
                             "unit-max: the fine-tuned unit maxima of --data")
    parser.add_argument("--sizes", default=",".join(str(s) for s in GUARD_SIZES),
                        help="frozen-trunk: phantom generator sizes (image height, px), comma-separated")
    parser.add_argument("--count", type=int, default=60,
                        help="frozen-trunk: fresh phantoms per size (the threshold: their 3-fold out-of-fold scores)")
    parser.add_argument("--seed", type=int, default=11,
                        help="frozen-trunk: phantom seed (keep it apart from the seeds you test on)")
    parser.add_argument("--data", default=None, help="unit-max: dataset folder (manifest.csv with a split column)")
    parser.add_argument("--out", default=None, help=f"file to write (None: {DOMAIN} beside the model)")
    parser.add_argument("--train-split", default="train", help="unit-max: split the summary is fitted on")
    parser.add_argument("--val-split", default="val", help="unit-max: split the threshold is set on")
    parser.add_argument("--percentile", type=float, default=None,
                        help="threshold = this percentile of the held-out scores (None: 99.5 frozen-trunk, 99 unit-max)")
    parser.add_argument("--components", type=int, default=DEFAULT_COMPONENTS,
                        help="unit-max: covariance eigen-directions kept exactly (the rest share their mean variance)")
    parser.add_argument("--transform", choices=TRANSFORMS, default=DEFAULT_TRANSFORM,
                        help="unit-max: applied to each unit's max activation before the Gaussian")
    parser.add_argument("--max-side", type=int, default=None,
                        help="unit-max: long side (px) the images are explained at, at most (None: the model's own "
                             f"scale, as the server explains them; a model that records none: {DEFAULT_MAX_SIDE})")
    parser.add_argument("--limit", type=int, default=None, help="unit-max: at most this many images per split")
    parser.add_argument("--features", default=None, metavar="NPZ",
                        help="cache of the extracted features: reused when written for the same frozen layers "
                             "(or weights), images and scale (a refit with another --percentile runs no model), "
                             "else written")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    import sys

    from deepminer.domain import DEFAULT_PERCENTILE, GUARD_PERCENTILE
    from deepminer.errors import InputError
    from deepminer.geometry import MAX_SIDE_RANGE
    from deepminer.model_folder import ModelFolder

    guard = args.kind == "frozen-trunk"
    percentile = args.percentile if args.percentile is not None else (GUARD_PERCENTILE if guard else DEFAULT_PERCENTILE)
    if not 0 < percentile <= 100:
        raise InputError(f"--percentile: must be in (0, 100], got {percentile}")
    if args.components < 1:
        raise InputError(f"--components: must be at least 1, got {args.components}")
    if args.max_side is not None and not MAX_SIDE_RANGE[0] <= args.max_side <= MAX_SIDE_RANGE[1]:
        raise InputError(f"--max-side: must be in {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]}, got {args.max_side}")
    if args.limit is not None and args.limit < 2:
        raise InputError(f"--limit: must be at least 2, got {args.limit}")
    sizes = _sizes(args.sizes)
    if guard and args.count < 3:
        raise InputError(f"--count: must be at least 3 (two fitted, one held out), got {args.count}")
    if not guard and not args.data:
        raise InputError("--data: the unit-max kind needs the model's training dataset folder")
    model = Path(args.model)
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    out = Path(args.out) if args.out else ModelFolder.of(model).domain
    if guard:
        dg = fit_guard_phantoms(model, sizes=sizes, count=args.count, seed=args.seed, percentile=percentile,
                                device=args.device, features=args.features)
        dg.save(out)
        f = dg.fit
        print(f"{out}: {dg.method} over {f['features']} features (layers {', '.join(dg.layers)} + image statistics; "
              f"Ledoit-Wolf shrinkage {f['shrinkage']:.3f}) fitted on {f['rows']} fresh phantoms of sizes "
              f"{','.join(str(s) for s in sizes)}; threshold {dg.threshold:.4g} = {dg.percentile:g}th percentile of "
              f"their {f['folds']}-fold out-of-fold scores (median {f['heldout_score_median']:.4g}; held out in domain "
              f"per size {f['heldout_in_domain']}); frozen layers {dg.trunk_sha256[:12]}; "
              f"{out.stat().st_size / 2**20:.2f} MiB, {f['seconds']:.0f} s", file=sys.stderr)
        return 0
    domain = fit_dataset(model, args.data, train_split=args.train_split, val_split=args.val_split,
                         percentile=percentile, components=args.components, max_side=args.max_side,
                         device=args.device, limit=args.limit, features=args.features, transform=args.transform)
    domain.save(out)
    f = domain.fit
    print(f"{out}: {domain.method} over {f['units']} units ({domain.transform}, {f['components']} components, Ledoit-Wolf "
          f"shrinkage {f['shrinkage']:.3f}) fitted on {f['train_images']} {args.train_split} images; threshold "
          f"{domain.threshold:.4g} = {domain.percentile:g}th percentile of {f['val_images']} {args.val_split} "
          f"scores (median {f['val_score_median']:.4g}); {out.stat().st_size / 2**20:.2f} MiB, "
          f"{f['seconds']:.0f} s", file=sys.stderr)
    return 0


def _sizes(text: str) -> list[int]:
    from deepminer.data.phantom_findings import MAX_SIZE, MIN_SIZE
    from deepminer.errors import InputError

    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes: comma-separated integers, got {text!r}") from None
    if not sizes or any(not MIN_SIZE <= s <= MAX_SIZE for s in sizes):
        raise InputError(f"--sizes: each in {MIN_SIZE}..{MAX_SIZE}, got {text!r}")
    return sizes


def fit_dataset(model_file: str | os.PathLike, data: str | os.PathLike, *, train_split: str, val_split: str,
                percentile: float, components: int, transform: str, max_side: int | None = None,
                device: str = "cpu", limit: int | None = None, features: str | os.PathLike | None = None,
                progress: bool = True) -> DomainModel:
    """What ``deepminer domain-fit`` runs (orchestration: the service, the dataset folder and
    :func:`deepminer.domain.fit_domain`): the features of the ``train_split`` images of the dataset
    folder ``data`` (whole images, at the size the server explains them), the threshold at
    ``percentile`` of the ``val_split`` scores. ``limit``: at most this many images per split.
    ``features``: an ``.npz`` of the extracted features, reused when it was written for the same
    weights, images and ``max_side`` (None: the model's own scale, as the server) (a refit with another percentile costs no forward pass),
    else (re)written."""
    import time

    from deepminer.data.dataset import describe_dataset, read_manifest
    from deepminer.domain import FEATURE, fit_domain, image_features
    from deepminer.errors import InputError
    from deepminer.explain.service import SETTINGS, ExplainService

    rows = read_manifest(data)
    root = Path(data)
    split_images = {}
    for split in (train_split, val_split):
        paths = [root / r["image"] for r in rows if r["split"] == split][:limit]
        if len(paths) < 2:
            raise InputError(f"{data}: the {split!r} split has {len(paths)} images; at least 2 are needed")
        split_images[split] = paths
    t0 = time.perf_counter()
    service = ExplainService.load(model_file, None, settings={"cache_mb": 1}, device=device, domain=False)
    side = max_side or service.settings["default_max_side"]  # None: the model's own scale, as served
    ident = {"weights_sha256": service.weights_sha256, "max_side": side, "feature": FEATURE,
             "images": [str(p.resolve()) for s in (train_split, val_split) for p in split_images[s]]}
    cached = _read_features(features, ident) if features else None
    if cached is not None:
        train, val = cached
    else:
        train = image_features(service, split_images[train_split], max_side=side, desc=train_split, progress=progress)
        val = image_features(service, split_images[val_split], max_side=side, desc=val_split, progress=progress)
        if features:
            _write_features(features, ident, train, val)
    fit = {"data": str(root.resolve()), "data_kind": describe_dataset(root), "train_split": train_split,
           "val_split": val_split, "max_side": side, "tissue": bool(SETTINGS["tissue"]),
           "model_file": Path(model_file).name, "seconds": round(time.perf_counter() - t0, 1)}
    return fit_domain(train, val, percentile=percentile, components=components, transform=transform,
                      weights_sha256=service.weights_sha256, fit=fit)


def _read_features(path: str | os.PathLike, ident: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(train, val)`` features of ``path`` when they were written for ``ident``."""
    import json

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["ident"])) != dict(ident):
                return None
            return z["train"].astype(np.float64), z["val"].astype(np.float64)
    except (OSError, KeyError, ValueError):
        return None


def _write_features(path: str | os.PathLike, ident: Mapping[str, Any], train: np.ndarray, val: np.ndarray) -> None:
    import json

    import numpy as np

    from deepminer.atomic import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        np.savez(fh, ident=np.array(json.dumps(dict(ident))), train=train.astype(np.float32),
                 val=val.astype(np.float32))


def phantom_image(seed: int, index: int, size: int) -> bytes:
    """One fresh phantom as the PNG file ``deepminer phantoms`` writes (12 bits, sBIT, text chunks)."""
    from deepminer.data.io import png16
    from deepminer.data.phantom_findings import BITS
    from deepminer.data.phantom_render import render_phantom

    ph = render_phantom(int(seed), int(index), int(size))
    return png16(ph.image, bits=BITS, text={"Laterality": ph.laterality, "View": ph.view})


def guard_row(model: Any, data: bytes, *, layers: Any = None, name: str = "image") -> tuple[np.ndarray, int]:
    """``(raw guard features, side)`` of one image file, the server's way: decoded by
    :func:`deepminer.data.io.load_image`, its tissue mask, the model's own scale."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_region
    from deepminer.domain import GUARD_LAYERS, guard_features, guard_side

    loaded = load_image(data, name=name)
    _, _, region = tissue_region(loaded.pixels)
    side, _ = guard_side(model, loaded.height, loaded.width, tissue=region if region.any() else None,
                         spacing_mm=getattr(loaded, "spacing_mm", None))
    return guard_features(model, loaded.pixels, region, side, layers=layers or GUARD_LAYERS), side


def fit_guard_phantoms(model_file: str | os.PathLike, *, sizes: Any, count: int, seed: int, percentile: float,
                       folds: int = 3, device: str = "cpu", features: str | os.PathLike | None = None,
                       progress: bool = True) -> Any:
    """What ``deepminer domain-fit`` (kind ``frozen-trunk``) runs: ``count`` fresh phantoms of
    each generator size in ``sizes`` (patients ``k * count + i`` of ``seed`` for the k-th size: no
    patient twice), each judged the server's way at the model's own scale; the guard is fitted on
    all of them, its threshold is ``percentile`` of their out-of-fold scores
    (:func:`deepminer.domain.fit_guard`). ``features``: an ``.npz`` cache, reused when written for
    the same frozen layers, features, scale, sizes, count and seed (the three bundled models share
    their frozen layers: one extraction serves all three)."""
    import json
    import time

    import numpy as np
    from tqdm import tqdm

    from deepminer.atomic import atomic_file
    from deepminer.domain import GUARD_LAYERS, feature_names, fit_guard, trunk_sha256
    from deepminer.model_scale import model_scale
    from deepminer.models import load_model
    from deepminer.models.checkpoints import weights_sha256
    from deepminer.runtime import resolve_device

    t0 = time.perf_counter()
    model = load_model(model_file).to(resolve_device(device)).eval()
    layers = GUARD_LAYERS
    trunk = trunk_sha256(model, layers)
    sizes = [int(s) for s in sizes]
    names = feature_names(model, layers)
    ident = {"kind": "frozen-trunk", "trunk_sha256": trunk, "layers": list(layers), "scale": model_scale(model),
             "features": names, "sizes": sizes, "count": int(count), "seed": int(seed)}
    rows = sides = None
    if features:
        try:
            with np.load(features, allow_pickle=False) as z:
                if json.loads(str(z["ident"])) == ident:
                    rows, sides = z["rows"].astype(np.float64), z["sides"].astype(np.int64)
        except (OSError, KeyError, ValueError):
            rows = None
    cached = rows is not None
    if rows is None or sides is None:
        jobs = [(k, size, i) for k, size in enumerate(sizes) for i in range(int(count))]
        got, side_list = [], []
        for k, size, i in tqdm(jobs, desc="phantoms", unit="img", disable=not progress, dynamic_ncols=True):
            row, side = guard_row(model, phantom_image(seed, k * int(count) + i, size), layers=layers)
            got.append(row)
            side_list.append(side)
        rows, sides = np.stack(got), np.asarray(side_list, dtype=np.int64)
        if features:
            Path(features).parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(Path(features)) as fh:
                np.savez(fh, ident=np.array(json.dumps(ident)), rows=rows, sides=sides)
    groups = [size for size in sizes for _ in range(int(count))]
    by_size = {str(size): sorted({int(s) for s, g in zip(sides, groups) if g == size}) for size in sizes}
    fit = {"data": f"fresh phantoms (deepminer phantoms --seed {seed}), {count} per size",
           "data_kind": "synthetic phantoms (deepminer phantoms)", "sizes": sizes, "seed": int(seed),
           "count_per_size": int(count), "scale": model_scale(model) or "none recorded (long side <= 1024)",
           "sides": {k: [v[0], v[-1]] for k, v in by_size.items()}, "model_file": Path(model_file).name,
           "features_cached": cached, "seconds": round(time.perf_counter() - t0, 1)}
    return fit_guard(rows, percentile=percentile, folds=folds, groups=groups, layers=layers, trunk_hash=trunk,
                     weights_sha256=weights_sha256(model), names=names, fit=fit)
