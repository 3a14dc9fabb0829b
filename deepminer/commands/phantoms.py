"""``deepminer phantoms``: write a phantom mammogram data set (a dataset folder)."""
from __future__ import annotations

import argparse

from deepminer.errors import InputError

NAME = "phantoms"
HELP = "write a phantom mammogram data set with BI-RADS concept masks"
DESCRIPTION = (
    "Write a dataset folder of phantom mammograms (16-bit PNG, 12 bits used): one CC and one MLO "
    "image per patient, masses, calcifications and architectural distortions with a pixel mask per "
    "BI-RADS concept, lesion masks, DDSM-style reports and patient-disjoint splits. The same "
    "arguments give byte-identical files on every x86-64 CPU. The label rule is documented in docs/phantoms.md."
)


def _fractions(text: str, names: tuple[str, ...], flag: str) -> dict[str, float]:
    """Parse ``0.6,0.1,0.3`` (in the order of ``names``, missing ones 0) or ``train=0.6,val=0.1``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    out: dict[str, float] = {}
    try:
        if any("=" in p for p in parts):
            for p in parts:
                k, _, v = p.partition("=")
                if k.strip() not in names:
                    raise InputError(f"{flag}: unknown name {k.strip()!r} (use {', '.join(names)})")
                out[k.strip()] = float(v)
        else:
            if not 1 <= len(parts) <= len(names):
                raise InputError(f"{flag}: give 1 to {len(names)} fractions ({', '.join(names)})")
            out = {k: float(v) for k, v in zip(names, parts)}
    except ValueError:
        raise InputError(f"{flag}: {text!r} is not a list of numbers") from None
    return {k: out.get(k, 0.0) for k in names}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset folder to write (replaced if it is one)")
    parser.add_argument("--count", type=int, required=True, help="number of images (2 per patient)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--size", type=int, default=1024, help="image height in pixels (width = 0.59 x)")
    parser.add_argument("--splits", default="0.6,0.1,0.3,0",
                        help="train,val,test[,holdout] fractions by patient (or train=0.6,val=...)")
    parser.add_argument("--label-mix", default=None,
                        help="normal,benign,malignant fractions by patient (default 1/3 each)")
    parser.add_argument("--overlap", type=float, default=0.05,
                        help="rate of malignant cases that look benign (and of benign that look malignant)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (output is the same)")


def run(args: argparse.Namespace) -> int:
    from deepminer.data.dataset import SPLITS
    from deepminer.data.phantoms import generate_dataset
    from deepminer import CLASSES

    splits = _fractions(args.splits, SPLITS, "--splits")
    mix = _fractions(args.label_mix, CLASSES, "--label-mix") if args.label_mix else None
    if args.count < 1:
        raise InputError(f"--count: must be at least 1, got {args.count}")
    if args.jobs < 1:
        raise InputError(f"--jobs: must be at least 1, got {args.jobs}")
    out = generate_dataset(args.out, args.count, args.seed, args.size, splits=splits, label_mix=mix,
                           overlap=args.overlap, jobs=args.jobs, progress=True)
    print(f"wrote {args.count} phantom images to {out}")
    return 0
