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

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.errors import InputError
from deepminer.evaluation.catalog import FAITHFULNESS, LOCALIZATION, METRICS
from deepminer.geometry import DEFAULT_MAX_SIDE
from deepminer.model_folder import ModelFolder, is_atlas

RESUME_FORMAT = "deepminer-eval-resume/1"
SANITY_STEPS = 4  #: randomization steps per method: the head, then the last three feature blocks


@dataclass
class EvalConfig:
    """The settings of one evaluation run (all of them go into ``report.json``)."""

    model: str
    data: str
    out: str
    split: str = "test"
    methods: list[str] | None = None
    metrics: list[str] | None = None
    limit: int | None = None
    seed: int = 0
    max_side: int | None = DEFAULT_MAX_SIDE
    atlas: str | None = None
    labels_url: str | None = None
    model_name: str | None = None
    sanity_images: int = 5
    tolerance_px: float = 15.0
    bootstrap: int = 1000
    resume: bool = True


@dataclass
class Context:
    """What the loop needs, loaded once."""

    cfg: EvalConfig
    model: Any
    rows: list[dict]
    methods: list[str]
    metrics: list[str]
    reference: str
    thresholds: np.ndarray | None
    labels: dict[int, str]
    label_source: str
    atlas: Any
    identity: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# -- checks -------------------------------------------------------------------------------------------

