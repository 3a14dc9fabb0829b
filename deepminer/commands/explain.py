"""``deepminer explain``: explain one image through TorchServe (``--url``) or in-process (``--model``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from deepminer.geometry import DEFAULT_MAX_SIDE, MAX_SIDE_RANGE
from deepminer.options import DEFAULTS, UNIT_MAPS

if TYPE_CHECKING:
    from deepminer.explanation import Explanation

NAME = "explain"
HELP = "explain one image: prediction, probabilities, top units, CAM and unit overlays"
DESCRIPTION = (
    "Send IMAGE (PNG/JPEG/TIFF 8/16-bit or DICOM) to TorchServe (--url, default $DEEPMINER_SERVE_URL or "
    "http://127.0.0.1:8080) or run the model in this process without a server (--model PATH). Prints the "
    "prediction, the class probabilities and the most influential units of the predicted class; with "
    "--out DIR also writes the CAM overlay of every class, the overlays of the top units and the API "
    "response (response.json)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (PNG, JPEG, TIFF, DICOM)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="TorchServe inference URL (None: $DEEPMINER_SERVE_URL or http://127.0.0.1:8080)")
    where.add_argument("--model", default=None, help="deepminer checkpoint: run locally, no server")
    parser.add_argument("--name", default=None, help="model name on the server (None: $DEEPMINER_MODEL or demo)")
    parser.add_argument("--atlas", default=None, help="with --model: unit atlas folder (None: atlas/ beside the model, if present)")
    parser.add_argument("--token", default=None, help="inference token (token authorization on)")
    parser.add_argument("--key-file", default=None, help="TorchServe key_file.json, lab profile (None: $DEEPMINER_KEY_FILE)")
    parser.add_argument("--top-units", type=int, default=DEFAULTS["top_units"], help="units listed per class")
    parser.add_argument("--unit-maps", choices=UNIT_MAPS, default=DEFAULTS["unit_maps"], help="unit maps to return")
    parser.add_argument("--max-side", type=int, default=DEFAULTS["max_side"],
                        help=f"long side the image is explained at, at most, {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]} "
                             f"(None: the model's own scale from its checkpoint, by the image's pixel spacing "
                             f"or the breast's extent; a model that records none: {DEFAULT_MAX_SIDE})")
    parser.add_argument("--sketch", default=None, help="mask image (non-zero = sketched region): rank units by IoU")
    parser.add_argument("--ablate", default=None, metavar="IDS",
                        help="unit ids to silence, e.g. 12,40 (at most 256): prints the probabilities with their "
                             "activations set to zero and the change per class")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    parser.add_argument("--out", default=None, help="folder for cam_<class>.png, unit_<id>.png, response.json")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server")
    parser.add_argument("--dicom-out", default=None, metavar="DIR",
                        help="DICOM source only: write the results as DICOM to DIR: seg.dcm (FRACTIONAL Segmentation: "
                             "the CAM + the top units' masks), sr.dcm (TID 1500 Structured Report), sc.dcm (Secondary "
                             "Capture of the overlay), all marked as unverified AI results (docs/dicom.md)")


def _summary(res: Explanation, image: str) -> dict:
    pred = res.prediction
    infl = res.influence_of(pred)
    top = [{"unit": u, "influence": round(float(infl[u]), 4),
            "max_activation": round(float(res.unit_max[u]), 4)} for u in res.top_units.get(pred, [])]
    out = {"image": image, "model": res.model, "prediction": pred,
           "probabilities": {c: round(p, 4) for c, p in res.probabilities.items()},
           "top_units": top, "domain": res.domain, "timing_ms": res.timing_ms,
           "scale": {k: res.input.get(k) for k in ("model_height", "model_width", "scale_source", "model_scale")}}
    if res.sketch_iou is not None:
        order = res.sketch_iou.argsort()[::-1][:len(top) or 8]
        out["sketch_matches"] = [{"unit": int(u), "iou": round(float(res.sketch_iou[u]), 4)} for u in order]
    if res.ablation is not None:
        ab = res.ablation
        out["ablation"] = {"units": list(ab.units), "prediction": ab.prediction,
                           "probabilities": {c: round(p, 4) for c, p in ab.probabilities.items()},
                           "delta": {c: round(d, 4) for c, d in ab.delta.items()}}
    return out


def _write_outputs(res: Explanation, image_bytes: bytes, out: Path, max_side: int) -> list[Path]:
    import json

    from PIL import Image

    from deepminer.atomic import staged_output
    from deepminer.data.io import load_image
    from deepminer.geometry import fit_image
    from deepminer.overlay import heat_overlay

    grey = fit_image(load_image(image_bytes).pixels, max_side)  # overlays at most max_side pixels long
    written = []
    with staged_output(out) as stage:
        for i, cls in enumerate(res.classes):
            Image.fromarray(heat_overlay(grey, res.cam[i])).save(stage / f"cam_{cls}.png")
            written.append(out / f"cam_{cls}.png")
        for unit, fmap in sorted(res.unit_maps.items()):
            Image.fromarray(heat_overlay(grey, fmap)).save(stage / f"unit_{unit:04d}.png")
            written.append(out / f"unit_{unit:04d}.png")
        (stage / "response.json").write_text(json.dumps(res.to_json()), encoding="utf-8")
        written.append(out / "response.json")
    return written


def _atlas_thresholds(model: str | None, atlas: str | None):
    """The unit atlas's thresholds for the units' masks in the DICOM results (``--atlas``, else atlas/
    beside ``--model``); None (half each unit's maximum) through a server or without an atlas."""
    if not model:
        return None
    from deepminer.model_folder import ModelFolder, is_atlas

    folder = Path(atlas) if atlas else ModelFolder.of(model).atlas
    if not is_atlas(folder):
        return None
    from deepminer.atlas import Atlas

    return Atlas.load(folder).thresholds


def _write_dicom(res: Explanation, source, out: Path, thresholds=None) -> list[Path]:
    """SEG + SR + SC of ``res`` beside nothing else; unit labels from the label store when one exists."""
    from deepminer.dicom_results import build_results

    labels: dict[int, str] = {}
    try:
        from deepminer.labels import LabelStore, default_url

        url = default_url()
        if not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).is_file():
            labels = LabelStore(url).labels_for(str(res.model.get("name", "")), str(res.model.get("weights_sha256", "")))
    except Exception:  # noqa: BLE001 - no label store: the units go unlabelled
        labels = {}
    return build_results(source, res, labels=labels, thresholds=thresholds).write(out)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from deepminer import client
    from deepminer.domain import describe as describe_domain
    from deepminer.errors import InputError
    from deepminer.model_scale import describe_scale
    from deepminer.options import ExplainOptions, parse_unit_list

    image_path = Path(args.image)
    if not image_path.is_file():
        raise InputError(f"{image_path}: no such file")
    sketch = None
    if args.sketch:
        from deepminer.data.io import load_image

        sketch = load_image(args.sketch).pixels > 0.5
    # the request's options, checked by the one declaration the server uses (errors name the flag)
    options = ExplainOptions.build(top_units=args.top_units, unit_maps=args.unit_maps, sketch=sketch,
                                   max_side=args.max_side, flags=True,
                                   ablate=parse_unit_list(args.ablate) if args.ablate else None)
    image_bytes = image_path.read_bytes()
    dicom_source = None
    if args.dicom_out:  # refused before any model runs
        from deepminer.dicom_results import read_source

        dicom_source = read_source(image_bytes, name=str(image_path))
    if args.model:
        res = client.local_explain(args.model, image_path, options, atlas=args.atlas, name=args.name)
    else:
        http = client.Client.from_env(url=args.url, model=args.name, token=args.token,
                                      key_file=args.key_file, timeout=args.timeout)
        try:
            res = http.explain(image_bytes, options)
        except client.ServeUnavailable as err:
            raise InputError(f"{err}; start it with `make run` or use --model PATH") from None
        except client.ServeError as err:
            hint = ("; token authorization is on: pass --key-file/--token or set DEEPMINER_KEY_FILE"
                    if err.type == "InvalidKeyException" else "")
            raise InputError(f"{image_path}: server answered {err.status} {err.type}: {err.message}{hint}",
                             status=err.status) from None
        finally:
            http.close()
    summary = _summary(res, str(image_path))
    if args.out:
        summary["files"] = [str(p) for p in _write_outputs(res, image_bytes, Path(args.out), args.max_side or DEFAULT_MAX_SIDE)]
    if dicom_source is not None:
        thresholds = _atlas_thresholds(args.model, args.atlas)
        summary["dicom_files"] = [str(p) for p in _write_dicom(res, dicom_source, Path(args.dicom_out), thresholds)]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    probs = "  ".join(f"{c} {p:.3f}" for c, p in res.probabilities.items())
    print(f"{image_path}: {res.prediction} (p = {res.probabilities[res.prediction]:.3f})")
    print(f"  probabilities  {probs}")
    print(f"  model trained on  {res.model.get('trained_on', 'not recorded')} (not a diagnosis)")
    units = ", ".join(f"{t['unit']} ({t['influence']:+.3g})" for t in summary["top_units"])
    print(f"  top units for {res.prediction} (influence)  {units}")
    print(f"  {describe_domain(res.domain, res.model.get('trained_on'))}")
    print(f"  {describe_scale(res.input)}")
    if "sketch_matches" in summary:
        print("  units matching the sketch (IoU)  "
              + ", ".join(f"{m['unit']} ({m['iou']:.2f})" for m in summary["sketch_matches"]))
    if "ablation" in summary:
        ab = summary["ablation"]
        print(f"  silencing units {', '.join(map(str, ab['units']))}: {ab['prediction']}  "
              + "  ".join(f"{c} {p:.3f} ({ab['delta'][c]:+.3f})" for c, p in ab["probabilities"].items()))
    if args.out:
        print(f"  wrote {len(summary['files'])} files to {args.out}{os.sep}")
    if dicom_source is not None:
        print(f"  wrote SEG, SR and SC (unverified AI results) to {args.dicom_out}{os.sep}")
    return 0
