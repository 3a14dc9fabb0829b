"""``deepminer explain``: explain one image through TorchServe (``--url``) or in-process (``--model``)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

NAME = "explain"
HELP = "explain one image: prediction, probabilities, top units, CAM and unit overlays"
DESCRIPTION = (
    "Send IMAGE (PNG/JPEG/TIFF 8/16-bit or DICOM) to TorchServe (--url, default $DEEPMINER_SERVE_URL or "
    "http://127.0.0.1:8080) or run the model in this process without a server (--model PATH). Prints the "
    "prediction, the class probabilities and the most influential units of the predicted class; with "
    "--out DIR also writes the CAM overlay of every class, the overlays of the top units and the API "
    "response (response.json)."
)


def import_serve(name: str) -> ModuleType:
    """``serve.<name>`` from the project checkout (the ``serve`` package sits beside ``deepminer``;
    it is not installed, so the checkout root is put on the path when needed). Imported lazily:
    the library itself never imports ``serve``."""
    from deepminer.errors import InputError

    try:
        return importlib.import_module(f"serve.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("serve", f"serve.{name}"):
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "serve" / f"{name}.py").is_file():
        raise InputError(f"serve/{name}.py not found beside the deepminer package ({root}): run from the project checkout")
    sys.path.insert(0, str(root))
    return importlib.import_module(f"serve.{name}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (PNG, JPEG, TIFF, DICOM)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="TorchServe inference URL (None: $DEEPMINER_SERVE_URL or http://127.0.0.1:8080)")
    where.add_argument("--model", default=None, help="deepminer checkpoint: run locally, no server")
    parser.add_argument("--name", default=None, help="model name on the server (None: $DEEPMINER_MODEL or demo)")
    parser.add_argument("--atlas", default=None, help="with --model: unit atlas folder (None: atlas/ beside the model, if present)")
    parser.add_argument("--token", default=None, help="inference token (token authorization on)")
    parser.add_argument("--key-file", default=None, help="TorchServe key_file.json, lab profile (None: $DEEPMINER_KEY_FILE)")
    parser.add_argument("--top-units", type=int, default=8, help="units listed per class")
    parser.add_argument("--unit-maps", choices=("none", "top", "all"), default="top", help="unit maps to return")
    parser.add_argument("--max-side", type=int, default=None, help="long side the image is explained at, 64..4096 (None: the server's default, 1024)")
    parser.add_argument("--sketch", default=None, help="mask image (non-zero = sketched region): rank units by IoU")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    parser.add_argument("--out", default=None, help="folder for cam_<class>.png, unit_<id>.png, response.json")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server")


def _summary(res, image: str) -> dict:
    pred = res.prediction
    infl = res.influence.get(pred)
    top = [{"unit": u, "influence": round(float(infl[u]), 4) if infl is not None else None,
            "max_activation": round(float(res.unit_max[u]), 4)} for u in res.top.get(pred, [])]
    out = {"image": image, "model": res.model, "prediction": pred,
           "probabilities": {c: round(p, 4) for c, p in res.probabilities.items()},
           "top_units": top, "timing_ms": res.timing_ms}
    if res.sketch_iou is not None:
        order = res.sketch_iou.argsort()[::-1][:len(top) or 8]
        out["sketch_matches"] = [{"unit": int(u), "iou": round(float(res.sketch_iou[u]), 4)} for u in order]
    return out


def _write_outputs(res, image_bytes: bytes, out: Path, max_side: int) -> list[Path]:
    import json

    import numpy as np
    from PIL import Image

    from deepminer.data.dataset import staged_output
    from deepminer.data.io import load_image
    from deepminer.overlay import heat_overlay

    grey = load_image(image_bytes).pixels
    f = max_side / max(grey.shape)
    if f < 1:  # overlays at most max_side pixels long
        size = (max(1, round(grey.shape[1] * f)), max(1, round(grey.shape[0] * f)))
        grey = np.asarray(Image.fromarray(grey, mode="F").resize(size, Image.BOX))
    written = []
    with staged_output(out) as stage:
        for i, cls in enumerate(res.classes):
            Image.fromarray(heat_overlay(grey, res.cam[i])).save(stage / f"cam_{cls}.png")
            written.append(out / f"cam_{cls}.png")
        for unit, fmap in sorted(res.unit_maps.items()):
            Image.fromarray(heat_overlay(grey, fmap)).save(stage / f"unit_{unit:04d}.png")
            written.append(out / f"unit_{unit:04d}.png")
        (stage / "response.json").write_text(json.dumps(res.raw), encoding="utf-8")
        written.append(out / "response.json")
    return written


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from deepminer.errors import InputError

    image_path = Path(args.image)
    if not image_path.is_file():
        raise InputError(f"{image_path}: no such file")
    if args.top_units < 1:
        raise InputError(f"--top-units: must be >= 1, got {args.top_units}")
    if args.max_side is not None and not 64 <= args.max_side <= 4096:
        raise InputError(f"--max-side: must be in 64..4096, got {args.max_side}")
    image_bytes = image_path.read_bytes()
    sketch = None
    if args.sketch:
        from deepminer.data.io import load_image

        sketch = load_image(args.sketch).pixels > 0.5
    client_mod = import_serve("client")
    if args.model:
        res = client_mod.local_explain(args.model, image_path, top_units=args.top_units, unit_maps=args.unit_maps,
                                       sketch=sketch, max_side=args.max_side, atlas=args.atlas, name=args.name)
    else:
        client = client_mod.Client.from_env(url=args.url, model=args.name, token=args.token,
                                            key_file=args.key_file, timeout=args.timeout)
        try:
            res = client.explain(image_bytes, top_units=args.top_units, unit_maps=args.unit_maps, sketch=sketch,
                                 max_side=args.max_side)
        except client_mod.ServeUnavailable as err:
            raise InputError(f"{err}; start it with `make run` or use --model PATH") from None
        except client_mod.ServeError as err:
            hint = ("; token authorization is on: pass --key-file/--token or set DEEPMINER_KEY_FILE"
                    if err.type == "InvalidKeyException" else "")
            raise InputError(f"{image_path}: server answered {err.status} {err.type}: {err.message}{hint}",
                             status=err.status) from None
        finally:
            client.close()
    summary = _summary(res, str(image_path))
    if args.out:
        summary["files"] = [str(p) for p in _write_outputs(res, image_bytes, Path(args.out), args.max_side or 1024)]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    probs = "  ".join(f"{c} {p:.3f}" for c, p in res.probabilities.items())
    print(f"{image_path}: {res.prediction} (p = {res.probabilities[res.prediction]:.3f})")
    print(f"  probabilities  {probs}")
    units = ", ".join(f"{t['unit']} ({t['influence']:+.3g})" for t in summary["top_units"])
    print(f"  top units for {res.prediction} (influence)  {units}")
    if "sketch_matches" in summary:
        print("  units matching the sketch (IoU)  "
              + ", ".join(f"{m['unit']} ({m['iou']:.2f})" for m in summary["sketch_matches"]))
    if args.out:
        print(f"  wrote {len(summary['files'])} files to {args.out}{os.sep}")
    return 0
