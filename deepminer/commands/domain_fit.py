"""``deepminer domain-fit``: the out-of-domain summary of a model (``domain.pt``, docs/domain.md)."""
from __future__ import annotations

import argparse

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
    from deepminer.domain import DEFAULT_COMPONENTS, DEFAULT_PERCENTILE, DEFAULT_TRANSFORM, FILE_NAME, TRANSFORMS
    from deepminer.geometry import DEFAULT_MAX_SIDE

    parser.add_argument("--model", required=True, help="deepminer checkpoint (e.g. model_store/demo/model.pt)")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv with a split column)")
    parser.add_argument("--out", default=None, help=f"file to write (None: {FILE_NAME} beside the model)")
    parser.add_argument("--train-split", default="train", help="split the summary is fitted on")
    parser.add_argument("--val-split", default="val", help="split the threshold is set on")
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                        help="threshold = this percentile of the validation scores")
    parser.add_argument("--components", type=int, default=DEFAULT_COMPONENTS,
                        help="covariance eigen-directions kept exactly (the rest share their mean variance)")
    parser.add_argument("--transform", choices=TRANSFORMS, default=DEFAULT_TRANSFORM,
                        help="applied to each unit's max activation before the Gaussian (sqrt: variance-stabilising)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help="long side the images are explained at (the server's default_max_side)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per split (None: all)")
    parser.add_argument("--features", default=None, metavar="NPZ",
                        help="cache of the extracted features: reused when written for the same weights, images "
                             "and --max-side (a refit with another --percentile runs no model), else written")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from deepminer.domain import FILE_NAME, fit_dataset
    from deepminer.errors import InputError
    from deepminer.geometry import MAX_SIDE_RANGE

    if not 0 < args.percentile <= 100:
        raise InputError(f"--percentile: must be in (0, 100], got {args.percentile}")
    if args.components < 1:
        raise InputError(f"--components: must be at least 1, got {args.components}")
    if not MAX_SIDE_RANGE[0] <= args.max_side <= MAX_SIDE_RANGE[1]:
        raise InputError(f"--max-side: must be in {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]}, got {args.max_side}")
    if args.limit is not None and args.limit < 2:
        raise InputError(f"--limit: must be at least 2, got {args.limit}")
    model = Path(args.model)
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    out = Path(args.out) if args.out else model.parent / FILE_NAME
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
