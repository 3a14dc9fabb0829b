"""``deepminer calibrate``: refit a whole-image model's calibration on labelled images (docs/training.md, 2c)."""
from __future__ import annotations

import argparse

NAME = "calibrate"
HELP = "refit a whole-image model's calibration (temperature + benign/malignant mix) on labelled whole images"
DESCRIPTION = (
    "Predict every image of a split of a dataset folder exactly as the server does (the model's own scale, pooling "
    "over the breast), with the model's calibration set aside, then fit a temperature T and the rate at which "
    "benign and malignant are mixed (look-alikes: p(benign) and p(malignant) each become (1 - rate) x itself + "
    "rate x the other) by minimum negative log-likelihood, and write the same weights with the new calibration "
    "to --out. Prints the NLL and ECE of those images before, with the temperature alone, and calibrated. Use "
    "images the model was never trained on, and enough of them to hold a few look-alikes (a validation split, or "
    "your own site's labelled images); the bundled models were calibrated on 2000 fresh phantoms of their own "
    "(docs/training.md, 2c)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a whole-image model (deepminer train-whole)")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv with labels)")
    parser.add_argument("--out", required=True, help="the calibrated checkpoint to write (a new file)")
    parser.add_argument("--split", default="val", help="the manifest split to fit on ('all': every image)")
    parser.add_argument("--limit", type=int, default=None, help="the first N images of the split only")
    parser.add_argument("--temperature-only", action="store_true",
                        help="fit the temperature alone (no benign/malignant mix)")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=None,
                        help="store float16 weights (default: as the input checkpoint)")
    parser.add_argument("--json", action="store_true", help="print the fit's report as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from deepminer.model_card import fmt_number
    from deepminer.whole_image import calibrate_model

    command = "deepminer calibrate " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    rep = calibrate_model(args.model, args.data, args.out, split=args.split, limit=args.limit,
                          temperature_only=args.temperature_only, half=args.half, command=command,
                          progress=not args.json)
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
        return 0
    print(f"{args.out}: calibrated on {rep['images']} images of {args.data} (split {args.split}); {rep['rule']}")
    for key, name in (("before", "T = 1"), ("temperature_alone", "temperature alone"), ("calibrated", "calibrated")):
        r = rep[key]
        print(f"  {name:<18} T {r['temperature']:.3f}  mix {r['mix']:.3f}  NLL {fmt_number(r['nll'])}  "
              f"ECE {fmt_number(r['ece'])}")
    if rep["at_bound"]:
        print("warning: the temperature ran to its bound: these images are too few, or separated perfectly; "
              "calibrate on more (and harder) images", file=sys.stderr)
    return 0
