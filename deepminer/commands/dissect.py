"""``deepminer dissect``: the unit atlas of a model over the patches of a data set split."""
from __future__ import annotations

import argparse

NAME = "dissect"
HELP = "profile every unit of a model over a reference set (the unit atlas)"
DESCRIPTION = (
    "One forward pass over the DeepMiner patches of a split of a dataset folder (patches.csv, or "
    "extracted now). Writes the atlas folder OUT: per-unit thresholds (activation quantile), the "
    "top-k activating patches of every unit, the unit embedding (max activation per image) and its "
    "2-D PCA, DeepMiner's influence ranking (top 20 units per class and the share of per-patch top-8 "
    "slots they cover) and, where the data set has concept masks, Network Dissection IoU of every "
    "unit with every concept and each unit's suggested label."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.defaults import IOU_SIZE, MEMORY_MB, QUANTILE, TOPK

    parser.add_argument("--model", required=True,
                        help="model checkpoint (deepminer-fcn/1, e.g. model_store/demo/model.pt)")
    parser.add_argument("--data", required=True, help="dataset folder (with manifest.csv)")
    parser.add_argument("--split", default="test", help="split whose patches are the reference set")
    parser.add_argument("--out", required=True, help="atlas folder to write (replaced if it exists)")
    parser.add_argument("--quantile", type=float, default=QUANTILE,
                        help="activation quantile of a unit's threshold (0.99 Lu & Perer; 0.995 Network Dissection)")
    parser.add_argument("--topk", type=int, default=TOPK, help="top-activating patches kept per unit")
    parser.add_argument("--batch-size", type=int, default=32, help="patches per forward pass")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="patch side in pixels fed to the model; unset: the checkpoint's patch_size, else 224")
    parser.add_argument("--patches", default=None, help="patch table CSV; unset: DATA/patches.csv, else extracted now")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--iou-size", type=int, default=IOU_SIZE, help="grid (cells per patch side) of the concept IoU")
    parser.add_argument("--memory-mb", type=float, default=MEMORY_MB, help="memory budget of the streaming statistics")


def run(args: argparse.Namespace) -> int:
    import sys

    from deepminer.atlas import dissect
    from deepminer.errors import InputError

    if not 0.0 < args.quantile < 1.0:
        raise InputError(f"--quantile: must be in (0, 1), got {args.quantile}")
    for name in ("topk", "batch_size", "iou_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: must be a positive integer")
    if args.patch_size is not None and args.patch_size < 8:
        raise InputError("--patch-size: must be at least 8")
    if args.memory_mb <= 0:
        raise InputError("--memory-mb: must be positive")
    atlas = dissect(args.model, args.data, args.split, args.out, quantile=args.quantile, topk=args.topk,
                    batch_size=args.batch_size, device=args.device, patch_size=args.patch_size, patches=args.patches,
                    iou_size=args.iou_size, memory_mb=args.memory_mb)
    m = atlas.meta
    cov = ", ".join(f"{c} {'-' if v is None else f'{100 * v:.1f}%'}" for c, v in atlas.summary()["coverage"].items())
    print(f"{args.out}: {m['counts']['units']} units over {m['counts']['references']} patches of "
          f"{m['counts']['images']} images ({m['data']['split']}) in {m['timing']['total_s']:.1f} s; "
          f"top-{m['influence']['top_units']} coverage: {cov}; "
          f"{atlas.summary()['labelled_units']} units with a suggested concept", file=sys.stderr)
    return 0
