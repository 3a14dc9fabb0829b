"""``deepminer train-whole``: the whole-image training stage (docs/training.md, section 2b)."""
from __future__ import annotations

import argparse

NAME = "train-whole"
HELP = "train a patch model's top layers and head on whole images at its serving scale (image labels only)"
DESCRIPTION = (
    "Start from a patch model (deepminer train) and train its layers from --train-from on, and its head, on "
    "WHOLE images of a dataset folder brought to the model's scale (--long-side for an image of the data's size), "
    "with image-level labels only (lesion masks are never read): the head pools its class maps over the breast "
    "cells (GAP: mean; WILDCAT: top-k + alpha x bottom-k, k a share of the breast cells), 3-class cross-entropy, "
    "class-balanced. The frozen trunk's outputs (flip variants per image) are computed once and kept in memory. Keeps "
    "the lowest-validation-loss epoch, fits a temperature and a benign/malignant mixing rate on the validation logits "
    "(deepminer calibrate refits them on other images), and writes RUN/best.pt "
    "(recording its scale, pooling and calibration, which the server, the CLI and the workbench use) and "
    "RUN/metrics.json. The GPU is used when there is one. Trained on what --data holds: for the bundled models, "
    "synthetic phantoms only."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.whole_image import WholeImageConfig as C

    parser.add_argument("--model", required=True, help="the patch model to start from (our checkpoint format)")
    parser.add_argument("--data", required=True, help="dataset folder with train and val splits (manifest.csv)")
    parser.add_argument("--out", required=True, help="run folder to write (best.pt, metrics.json); must not hold a run")
    parser.add_argument("--head", default=None, choices=["gap", "wildcat"],
                        help="head of the whole-image model (default: the patch model's); wildcat from a GAP model "
                             "starts every map of a class at that class's weights, scaled down to the training logits' "
                             "temperature (top-k pooling of those maps is many times their mean)")
    parser.add_argument("--wildcat-maps", type=int, default=C.wildcat_maps, metavar="M", help="maps per class")
    parser.add_argument("--wildcat-k", type=float, default=C.wildcat_k, metavar="K",
                        help="cells pooled at each end: a share (0, 1) of the breast cells, or a count")
    parser.add_argument("--wildcat-alpha", type=float, default=C.wildcat_alpha, metavar="ALPHA",
                        help="weight of the k lowest cells")
    parser.add_argument("--wildcat-surround", type=float, default=C.wildcat_surround, metavar="BETA",
                        help="local surround: each class map minus BETA x the mean of its cells 2 away, before pooling "
                             "(a cell is evidence by how much it stands out from its neighbourhood; 0: plain WILDCAT)")
    parser.add_argument("--long-side", type=int, default=C.long_side,
                        help="model-input long side of an image of the data's size (the model's scale)")
    parser.add_argument("--train-from", default=C.train_from, metavar="LAYER",
                        help="train this layer and those after it (and the head); 'head' = the head only (a probe)")
    parser.add_argument("--cache-at", default=None, metavar="LAYER",
                        help="where the cached frozen trunk ends (default: --train-from; with 'head', the whole backbone); "
                             "e.g. net.blocks.5 for a probe, to share the GAP run's --trunk-cache")
    parser.add_argument("--epochs", type=int, default=C.epochs, help="at most this many epochs")
    parser.add_argument("--patience", type=int, default=C.patience,
                        help="stop when the validation loss has not improved for this many epochs")
    parser.add_argument("--optimizer", default=C.optimizer, choices=["sgd", "adam"],
                        help="sgd (with --momentum) or adam: with --head-l1, adam moves every weight at about the "
                             "same pace, so the penalty zeroes the units the loss does not need (SGD shrinks them all)")
    parser.add_argument("--lr", type=float, default=C.lr, help="learning rate (cosine schedule)")
    parser.add_argument("--momentum", type=float, default=C.momentum, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=C.weight_decay, help="weight decay (L2)")
    parser.add_argument("--head-l1", type=float, default=C.head_l1, metavar="LAMBDA",
                        help="add LAMBDA x the L1 norm of the head's unit weights to the loss: a class's evidence "
                             "then rests on fewer units, so silencing its top units moves its answer (0: none)")
    parser.add_argument("--batch-size", type=int, default=C.batch_size, help="images per batch")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per split (quick runs)")
    parser.add_argument("--flips", type=int, default=C.flips, choices=[1, 2, 4],
                        help="flip variants of each training image: 1 none, 2 + left-right, 4 + up-down")
    parser.add_argument("--trunk-cache", default=None, metavar="FILE",
                        help="keep the frozen trunk's outputs in FILE.train / FILE.val and reuse them when the data, "
                             "scale, trunk weights and flips are the same (e.g. the GAP and the WILDCAT run)")
    parser.add_argument("--seed", type=int, default=C.seed, help="seed of sampling, flips and subsets")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--unit-activation", default=None, choices=["relu6", "relu"],
                        help="the unit layer's activation (default: as the start model has it); relu lifts "
                             "EfficientNet-Lite's ReLU6 cap, which flattens the CAM around a lesion")
    parser.add_argument("--output-stride", type=int, default=None, metavar="N",
                        help="train (and serve) at this output stride (16 for a 32-stride backbone; the trunk cache "
                             "is then computed at 16: about 4x the cost of the last stages)")
    parser.add_argument("--serve-output-stride", type=int, default=None, metavar="N",
                        help="serve the trained model at this output stride (16 for a 32-stride backbone: the last "
                             "stride-2 step removed, later convolutions dilated, the same weights on a map twice as "
                             "fine); trained at its own stride, the temperature is fitted at N")
    parser.add_argument("--half", action="store_true", help="store best.pt in float16 (half the size)")


def run(args: argparse.Namespace) -> int:
    import sys

    from deepminer.whole_image import WholeImageConfig, command_line, train_whole

    cfg = WholeImageConfig(
        model=args.model, data=args.data, out=args.out, head=args.head, wildcat_maps=args.wildcat_maps,
        wildcat_k=args.wildcat_k, wildcat_alpha=args.wildcat_alpha,
        wildcat_surround=args.wildcat_surround, long_side=args.long_side,
        train_from=args.train_from, cache_at=args.cache_at, epochs=args.epochs, patience=args.patience, lr=args.lr,
        momentum=args.momentum, optimizer=args.optimizer, weight_decay=args.weight_decay, head_l1=args.head_l1, batch_size=args.batch_size, limit=args.limit,
        flips=args.flips, trunk_cache=args.trunk_cache, seed=args.seed, device=args.device, half=args.half,
        unit_activation=args.unit_activation, output_stride=args.output_stride,
        serve_output_stride=args.serve_output_stride,
        command=command_line(sys.argv[2:] if len(sys.argv) > 2 else []))
    m = train_whole(cfg)
    val = m["val"]["after_temperature"]
    mix = (m["image_level"].get("mix") or {}).get("rate", 0.0)
    print(f"{cfg.out}: best epoch {m['best_epoch']}, temperature {m['image_level']['temperature']:.3f}, "
          f"benign/malignant mix {mix:.3f}, "
          f"{m['seconds']['cache']:.0f} s caching + {m['seconds']['train']:.0f} s training; val: accuracy "
          f"{val['accuracy']:.3f}, malignant AUC {val['auc_malignant']}, abnormal AUC {val['auc_abnormal']}",
          file=sys.stderr)
    return 0
