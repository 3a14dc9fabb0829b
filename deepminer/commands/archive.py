"""``deepminer archive``: a TorchServe ``.mar`` for a deepminer checkpoint."""
from __future__ import annotations

import argparse

NAME = "archive"
HELP = "build a TorchServe .mar (weights, handler, the deepminer library, unit atlas, per-model config)"
DESCRIPTION = (
    "Package a deepminer checkpoint for TorchServe: the weights, the DeepMiner handler, a copy of the "
    "deepminer library (the .mar serves on a host with torch and torchvision but without this project), "
    "the unit atlas (thresholds for unit masks and sketch queries) and a per-model config with workers, "
    "batch size, max batch delay and device type. Writes OUT/NAME.mar (only when complete)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="deepminer checkpoint (.pt, from train or save_model)")
    parser.add_argument("--atlas", default=None, help="unit atlas folder (atlas.json + atlas.npz from dissect)")
    parser.add_argument("--name", default="demo", help="model name: the URL is /predictions/NAME")
    parser.add_argument("--out", default="model_store", help="folder for NAME.mar")
    parser.add_argument("--version", default="1.0", help="model version reported by the API")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers for this model, spread over the server's GPUs (None: 1, from serve/model-config.yaml)")
    parser.add_argument("--batch-size", type=int, default=None, help="max requests per batch (None: 4)")
    parser.add_argument("--max-batch-delay", type=int, default=None, help="ms a request waits for others to fill a batch, >= 1 (None: 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="deviceType: auto = a GPU when the server has one, else the CPU")
    parser.add_argument("--no-overwrite", action="store_true", help="fail if OUT/NAME.mar exists")


def run(args: argparse.Namespace) -> int:
    import sys

    from deepminer.commands.explain import import_serve

    archive = import_serve("archive")
    mar = archive.build_mar(args.model, args.out, name=args.name, atlas=args.atlas, version=args.version,
                            workers=args.workers, batch_size=args.batch_size,
                            max_batch_delay=args.max_batch_delay, device=args.device,
                            force=not args.no_overwrite)
    info = archive.mar_contents(mar)
    cfg = info["config"]
    print(f"{mar}: {mar.stat().st_size / 2**20:.1f} MiB, {len(info['files'])} files; workers "
          f"{cfg.get('minWorkers')}, batch {cfg.get('batchSize')}, delay {cfg.get('maxBatchDelay')} ms, "
          f"device {cfg.get('deviceType', 'auto')}, atlas {'yes' if args.atlas else 'no'}", file=sys.stderr)
    return 0
