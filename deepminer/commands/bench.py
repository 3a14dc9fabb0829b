"""``deepminer bench``: forward vs explain vs Grad-CAM vs sketch IoU vs dissection, side by side."""
from __future__ import annotations

import argparse
from typing import Any

EVAL_REPEATS = 2  # the evaluation-cost rows: at most 2 repeats of 3 images (a peer like IG takes seconds)

NAME = "bench"
HELP = "time forward, one-pass explain, Grad-CAM, sketch IoU and dissection side by side"
DESCRIPTION = (
    "Measures, in one run on the same models and inputs, a 224 px patch and a 1536x908 whole image: the "
    "bare forward, the one-pass explanation, pytorch-grad-cam's Grad-CAM, the sketch IoU over all units, "
    "and dissection throughput vs forward throughput at the same batch size. Repetitions are interleaved; "
    "medians and ratios of medians are printed with PASS/MISS against the targets (explain/forward <= 1.15, "
    "Grad-CAM/explain >= 2.5, sketch IoU <= 20 ms on the whole image, dissection >= 0.8x forward). "
    "--model and --arch may be repeated (e.g. --model model_store/demo/model.pt --arch resnet50). "
    "--serve URL adds the HTTP round trip of a 1024x1024 8-bit PNG vs the first model's forward. "
    "Start-up rows (skip with --no-startup, alone with --startup-only): the wall time of fresh "
    "'python -m deepminer --help' (target <= 0.4 s) and 'deepminer inspect' of a generated 4500x3000 16-bit "
    "DICOM subprocesses, medians of --repeats runs after --warmup. "
    "Evaluation-cost rows (skip with --no-eval; first model, 3 abnormal 512 px phantoms, at most 2 repeats): "
    "the CAM / probability map / top units localization evaluation vs the bare forward (target <= 1.25x), "
    "each post-hoc peer, and the extra cost of deletion/insertion and of a sanity cascade."
)


