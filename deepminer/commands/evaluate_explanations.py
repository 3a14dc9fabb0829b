"""``deepminer evaluate-explanations``: localization, faithfulness, sanity and text agreement of every
explanation method on the same images."""
from __future__ import annotations

import argparse

from deepminer.evaluation.catalog import DESCRIPTIONS, METRICS

NAME = "evaluate-explanations"
HELP = "is the explanation right? every method's localization, faithfulness, sanity and text agreement"
DESCRIPTION = (
    "Explain every image of one split of a dataset folder (manifest.csv + lesion masks, e.g. phantoms or a "
    "CBIS-DDSM import) and measure each explanation method on the same images, with 95% bootstrap intervals "
    "and paired differences against CAM. Writes OUT/report.json, per_image.csv, summary.csv and "
    "figures/*.png; per-image results are kept beside OUT as they come, so a killed run resumes where it "
    "stopped. Normal images are counted, not evaluated. The bundled models are trained on synthetic "
    "phantoms: their numbers on real mammograms mean nothing."
)
EPILOG = "\n".join(["methods (--methods):", *(f"  {k:<21} {v}" for k, v in DESCRIPTIONS.items()),
                    "metrics (--metrics):", *(f"  {k:<21} {v}" for k, v in METRICS.items())])




def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.geometry import DEFAULT_MAX_SIDE, MAX_SIDE_RANGE

    parser.add_argument("--model", required=True, help="model checkpoint (e.g. model_store/demo/model.pt)")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv with lesion_mask)")
    parser.add_argument("--out", required=True, help="report folder to write (replaced when the run completes)")
    parser.add_argument("--split", default="test", help="split to evaluate (train, val, test, holdout or all)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (None: every method the model has)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metrics: auprc, pointing, iou, dice, relevance_mass, deletion, "
                             "insertion, sanity, gms, concepts (None: all)")
    parser.add_argument("--limit", type=int, default=None, help="the first N images of the split (None: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline, the bootstrap and sanity")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"long side images are explained at, at most, {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]} "
                             "(None: the model's own scale, as the server does: the image's or the folder's "
                             f"pixel spacing, else the breast's extent; a model that records none: {DEFAULT_MAX_SIDE})")
    parser.add_argument("--atlas", default=None,
                        help="unit atlas (thresholds for unit masks, suggested labels; None: atlas/ beside the model)")
    parser.add_argument("--labels", default=None,
                        help="label store URL (e.g. sqlite:///var/labels.db): unit labels for GMS; "
                             "None: the atlas's suggested labels")
    parser.add_argument("--model-name", default=None, help="model name the labels are stored under (None: from the path)")
    parser.add_argument("--sanity-images", type=int, default=5,
                        help="abnormal images the cascading randomization runs on (it costs one pass per step)")
    parser.add_argument("--tolerance", type=float, default=15.0, help="pointing-game tolerance in original pixels")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--fresh", action="store_true", help="ignore per-image results kept by an earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    from deepminer.errors import InputError
    from deepminer.evaluation.report import format_table
    from deepminer.evaluation.runner import EvalConfig, evaluate
    from deepminer.geometry import MAX_SIDE_RANGE

    if args.max_side is not None and not MAX_SIDE_RANGE[0] <= args.max_side <= MAX_SIDE_RANGE[1]:
        raise InputError(f"--max-side: must be in {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]}, got {args.max_side}")
    if args.sanity_images < 0:
        raise InputError(f"--sanity-images: must be >= 0, got {args.sanity_images}")
    if args.bootstrap < 100:
        raise InputError(f"--bootstrap: must be >= 100, got {args.bootstrap}")
    cfg = EvalConfig(model=args.model, data=args.data, out=args.out, split=args.split, methods=_list(args.methods),
                     metrics=_list(args.metrics), limit=args.limit, seed=args.seed, max_side=args.max_side,
                     atlas=args.atlas, labels_url=args.labels, model_name=args.model_name,
                     sanity_images=args.sanity_images, tolerance_px=args.tolerance, bootstrap=args.bootstrap,
                     resume=not args.fresh)
    report = evaluate(cfg, progress=not args.quiet)
    print(format_table(report))
    print(f"wrote {args.out}/report.json, per_image.csv, summary.csv, figures/")
    return 0
