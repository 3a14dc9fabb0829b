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
HELP = "fit a model's out-of-domain score (Mahalanobis distance of pooled features) on a dataset folder"
DESCRIPTION = (
    "Explain every image of the training split of a dataset folder the way the server does (whole "
    "image, tissue mask, long side --max-side), fit a Gaussian with a Ledoit-Wolf shrunk covariance to "
    "the pooled last-layer features (each unit's max activation) and set the threshold at --percentile "
    "of the validation split's Mahalanobis distances (Lee et al. 2018). Writes OUT (default: domain.pt "
    "beside the model), which the server, 'deepminer explain' and 'deepminer archive' pick up: every "
    "answer then carries input.domain = {score, threshold, in_domain}. The file names the model's "
    "weights hash; a file fitted for other weights is refused."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.domain import DEFAULT_COMPONENTS, DEFAULT_PERCENTILE, DEFAULT_TRANSFORM, TRANSFORMS
    from deepminer.model_folder import DOMAIN
    from deepminer.geometry import DEFAULT_MAX_SIDE

    parser.add_argument("--model", required=True, help="deepminer checkpoint (e.g. model_store/demo/model.pt)")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv with a split column)")
    parser.add_argument("--out", default=None, help=f"file to write (None: {DOMAIN} beside the model)")
    parser.add_argument("--train-split", default="train", help="split the summary is fitted on")
    parser.add_argument("--val-split", default="val", help="split the threshold is set on")
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                        help="threshold = this percentile of the validation scores")
    parser.add_argument("--components", type=int, default=DEFAULT_COMPONENTS,
                        help="covariance eigen-directions kept exactly (the rest share their mean variance)")
    parser.add_argument("--transform", choices=TRANSFORMS, default=DEFAULT_TRANSFORM,
                        help="applied to each unit's max activation before the Gaussian (sqrt: variance-stabilising)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="long side (px) the images are explained at, at most (None: the model's own scale, "
                             f"as the server explains them; a model that records none: {DEFAULT_MAX_SIDE})")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per split (None: all)")
    parser.add_argument("--features", default=None, metavar="NPZ",
                        help="cache of the extracted features: reused when written for the same weights, images "
                             "and --max-side (a refit with another --percentile runs no model), else written")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    import sys


    from deepminer.errors import InputError
    from deepminer.geometry import MAX_SIDE_RANGE
    from deepminer.model_folder import ModelFolder

    if not 0 < args.percentile <= 100:
        raise InputError(f"--percentile: must be in (0, 100], got {args.percentile}")
    if args.components < 1:
        raise InputError(f"--components: must be at least 1, got {args.components}")
    if args.max_side is not None and not MAX_SIDE_RANGE[0] <= args.max_side <= MAX_SIDE_RANGE[1]:
        raise InputError(f"--max-side: must be in {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]}, got {args.max_side}")
    if args.limit is not None and args.limit < 2:
        raise InputError(f"--limit: must be at least 2, got {args.limit}")
    model = Path(args.model)
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    out = Path(args.out) if args.out else ModelFolder.of(model).domain
    domain = fit_dataset(model, args.data, train_split=args.train_split, val_split=args.val_split,
                         percentile=args.percentile, components=args.components, max_side=args.max_side,
                         device=args.device, limit=args.limit, features=args.features, transform=args.transform)
    domain.save(out)
    f = domain.fit
    print(f"{out}: {domain.method} over {f['units']} units ({domain.transform}, {f['components']} components, Ledoit-Wolf "
          f"shrinkage {f['shrinkage']:.3f}) fitted on {f['train_images']} {args.train_split} images; threshold "
          f"{domain.threshold:.4g} = {domain.percentile:g}th percentile of {f['val_images']} {args.val_split} "
          f"scores (median {f['val_score_median']:.4g}); {out.stat().st_size / 2**20:.2f} MiB, "
          f"{f['seconds']:.0f} s", file=sys.stderr)
    return 0


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
