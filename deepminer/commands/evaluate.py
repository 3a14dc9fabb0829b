"""``deepminer evaluate``: how well a model classifies the patches of a dataset folder."""
from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = "per-class AUC and pAUC of a model on the patches of a dataset folder"
DESCRIPTION = (
    "Classify the DeepMiner patches of one split of a dataset folder (DATA/patches.csv if present, "
    "else extracted on the fly) and print, per class, the one-vs-rest AUC and the pAUC at TPR 0.8 "
    "(area of the ROC in the band TPR >= 0.8, normalised to [0, 1]), plus image-level malignant "
    "detection (an image's score = the max over its patches of P(malignant))."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model checkpoint (deepminer-fcn/1, e.g. RUN/best.pt)")
    parser.add_argument("--data", required=True, help="dataset folder (with manifest.csv)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "holdout", "all"],
                        help="which split's patches ('all' = every patch)")
    parser.add_argument("--patches", default=None, help="patch table CSV (default: DATA/patches.csv or extract)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="resize patches to this side (default: the size the model was trained at)")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per batch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument("--baseline", action="store_true",
                        help="also fit the intensity-histogram baseline on the folder's train split")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _fmt(v) -> str:
    return "   n/a" if v is None else f"{v:6.3f}"


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from deepminer.data.patches import load_or_extract, split_table
    from deepminer.errors import InputError
    from deepminer.metrics import nan_to_none
    from deepminer.models import load_model
    from deepminer.runtime import resolve_device
    from deepminer.patch_eval import baseline_report, evaluate_table

    if not Path(args.data).is_dir():
        raise InputError(f"{args.data}: no such dataset folder")
    if args.patch_size is not None and args.patch_size < 8:
        raise InputError("--patch-size: must be at least 8")
    device = resolve_device(args.device)
    model = load_model(args.model, map_location=device)
    table = load_or_extract(args.data, args.patches)
    source = args.patches or f"{args.data} patches"
    part = table.reset_index(drop=True) if args.split == "all" else split_table(table, args.split, source)
    if part.empty:
        raise InputError(f"{source}: no patches")
    rep = evaluate_table(model, args.data, part, patch_size=args.patch_size, batch_size=args.batch_size,
                         device=device)
    if args.baseline:
        rep["baseline"] = baseline_report(args.data, split_table(table, "train", source), args.data, part,
                                          classes=model.classes)
    result = nan_to_none({"model": str(args.model), "arch": model.arch, "head": model.head_type,
                          "data": str(args.data), "split": args.split, "patches": rep})
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    p = result["patches"]
    print(f"{args.model} ({model.arch}, {model.head_type} head) on {args.data} [{args.split}]: "
          f"{p['n']} patches at {p['patch_size']} px")
    print(f"{'class':<10} {'n':>6} {'AUC':>6} {'pAUC@.8':>7}" + ("  baseline AUC" if args.baseline else ""))
    for c in model.classes:
        line = f"{c:<10} {p['counts'][c]:>6} {_fmt(p['auc'][c])} {_fmt(p['pauc'][c]):>7}"
        if args.baseline:
            line += f"  {_fmt(p['baseline']['auc'][c])}"
        print(line)
    print(f"accuracy {_fmt(p['accuracy']).strip()}")
    il = p.get("image_level")
    if il:
        print(f"image level, malignant (max over patches): {il['n_images']} images, {il['n_positive']} "
              f"malignant, AUC {_fmt(il['auc']).strip()}, pAUC@.8 {_fmt(il['pauc']).strip()}")
    return 0
