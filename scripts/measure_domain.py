"""Measure a model's out-of-domain guard (docs/domain.md): the share of fresh phantoms of each
generator size in domain, and of each kind of non-phantom image (tests/domainkinds.py) out of domain.

    PYTHONPATH=. python scripts/measure_domain.py --model model_store/demo/model.pt --count 50 --seed 23

Not a test (minutes); prints one table and writes it as JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--domain", default=None, help="domain file (default: domain.pt beside the model)")
    p.add_argument("--sizes", default="512,768,1024,1536")
    p.add_argument("--count", type=int, default=50, help="fresh phantoms per size")
    p.add_argument("--seed", type=int, default=23, help="phantom seed (never used for fitting: fit uses 11)")
    p.add_argument("--json", default=None)
    p.add_argument("--no-kinds", action="store_true")
    args = p.parse_args()

    import numpy as np
    import torch

    import domainkinds
    from deepminer.commands.domain_fit import phantom_image
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_region
    from deepminer.domain import load_domain
    from deepminer.models import load_model

    torch.set_num_threads(1)
    model = load_model(args.model).eval()
    path = Path(args.domain) if args.domain else Path(args.model).parent / "domain.pt"
    domain = load_domain(path, model=model)

    def judge(data: bytes) -> dict:
        loaded = load_image(data)
        _, frac, region = tissue_region(loaded.pixels)
        return domain.judge(model=model, pixels=loaded.pixels, region=region, tissue_fraction=frac)

    t0 = time.perf_counter()
    out: dict = {"model": args.model, "domain": str(path), "threshold": domain.threshold, "phantoms": {}, "kinds": {}}
    sizes = [int(s) for s in args.sizes.split(",")]
    for k, size in enumerate(sizes):
        scores, inside = [], 0
        for i in range(args.count):
            v = judge(phantom_image(args.seed, k * args.count + i, size))
            scores.append(v["score"])
            inside += bool(v["in_domain"])
        out["phantoms"][size] = {"in_domain": inside, "n": args.count, "median": float(np.median(scores)),
                                 "max": float(np.max(scores))}
        print(f"phantoms {size}: {inside}/{args.count} in domain (score median {np.median(scores):.1f}, "
              f"max {np.max(scores):.1f}; threshold {domain.threshold:.1f})", flush=True)
    if not args.no_kinds:
        kinds = dict(domainkinds.kinds())
        kinds["film/scanned_mammogram"] = domainkinds.film_mammogram
        for name, fn in kinds.items():
            v = judge(fn())
            out["kinds"][name] = v
            print(f"{name:32s} {'in ' if v['in_domain'] else 'OUT'} score {v['score']:10.1f} "
                  f"({v['score'] / domain.threshold:6.2f}x) {v['reason'] or ''}", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{out['seconds']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
