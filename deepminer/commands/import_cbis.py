"""``deepminer import-cbis``: a CBIS-DDSM download -> a dataset folder."""
from __future__ import annotations

import argparse

NAME = "import-cbis"
HELP = "turn a CBIS-DDSM download (CSVs + DICOMs) into a dataset folder"
DESCRIPTION = (
    "Read the four CBIS-DDSM case-description CSVs (mass/calc, train/test) and the full-mammogram and "
    "ROI-mask DICOMs under ROOT (TCIA layout, with or without the CBIS-DDSM/ top folder) and write a "
    "dataset folder: one 16-bit PNG per full mammogram, label malignant if any abnormality is "
    "MALIGNANT else benign, a DDSM-style report line, the ROI masks as the lesion mask (1 benign, "
    "2 malignant) and as concept masks, and patient-disjoint splits (CBIS test -> test, the CBIS "
    "training patients shuffled into train/val). Nothing is written when an input is bad."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="the CBIS-DDSM download folder (CSVs and DICOM folders)")
    parser.add_argument("--out", required=True, help="the dataset folder to write")
    parser.add_argument("--val-fraction", type=float, default=0.15,
                        help="share of the CBIS training patients that go to val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val patient shuffle")
    parser.add_argument("--limit", type=int, default=None, help="import only the first N images (by image id)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")


def run(args: argparse.Namespace) -> int:
    import sys

    from deepminer.data.cbis import import_cbis

    s = import_cbis(args.root, args.out, val_fraction=args.val_fraction, seed=args.seed, limit=args.limit,
                    overwrite=args.overwrite, progress=True)
    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    labels = ", ".join(f"{k} {v}" for k, v in s["labels"].items())
    print(f"{args.out}: {s['images']} images of {s['patients']} patients ({splits}; {labels})", file=sys.stderr)
    return 0
