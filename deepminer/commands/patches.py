"""``deepminer patches``: the DeepMiner patch table of a dataset folder."""
from __future__ import annotations

import argparse

NAME = "patches"
HELP = "extract the DeepMiner patch table (patches.csv) of a dataset folder"
DESCRIPTION = (
    "Slide a window (side = 25% of the image width, stride = 50% of the side) over every image of "
    "a dataset folder, keep windows with >= 50% breast tissue and label each normal/benign/malignant "
    "by the DeepMiner 30% rules (malignant takes precedence). Writes a CSV with image_id, "
    "patient_id, split, x0, y0, x1, y1, label, tissue and frac_<concept> per concept mask."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset folder (with manifest.csv)")
    parser.add_argument("--out", default=None, help="output CSV (default: DATA/patches.csv)")
    parser.add_argument("--side-frac", type=float, default=0.25, help="patch side as a fraction of image width")
    parser.add_argument("--stride-frac", type=float, default=0.5, help="stride as a fraction of the side")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="minimum breast-tissue fraction to keep a patch")
    parser.add_argument("--min-lesion", type=float, default=0.3,
                        help="lesion fraction of the patch (or of a finding) that makes it benign/malignant")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from deepminer.atomic import atomic_path
    from deepminer.data.patches import PATCHES_CSV, extract_patches
    from deepminer.errors import InputError

    for name in ("side_frac", "stride_frac"):
        if not 0 < getattr(args, name) <= 1:
            raise InputError(f"--{name.replace('_', '-')}: must be in (0, 1]")
    for name in ("min_tissue", "min_lesion"):
        if not 0 <= getattr(args, name) <= 1:
            raise InputError(f"--{name.replace('_', '-')}: must be in [0, 1]")
    out = Path(args.out) if args.out else Path(args.data) / PATCHES_CSV
    df = extract_patches(args.data, side_frac=args.side_frac, stride_frac=args.stride_frac,
                         min_tissue=args.min_tissue, min_lesion=args.min_lesion)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
    counts = df["label"].value_counts().to_dict()
    summary = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("normal", "benign", "malignant"))
    splits = ", ".join(f"{k} {v}" for k, v in df["split"].value_counts().sort_index().items())
    print(f"{out}: {len(df)} patches ({summary}; {splits})", file=sys.stderr)
    return 0
