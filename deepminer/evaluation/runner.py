"""``deepminer evaluate-explanations``: every method, every metric, the same images, one run.

:func:`evaluate` reads a dataset folder (docs/data.md), explains each image of a split once, makes
every method's map on the CAM grid (:mod:`.methods`), and measures

* **localization** on abnormal images against the lesion mask, over breast-tissue pixels
  (:mod:`.localization`: AUPRC, pointing game, Otsu IoU/Dice, relevance mass), for the image's
  ground-truth class and, as a second view, its predicted class; over all abnormal images and over
  the true positives (CheXlocalize's switch). Normal images are counted, never averaged in;
* **faithfulness** (:mod:`.faithfulness`: deletion/insertion AUC) for the ground-truth class;
* **sanity** (:mod:`.sanity`: cascading randomization) on the first ``sanity_images`` abnormal images;
* **text agreement** (:mod:`.text`: Greedy Matching Score of the top-1 / top-8 labelled units'
  labels against the report line) and **concept discovery** (:mod:`.concepts`, from the atlas);

then bootstrap intervals (:mod:`.stats`) for every mean and for every method's paired difference
against the reference (CAM). Per-image results go to a resume file beside the output as they come
(a killed run continues where it stopped); the report folder is written atomically at the end.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.errors import InputError
from deepminer.evaluation.catalog import FAITHFULNESS, LOCALIZATION
from deepminer.evaluation.context import Context, EvalConfig, prepare
from deepminer.evaluation.results import ImageRecord

RESUME_FORMAT = "deepminer-eval-resume/2"
SANITY_STEPS = 4  #: randomization steps per method: the head, then the last three feature blocks


# -- one image ----------------------------------------------------------------------------------------

def evaluate_image(ctx: Context, row: dict, index: int, *, sanity: bool) -> ImageRecord:
    """Every method and metric on one image."""
    from deepminer.data.dataset import pixel_spacing
    from deepminer.data.io import load_image
    from deepminer.data.tissue import keep_tissue
    from deepminer.evaluation.localization import LesionTarget
    from deepminer.evaluation.masks import read_lesion
    from deepminer.explain.engine import explain_image
    from deepminer.model_scale import input_side

    t0 = time.perf_counter()
    data = Path(ctx.cfg.data)
    loaded = load_image(data / row["image"])
    pixels, _ = keep_tissue(loaded.pixels)  # what the server explains
    tissue = pixels > 0
    label = str(row["label"])
    # the model's own scale unless --max-side was given: the file's or the folder's pixel spacing, else the breast
    scale = input_side(ctx.model, *pixels.shape, max_side=ctx.cfg.max_side,
                       spacing_mm=loaded.spacing_mm or pixel_spacing(data, row), tissue=tissue)
    side = scale[0]
    exp = explain_image(ctx.model, pixels, max_side=None, input_side=scale, unit_maps="top")
    rec = ImageRecord(row["image_id"], label, exp.prediction, probabilities=exp.probabilities,
                      report=row.get("report") or "")
    if label == "normal" or not row.get("lesion_mask"):
        if label != "normal":  # an abnormal image without a lesion mask: counted, not evaluated
            rec.problem = "no lesion_mask in manifest.csv"
        rec.seconds = time.perf_counter() - t0
        return rec
    lesion = read_lesion(data / row["lesion_mask"], pixels.shape)
    rec.lesion_pixels = int(lesion.sum())
    rec.targets = {"truth": label, "predicted": exp.prediction}
    targets = {view: model_index(ctx.model, cls) for view, cls in rec.targets.items()}
    scored = LesionTarget.make(lesion, tissue)  # the lesion's side of every metric, once per image
    for method in ctx.methods:
        rec.scores[method], maps = _method_record(ctx, method, pixels, tissue, scored, exp, targets, index, side)
        if method == ctx.reference:
            rec.saliency = maps[targets["truth"]]
    if "gms" in ctx.metrics:
        rec.gms = _gms_record(ctx, exp, targets["truth"], rec.report)
    if sanity and "sanity" in ctx.metrics:
        rec.sanity = {m: _sanity_steps(ctx, m, pixels, tissue, targets["truth"], index, side) for m in ctx.methods}
    rec.seconds = time.perf_counter() - t0
    return rec


def model_index(model: Any, cls: str) -> int:
    return list(model.classes).index(cls)


def _method_record(ctx: Context, method: str, pixels: np.ndarray, tissue: np.ndarray, scored: Any, exp: Any,
                   targets: dict[str, int], index: int, side: int) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """``{view: metrics}`` of one method, and its maps by class index (the model input's long side ``side``)."""
    from deepminer.evaluation.localization import localization_metrics, to_image
    from deepminer.evaluation.methods import method_map

    out: dict[str, Any] = {}
    maps: dict[int, np.ndarray] = {}
    for view, target in targets.items():
        t0 = time.perf_counter()
        if target not in maps:
            maps[target] = method_map(method, ctx.model, pixels, tissue, exp, target, thresholds=ctx.thresholds,
                                      seed=ctx.cfg.seed * 1_000_003 + index, max_side=None, input_side=side)
        cell = maps[target]
        map_ms = (time.perf_counter() - t0) * 1000
        v: dict[str, Any] = {"map_ms": map_ms}
        if any(m in ctx.metrics for m in LOCALIZATION):
            got = localization_metrics(to_image(cell, pixels.shape), scored, tolerance_px=ctx.cfg.tolerance_px,
                                       pr=view == "truth")
            if "pr" in got:
                v["pr"] = [_num(x) for x in got.pop("pr")]
            v.update({k: _num(x) for k, x in got.items()})
        if view == "truth" and any(m in ctx.metrics for m in FAITHFULNESS):
            from deepminer.evaluation.faithfulness import deletion_insertion

            f = deletion_insertion(ctx.model, pixels, cell, target, tissue, max_side=None, input_side=side)
            v.update(deletion=_num(f.deletion_auc), insertion=_num(f.insertion_auc),
                     deletion_curve=[_num(x) for x in f.deletion], insertion_curve=[_num(x) for x in f.insertion],
                     fractions=[_num(x) for x in f.fractions], forwards=int(f.forwards))
        out[view] = v
    return out, maps


def _sanity_steps(ctx: Context, method: str, pixels: np.ndarray, tissue: np.ndarray, target: int,
                  index: int, side: int) -> list[dict[str, Any]]:
    from deepminer.evaluation.sanity import cascading_randomization

    def fn(model: Any, image: np.ndarray, cls: int) -> np.ndarray:
        from deepminer.explain.engine import explain_image
        from deepminer.evaluation.methods import method_map

        e = explain_image(model, image, max_side=None, input_side=side, unit_maps="top")
        return method_map(method, model, image, tissue, e, cls, thresholds=ctx.thresholds,
                          seed=ctx.cfg.seed * 1_000_003 + index, max_side=None, input_side=side)

    steps = cascading_randomization(ctx.model, pixels, target, fn, seed=ctx.cfg.seed, max_side=None, input_side=side,
                                    max_steps=SANITY_STEPS)
    return [{"index": int(s.index), "block": _short_block(str(s.block)), "spearman": _num(s.spearman),
             "ssim": _num(s.ssim)} for s in steps]


def _short_block(name: str) -> str:
    """A block's name without the wrappers' prefixes (``features.net.blocks.6`` -> ``blocks.6``)."""
    for prefix in ("features.net.", "features."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _gms_record(ctx: Context, exp: Any, target: int, report: str) -> dict[str, Any]:
    from deepminer.evaluation.text import explanation_text_agreement, shared_vectors

    ranked = exp.ranked_units(target, 8)
    labelled = [ctx.labels[u] for u in ranked if u in ctx.labels]
    if not labelled or not report:
        return {"labels": labelled, "top1": None, "top8": None}
    res = explanation_text_agreement(labelled, report, shared_vectors())
    return {"labels": labelled, **{k: (_num(v) if isinstance(v, float) else v) for k, v in res.items()}}


def _num(x: Any) -> float | None:
    """A JSON-able float (NaN -> None)."""
    f = float(x)
    return None if not np.isfinite(f) else f


# -- the run ------------------------------------------------------------------------------------------

def resume_dir(out: Path) -> Path:
    """Where per-image results are kept while a run is going (beside ``out``, removed at the end)."""
    return out.parent / f".{out.name}.resume"


def _settings_key(ctx: Context) -> dict[str, Any]:
    keep = {k: v for k, v in asdict(ctx.cfg).items() if k not in ("out", "resume", "limit", "bootstrap")}
    return {"format": RESUME_FORMAT, "settings": keep, "methods": ctx.methods, "metrics": ctx.metrics,
            "weights_sha256": ctx.identity["model"]["weights_sha256"],
            "manifest_sha256": ctx.identity["data"]["manifest_sha256"]}


def load_resume(ctx: Context) -> dict[str, ImageRecord]:
    """Records kept by an earlier run with the same settings, by image id; a one-line error when the
    resume data was made with other settings."""
    folder = resume_dir(Path(ctx.cfg.out))
    header, records = folder / "settings.json", folder / "records.jsonl"
    if not ctx.cfg.resume or not header.is_file():
        return {}
    if json.loads(header.read_text(encoding="utf-8")) != json.loads(json.dumps(_settings_key(ctx))):
        raise InputError(f"{folder}: resume data from a run with other settings; remove it or pass --fresh")
    done: dict[str, ImageRecord] = {}
    if records.is_file():
        for line in records.read_text(encoding="utf-8").splitlines():
            try:
                rec = ImageRecord.from_json(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: that image runs again
                continue
            done[rec.image_id] = rec
    return done


def run_images(ctx: Context, *, progress: bool = True) -> list[ImageRecord]:
    """Evaluate every image (resuming what is kept), appending each record to the resume file."""
    import shutil

    from tqdm import tqdm

    folder = resume_dir(Path(ctx.cfg.out))
    if not ctx.cfg.resume and folder.exists():
        shutil.rmtree(folder)
    done = load_resume(ctx)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(_settings_key(ctx), indent=1), encoding="utf-8")
    records: list[ImageRecord] = []
    sanity_left = ctx.cfg.sanity_images - sum(1 for r in done.values() if r.sanity)
    bar = tqdm(ctx.rows, desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    with open(folder / "records.jsonl", "a", encoding="utf-8") as fh:
        for i, row in enumerate(bar):
            rec = done.get(row["image_id"])
            if rec is None:
                abnormal = row.get("label") != "normal"
                rec = evaluate_image(ctx, row, i, sanity=abnormal and sanity_left > 0)
                sanity_left -= int(bool(rec.sanity))
                fh.write(json.dumps(rec.to_json()) + "\n")
                fh.flush()
            records.append(rec)
    return records


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run everything and write the report folder; returns ``report.json``'s content."""
    import shutil

    from deepminer.atomic import staged_output
    from deepminer.evaluation.report import build_report, write_report

    t0 = time.perf_counter()
    ctx = prepare(cfg)
    out = Path(cfg.out)
    records = run_images(ctx, progress=progress)
    report = build_report(ctx, records, seconds=time.perf_counter() - t0)
    with staged_output(out) as stage:
        write_report(ctx, records, report, stage)
    shutil.rmtree(resume_dir(out), ignore_errors=True)
    return report
