"""``deepminer evaluate``: how well a model classifies the patches and the whole images of a dataset folder."""
from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = "per-class AUC of a model on the patches and the whole images of a dataset folder"
DESCRIPTION = (
    "Patch level: classify the DeepMiner patches of one split of a dataset folder (DATA/patches.csv if "
    "present, else extracted on the fly) and print, per class, the one-vs-rest AUC and the pAUC at TPR 0.8 "
    "(area of the ROC in the band TPR >= 0.8, normalised to [0, 1]), plus the patch-max baseline of "
    "image-level malignant detection (an image's score = the max over its patches of P(malignant)). "
    "Image level (unless --no-image-level): one prediction per whole image of the split, made as the "
    "server makes it (tissue mask, the model's input scale or --max-side, one forward pass): per-class "
    "one-vs-rest AUC and abnormal-vs-normal AUC (score 1 - p(normal)) with 95% percentile-bootstrap "
    "intervals over images, 3-class accuracy (argmax) with its interval, the confusion matrix, and the "
    "top-label ECE (15 equal-width confidence bins) with NLL and Brier score; and, on the benign and malignant "
    "images, how far the predicted class's probability falls when its --silence most influential units "
    "(DeepMiner: max activation x weight) are set to zero (the share that fell by >= 0.05, with its interval, and "
    "the median fall: an answer that rests on its top units moves, a saturated one does not). See docs/evaluation.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.geometry import DEFAULT_MAX_SIDE, MAX_SIDE_RANGE
    from deepminer.options import MAX_ABLATE

    parser.add_argument("--model", required=True, help="model checkpoint (deepminer-fcn/1, e.g. RUN/best.pt)")
    parser.add_argument("--data", required=True, help="dataset folder (with manifest.csv)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "holdout", "all"],
                        help="which split's patches and images ('all' = every one)")
    parser.add_argument("--patches", default=None, help="patch table CSV (default: DATA/patches.csv or extract)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="resize patches to this side (default: the size the model was trained at)")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per batch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument("--baseline", action="store_true",
                        help="also fit the intensity-histogram baseline on the folder's train split")
    parser.add_argument("--image-level", action=argparse.BooleanOptionalAction, default=True,
                        help="also classify every whole image of the split (one forward pass per image at the "
                             "model's input scale; the demo model at 512 px: 2 s per image on 2 shared, busy "
                             "CPU cores, 120 s for 60 images, about as long as their patch level)")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"image level: the model-input long side at most this ({MAX_SIDE_RANGE[0]}.."
                             f"{MAX_SIDE_RANGE[1]}; default: the model's recorded scale, else at most "
                             f"{DEFAULT_MAX_SIDE} px, as the server)")
    parser.add_argument("--silence", type=int, default=5, metavar="N",
                        help="image level: units of the predicted class silenced on each abnormal image "
                             f"(0: not measured; at most {MAX_ABLATE}); costs no forward pass")
    parser.add_argument("--bootstrap", type=int, default=2000,
                        help="image level: bootstrap resamples of the 95%% intervals (0: no intervals)")
    parser.add_argument("--seed", type=int, default=0, help="image level: seed of the bootstrap")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _fmt(v) -> str:
    return "   n/a" if v is None else f"{v:6.3f}"


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from deepminer.data.patches import load_or_extract, split_table
    from deepminer.errors import InputError
    from deepminer.geometry import MAX_SIDE_RANGE
    from deepminer.metrics import nan_to_none
    from deepminer.models import load_model
    from deepminer.runtime import resolve_device
    from deepminer.patch_eval import baseline_report, evaluate_table

    if not Path(args.data).is_dir():
        raise InputError(f"{args.data}: no such dataset folder")
    if args.patch_size is not None and args.patch_size < 8:
        raise InputError("--patch-size: must be at least 8")
    if args.max_side is not None and not MAX_SIDE_RANGE[0] <= args.max_side <= MAX_SIDE_RANGE[1]:
        raise InputError(f"--max-side: must be in {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]}, got {args.max_side}")
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
    from deepminer.options import MAX_ABLATE

    if not 0 <= args.silence <= MAX_ABLATE:
        raise InputError(f"--silence: must be in 0..{MAX_ABLATE}, got {args.silence}")
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
    images = None
    if args.image_level:
        from deepminer.image_eval import image_level_report

        images = image_level_report(model, args.data, args.split, max_side=args.max_side, n_boot=args.bootstrap,
                                    seed=args.seed, silence=args.silence)
    result = nan_to_none({"model": str(args.model), "arch": model.arch, "head": model.head_type,
                          "data": str(args.data), "split": args.split, "patches": rep,
                          **({"images": images} if images is not None else {})})
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
        print(f"patch-max baseline, image-level malignant (score = max over the image's patches of P(malignant)): "
              f"{il['n_images']} images, {il['n_positive']} malignant, AUC {_fmt(il['auc']).strip()}, "
              f"pAUC@.8 {_fmt(il['pauc']).strip()}")
    if images is not None:
        from deepminer.image_eval import format_metrics

        rules = ", ".join(f"{n} x {rule}" for rule, n in images["side_rules"].items())
        print()
        print(f"image level (whole image, one prediction each): {images['images']} images, model-input long "
              f"side {images['sides']['min']}..{images['sides']['max']} px ({rules}), "
              f"{images['seconds_per_image']:.2f} s per image")
        for line in format_metrics(images["metrics"]):
            print(line)
        if "silencing" in images:
            from deepminer.image_eval import format_silencing

            print(format_silencing(images["silencing"], list(model.classes)))
    return 0