class _AddModel(argparse.Action):
    """Collect --model / --arch in command-line order into ``args.models``."""

    def __call__(self, parser, namespace, values, option_string=None):
        specs = list(getattr(namespace, "models", None) or [])
        specs.append((self.dest, values))
        namespace.models = specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(models=None)
    parser.add_argument("--model", dest="model", action=_AddModel, metavar="PATH",
                        help="deepminer checkpoint to bench (repeatable) [model_store/demo/model.pt if it exists, "
                             "else --arch efficientnet_lite0]")
    parser.add_argument("--arch", dest="arch", action=_AddModel, metavar="NAME",
                        help="bench a freshly built architecture (repeatable): tiny, resnet18/50/152, "
                             "efficientnet_lite0")
    parser.add_argument("--cases", default="patch,whole", help="comma-separated cases: patch (224x224), "
                                                               "whole (1536x908)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of 224 px patches for dissection "
                                                                   "and its forward")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    parser.add_argument("--no-dissect", action="store_true", help="skip the dissection measurement")
    parser.add_argument("--serve", default=None, metavar="URL",
                        help="also time the HTTP round trip to TorchServe at URL (e.g. http://127.0.0.1:8080)")
    parser.add_argument("--serve-warmup", type=int, default=None, metavar="N",
                        help="untimed requests of one image (answered from the server's feature cache) before "
                             "timing, so TorchServe's Java frontend runs JIT-compiled as on a server that has been "
                             "up a while [200]")
    parser.add_argument("--serve-model", default=None, help="model name on the server [$DEEPMINER_MODEL or demo]")
    parser.add_argument("--key-file", default=None, help="TorchServe key_file.json [$DEEPMINER_KEY_FILE]")
    parser.add_argument("--token", default=None, help="inference token [$DEEPMINER_TOKEN]")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the evaluation-cost rows (CAM localization evaluation vs forward, peers, "
                             "faithfulness, sanity; on the first model)")
    parser.add_argument("--no-startup", action="store_true",
                        help="skip the start-up rows (deepminer --help and inspect as subprocesses)")
    parser.add_argument("--startup-only", action="store_true",
                        help="only the start-up rows: no model is loaded")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def _round_trip(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(one, client)``: ``one(png) -> {"ms", "server_forward_ms", "threads", "device"}`` times one
    request through the project's client (one keep-alive session for the whole run, closed by the
    caller), with what the server says of its own forward pass and threads."""
    import os
    import time

    from deepminer import client
    from deepminer.errors import InputError

    name = args.serve_model or os.environ.get(client.ENV_MODEL) or client.DEFAULT_MODEL
    session = client.Client.from_env(url=args.serve, model=name, token=args.token, key_file=args.key_file)

    def one(png: bytes) -> dict:
        try:
            t0 = time.perf_counter()
            body = session.explain_raw(png)  # upload, server work, download, JSON parsing
            ms = (time.perf_counter() - t0) * 1000
        except client.ServeUnavailable as err:
            raise InputError(f"--serve: {err}; start it with `make run`") from None
        except client.ServeError as err:
            raise InputError(f"--serve {args.serve}: model {name!r} answered {err.status} {err.type}: "
                             f"{err.message}") from None
        server = body.get("server") or {}
        return {"ms": ms, "server_forward_ms": (body.get("timing_ms") or {}).get("forward"),
                "threads": server.get("threads"), "device": server.get("device")}

    return one, session


def _say(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from deepminer import bench
    from deepminer.errors import InputError

    specs = [bench.ModelSpec(kind, value) for kind, value in (args.models or [])] or bench.default_specs()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in bench.CASES:
            raise InputError(f"--cases: unknown case {c!r}; known: {', '.join(bench.CASES)}")
    if args.repeats < 1:
        raise InputError(f"--repeats: must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise InputError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise InputError(f"--device: must be auto, cpu or cuda, got {args.device!r}")
    if args.startup_only:
        if args.no_startup:
            raise InputError("--startup-only and --no-startup exclude each other")
        startup = bench.measure_startup(repeats=args.repeats, warmup=args.warmup, log=_say)
        print(json.dumps(bench.to_json({"startup": startup}), indent=1) if args.json
              else "\n".join(bench.format_startup(startup)))
        return 0
    for s in specs:  # fail fast, before loading anything
        if s.kind == "model" and not Path(s.value).is_file():
            raise InputError(f"{s.value}: no such model file")
        if s.kind == "arch":
            from deepminer.models import arch_spec

            arch_spec(s.value)
    round_trip, serve_client = _round_trip(args) if args.serve else (None, None)
    try:
        if round_trip is not None:  # is the server there? (one untimed request, before the long work)
            from deepminer import client

            with client.Client.from_env(url=args.serve, model=args.serve_model, token=args.token,
                                        key_file=args.key_file) as c:
                if not c.ping():
                    raise InputError(f"--serve: TorchServe is not reachable at {args.serve} (no Healthy /ping); "
                                     "start it with `make run`")
            round_trip(bench.png8_variants(np.full((64, 64), 0.5, np.float32), 1)[0])  # model name, token
        report = bench.run_bench(specs, cases=cases, repeats=args.repeats, warmup=args.warmup,
                                 batch_size=args.batch_size, device=args.device, threads=args.threads,
                                 round_trip=round_trip, serve_url=args.serve, dissect=not args.no_dissect,
                                 serve_warmup=(bench.SERVE_JIT_WARMUP if args.serve_warmup is None
                                               else args.serve_warmup), progress=True)
    finally:
        if serve_client is not None:
            serve_client.close()
    if not args.no_eval:
        from deepminer.evaluation.cost import measure_eval_cost
        from deepminer.runtime import resolve_device

        model, _ = bench.load_spec(specs[0], resolve_device(args.device))
        ev = measure_eval_cost(model, repeats=min(args.repeats, EVAL_REPEATS), log=_say)
        ev["check"] = {"eval_cam_vs_forward": bench.check("eval_cam_vs_forward", ev["eval_cam_vs_forward"])}
        report["eval"] = ev
    if not args.no_startup:  # last: bad input fails above, before these subprocesses (docs/bench.md)
        report["startup"] = bench.measure_startup(repeats=args.repeats, warmup=args.warmup, log=_say)
    if args.json:
        print(json.dumps(bench.to_json(report), indent=1))
    else:
        print(bench.format_table(report))
    return 0