def resolve_metrics(names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise InputError(f"--metrics: unknown {', '.join(unknown)}; known: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def split_rows(data: Path, split: str, limit: int | None) -> list[dict]:
    """The manifest rows of ``split`` (``all``: every row), the first ``limit``; one-line errors for a
    missing folder, an empty split or a data set without any lesion mask."""
    from deepminer.data.dataset import read_manifest

    if not (data / "manifest.csv").is_file():
        raise InputError(f"{data}: no manifest.csv (not a dataset folder; see docs/data.md)")
    rows = [r for r in read_manifest(data) if split == "all" or r.get("split") == split]
    if not rows:
        raise InputError(f"{data}: split {split!r} is empty")
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit: must be >= 1, got {limit}")
        rows = rows[:limit]
    if not any(r.get("lesion_mask") for r in rows if r.get("label") != "normal"):
        raise InputError(f"{data}: no lesion mask in split {split!r} (localization needs lesion_mask in manifest.csv)")
    return rows


def _check_classes(model: Any, rows: list[dict], data: Path) -> None:
    labels = sorted({str(r.get("label")) for r in rows})
    missing = [lab for lab in labels if lab not in model.classes]
    if missing:
        raise InputError(f"{data}: labels {', '.join(missing)} are not classes of the model "
                         f"({'/'.join(model.classes)})")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- loading ------------------------------------------------------------------------------------------

def prepare(cfg: EvalConfig) -> Context:
    """Check every input and load the model, atlas and labels (nothing is written yet)."""
    from deepminer.evaluation.methods import reference_method, resolve_methods
    from deepminer.models import load_model, weights_sha256

    model_path, data = Path(cfg.model), Path(cfg.data)
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such model file")
    if not data.is_dir():
        raise InputError(f"{data}: no such dataset folder")
    metrics = resolve_metrics(cfg.metrics)
    rows = split_rows(data, cfg.split, cfg.limit)
    model = load_model(model_path).eval()
    methods = resolve_methods(model, cfg.methods)
    _check_classes(model, rows, data)
    atlas_dir = Path(cfg.atlas) if cfg.atlas else ModelFolder.of(model_path).atlas
    atlas = None
    if is_atlas(atlas_dir):
        from deepminer.atlas import Atlas

        atlas = Atlas.load(atlas_dir)
    elif cfg.atlas:
        raise InputError(f"{atlas_dir}: no atlas.json (--atlas)")
    digest = weights_sha256(model)
    name = cfg.model_name or (model_path.parent.name if model_path.stem == "model" else model_path.stem)
    labels, source = _unit_labels(cfg.labels_url, name, digest, atlas)
    identity = {
        "model": {"name": name, "path": str(model_path.resolve()), "weights_sha256": digest, "arch": model.arch,
                  "head": model.head_type, "classes": list(model.classes),
                  "trained_on": (model.meta or {}).get("trained_on", "not recorded in the checkpoint")},
        "data": {"folder": str(data.resolve()), "manifest_sha256": _file_sha256(data / "manifest.csv"),
                 "split": cfg.split, "images": len(rows)},
        "atlas": None if atlas is None else {"path": str(atlas_dir.resolve()),
                                             "weights_sha256": (atlas.meta.get("model") or {}).get("weights_sha256")},
    }
    return Context(cfg, model, rows, methods, metrics, reference_method(methods),
                   None if atlas is None else np.asarray(atlas.thresholds, dtype=np.float64), labels, source,
                   atlas, identity)


def _unit_labels(url: str | None, name: str, digest: str, atlas: Any) -> tuple[dict[int, str], str]:
    """Unit labels from the label store for these weights, else the atlas's suggested labels."""
    if url:
        from deepminer.labels import LabelStore

        labels = LabelStore(url).labels_for(name, digest)
        if labels:
            return labels, f"label store ({len(labels)} units labelled for {name} @ {digest[:12]})"
    if atlas is not None:
        out = {}
        for u in range(atlas.num_units):
            s = atlas.suggested_label(u)
            if s is not None:
                out[u] = s[0]
        return out, f"atlas suggestions ({len(out)} units with a concept at IoU >= 0.04)"
    return {}, "none (no label store entry and no atlas)"


# -- one image ----------------------------------------------------------------------------------------

def _lesion(data: Path, row: dict, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    path = data / row["lesion_mask"]
    try:
        with Image.open(path) as im:
            m = np.asarray(im) > 0
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable lesion mask ({type(err).__name__})") from None
    if m.shape != shape:
        raise InputError(f"{path}: lesion mask {m.shape[1]}x{m.shape[0]} differs from its image "
                         f"{shape[1]}x{shape[0]} (width x height)")
    return m


def evaluate_image(ctx: Context, row: dict, index: int, *, sanity: bool) -> dict[str, Any]:
    """Every method and metric on one image -> a JSON-able record."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import keep_tissue
    from deepminer.explain.engine import explain_image

    t0 = time.perf_counter()
    data = Path(ctx.cfg.data)
    loaded = load_image(data / row["image"])
    pixels, _ = keep_tissue(loaded.pixels)  # what the server explains
    tissue = pixels > 0
    label = str(row["label"])
    exp = explain_image(ctx.model, pixels, max_side=ctx.cfg.max_side, unit_maps="top")
    rec: dict[str, Any] = {"image_id": row["image_id"], "label": label, "prediction": exp.prediction,
                           "probabilities": exp.probabilities, "abnormal": label != "normal",
                           "report": row.get("report") or "", "methods": {}}
    if label == "normal" or not row.get("lesion_mask"):
        if label != "normal":  # an abnormal image without a lesion mask: counted, not evaluated
            rec["abnormal"], rec["skipped"] = False, "no lesion_mask in manifest.csv"
        rec["seconds"] = time.perf_counter() - t0
        return rec
    lesion = _lesion(data, row, pixels.shape)
    rec["lesion_pixels"] = int(lesion.sum())
    targets = {"truth": model_index(ctx.model, label), "predicted": model_index(ctx.model, exp.prediction)}
    from deepminer.evaluation.localization import LesionTarget

    scored = LesionTarget.make(lesion, tissue)  # the lesion's side of every metric, once per image
    for method in ctx.methods:
        rec["methods"][method] = _method_record(ctx, method, pixels, tissue, lesion, scored, exp, targets, index)
    if "gms" in ctx.metrics:
        rec["gms"] = _gms_record(ctx, exp, targets["truth"], rec["report"])
    if sanity and "sanity" in ctx.metrics:
        rec["sanity"] = {m: _sanity_steps(ctx, m, pixels, tissue, targets["truth"], index) for m in ctx.methods}
    rec["seconds"] = time.perf_counter() - t0
    return rec


def model_index(model: Any, cls: str) -> int:
    return list(model.classes).index(cls)


def _method_record(ctx: Context, method: str, pixels: np.ndarray, tissue: np.ndarray, lesion: np.ndarray,
                   scored: Any, exp: Any, targets: dict[str, int], index: int) -> dict[str, Any]:
    from deepminer.evaluation.localization import localization_metrics, to_image
    from deepminer.evaluation.methods import method_map

    out: dict[str, Any] = {}
    maps: dict[int, np.ndarray] = {}
    for view, target in targets.items():
        t0 = time.perf_counter()
        if target not in maps:
            maps[target] = method_map(method, ctx.model, pixels, tissue, exp, target, thresholds=ctx.thresholds,
                                      seed=ctx.cfg.seed * 1_000_003 + index, max_side=ctx.cfg.max_side)
        cell = maps[target]
        map_ms = (time.perf_counter() - t0) * 1000
        v: dict[str, Any] = {"target": ctx.model.classes[target], "map_ms": map_ms}
        if any(m in ctx.metrics for m in LOCALIZATION):
            got = localization_metrics(to_image(cell, pixels.shape), scored, tolerance_px=ctx.cfg.tolerance_px,
                                       pr=view == "truth")
            if "pr" in got:
                v["pr"] = [_num(x) for x in got.pop("pr")]
            v.update({k: _num(x) for k, x in got.items()})
        if view == "truth" and any(m in ctx.metrics for m in FAITHFULNESS):
            from deepminer.evaluation.faithfulness import deletion_insertion

            f = deletion_insertion(ctx.model, pixels, cell, target, tissue, max_side=ctx.cfg.max_side)
            v.update(deletion=_num(f.deletion_auc), insertion=_num(f.insertion_auc),
                     deletion_curve=[_num(x) for x in f.deletion], insertion_curve=[_num(x) for x in f.insertion],
                     fractions=[_num(x) for x in f.fractions], forwards=int(f.forwards))
        out[view] = v
    return out


def _sanity_steps(ctx: Context, method: str, pixels: np.ndarray, tissue: np.ndarray, target: int,
                  index: int) -> list[dict[str, Any]]:
    from deepminer.evaluation.sanity import cascading_randomization

    def fn(model: Any, image: np.ndarray, cls: int) -> np.ndarray:
        from deepminer.explain.engine import explain_image
        from deepminer.evaluation.methods import method_map

        e = explain_image(model, image, max_side=ctx.cfg.max_side, unit_maps="top")
        return method_map(method, model, image, tissue, e, cls, thresholds=ctx.thresholds,
                          seed=ctx.cfg.seed * 1_000_003 + index, max_side=ctx.cfg.max_side)

    steps = cascading_randomization(ctx.model, pixels, target, fn, seed=ctx.cfg.seed, max_side=ctx.cfg.max_side,
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


def load_resume(ctx: Context) -> dict[str, dict]:
    """Records kept by an earlier run with the same settings, by image id; a one-line error when the
    resume data was made with other settings."""
    folder = resume_dir(Path(ctx.cfg.out))
    header, records = folder / "settings.json", folder / "records.jsonl"
    if not ctx.cfg.resume or not header.is_file():
        return {}
    if json.loads(header.read_text(encoding="utf-8")) != json.loads(json.dumps(_settings_key(ctx))):
        raise InputError(f"{folder}: resume data from a run with other settings; remove it or pass --fresh")
    done: dict[str, dict] = {}
    if records.is_file():
        for line in records.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: that image runs again
                continue
            done[rec["image_id"]] = rec
    return done


def run_images(ctx: Context, *, progress: bool = True,
               on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Evaluate every image (resuming what is kept), appending each record to the resume file."""
    import shutil

    from tqdm import tqdm

    folder = resume_dir(Path(ctx.cfg.out))
    if not ctx.cfg.resume and folder.exists():
        shutil.rmtree(folder)
    done = load_resume(ctx)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(_settings_key(ctx), indent=1), encoding="utf-8")
    records: list[dict] = []
    sanity_left = ctx.cfg.sanity_images - sum(1 for r in done.values() if "sanity" in r)
    bar = tqdm(ctx.rows, desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    with open(folder / "records.jsonl", "a", encoding="utf-8") as fh:
        for i, row in enumerate(bar):
            rec = done.get(row["image_id"])
            if rec is None:
                abnormal = row.get("label") != "normal"
                rec = evaluate_image(ctx, row, i, sanity=abnormal and sanity_left > 0)
                sanity_left -= int("sanity" in rec)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
            records.append(rec)
            if on_record is not None:
                on_record(rec)
    return records


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run everything and write the report folder; returns ``report.json``'s content."""
    from deepminer.atomic import staged_output
    from deepminer.evaluation.report import build_report, write_report

    t0 = time.perf_counter()
    ctx = prepare(cfg)
    out = Path(cfg.out)
    records = run_images(ctx, progress=progress)
    report = build_report(ctx, records, seconds=time.perf_counter() - t0)
    with staged_output(out) as stage:
        write_report(ctx, records, report, stage)
    import shutil

    shutil.rmtree(resume_dir(out), ignore_errors=True)
    return report


def iter_methods(records: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for m in r.get("methods", {}):
            seen[m] = None
    return list(seen)


def env_info() -> dict[str, Any]:
    import platform

    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
