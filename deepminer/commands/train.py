"""``deepminer train``: fine-tune a classifier on DeepMiner patches (the DeepMiner recipe)."""
from __future__ import annotations

import argparse

NAME = "train"
HELP = "fine-tune a classifier on the DeepMiner patches of a dataset folder"
DESCRIPTION = (
    "Fine-tune ARCH (an FCN with a GAP or WILDCAT head) on the patches of a dataset folder "
    "(DATA/patches.csv if present, else extracted on the fly) with the DeepMiner recipe: SGD lr 1e-4, "
    "momentum 0.9, weight decay 1e-4, batch 32, random flips, class-balanced sampling. Validates "
    "every epoch (loss, per-class AUC and pAUC at TPR 0.8), keeps the lowest-val-loss model as "
    "RUN/best.pt, RUN/last.pt for --resume, and writes RUN/metrics.json and RUN/MODEL_CARD.md. "
    "Uses the GPU when there is one."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.defaults import ARCH_NAMES

    parser.add_argument("--data", required=True, help="dataset folder (with manifest.csv)")
    parser.add_argument("--arch", required=True, help=f"backbone: {', '.join(ARCH_NAMES)}")
    parser.add_argument("--out", required=True, help="run folder to write (last.pt, best.pt, metrics.json, MODEL_CARD.md)")
    parser.add_argument("--head", default="gap", choices=["gap", "wildcat"], help="classification head")
    parser.add_argument("--wildcat-maps", type=int, default=4, metavar="M",
                        help="with --head wildcat: maps per class (a class map is their mean)")
    parser.add_argument("--wildcat-k", type=float, default=0.1, metavar="K",
                        help="with --head wildcat: positions pooled at each end (a fraction in (0, 1) or a count)")
    parser.add_argument("--wildcat-alpha", type=float, default=0.7, metavar="ALPHA",
                        help="with --head wildcat: weight of the k lowest positions in the pooled score")
    parser.add_argument("--epochs", type=int, default=10, help="train until this epoch (counting resumed ones)")
    parser.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    parser.add_argument("--batch-size", type=int, default=32, help="patches per batch")
    parser.add_argument("--patch-size", type=int, default=224, help="patches are resized to this side (px)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0 = in process)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, flips and initialisation")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--max-patches-per-epoch", type=int, default=None,
                        help="draw at most this many training patches per epoch (quick runs)")
    parser.add_argument("--max-val-patches-per-class", type=int, default=None,
                        help="validate on at most this many patches of each class (seeded draw)")
    parser.add_argument("--max-test-patches", type=int, default=None,
                        help="test on a seeded sample of at most this many patches, stratified by class")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop when the validation loss has not improved for this many epochs")
    parser.add_argument("--no-balance", dest="balance", action="store_false",
                        help="plain shuffling instead of class-balanced sampling")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="random initialisation instead of ImageNet weights")
    parser.add_argument("--train-from", default=None, metavar="LAYER",
                        help="freeze the backbone layers before LAYER (e.g. net.blocks.5) and train the rest; "
                             "'head' freezes the whole backbone and trains only the head (a linear probe)")
    parser.add_argument("--cache-features", action="store_true",
                        help="with --train-from: compute the frozen trunk's outputs once (4 flips each) and train "
                             "the rest on them (same result, much faster on CPU)")
    parser.add_argument("--max-train-patches-per-class", type=int, default=None,
                        help="use at most this many training patches of each class (seeded draw)")
    parser.add_argument("--patches", default=None, help="patch table CSV (default: DATA/patches.csv or extract)")
    parser.add_argument("--test-data", default=None,
                        help="another dataset folder (e.g. fresh phantoms) to test best.pt on, all its patches")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the intensity-histogram logistic-regression baseline on the test sets")
    parser.add_argument("--half", action="store_true", help="store best.pt in float16 (half the size)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")


def run(args: argparse.Namespace) -> int:
    import sys

    from deepminer.train import config_from_args, train

    cfg = config_from_args(args)
    metrics = train(cfg, resume=args.resume)
    print(f"{cfg.out}: best epoch {metrics.get('best_epoch')}, {metrics['train_seconds']:.0f} s of training",
          file=sys.stderr)
    for key in ("test", "fresh_test"):
        rep = metrics.get(key)
        if rep:
            aucs = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} n/a" for c, v in rep["auc"].items())
            print(f"{key}: patch AUC {aucs}", file=sys.stderr)
    return 0
