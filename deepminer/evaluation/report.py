"""The evaluation report: per-image rows, the summary with bootstrap intervals and paired
differences against the reference method (:func:`~deepminer.evaluation.results.summary_rows`), sanity
and text results, and the files (``report.json``, ``per_image.csv``, ``summary.csv``, ``figures/*.png``).
Everything here is made from the run's records: no model runs again."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.evaluation.catalog import BASELINES, FAITHFULNESS, LOCALIZATION, LOWER_IS_BETTER, METRICS
from deepminer.evaluation.context import Context
from deepminer.evaluation.results import (MIN_IMAGES_FOR_CI, SUBSETS, VIEWS, ImageRecord, best_worst, classification_summary, clean_json,
                                         curves, summary_rows)

REPORT_FORMAT = "deepminer-explanation-eval/1"


def env_info() -> dict[str, Any]:
    import platform

    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def sanity_summary(ctx: Context, records: list[ImageRecord]) -> dict[str, Any]:
    """Per method: the Spearman correlation after each randomization step, averaged over the sanity
    images, and whether the method passes (below the bound once the head and the last block are random)."""
    from deepminer.evaluation.sanity import SANITY_BOUND

    per: dict[str, list[list[dict]]] = {}
    for r in records:
        for method, steps in (r.sanity or {}).items():
            per.setdefault(method, []).append(steps)
    out: dict[str, Any] = {"bound": SANITY_BOUND, "images": max((len(v) for v in per.values()), default=0),
                           "methods": {}}
    for method, runs in per.items():
        names = [str(s.get("block", i)) for i, s in enumerate(runs[0])]
        spear = np.array([[np.nan if s.get("spearman") is None else s["spearman"] for s in run] for run in runs])
        ssim = np.array([[np.nan if s.get("ssim") is None else s["ssim"] for s in run] for run in runs])
        mean_sp = np.nanmean(spear, axis=0) if spear.size else np.array([])
        check = 1 if len(mean_sp) > 1 else 0
        out["methods"][method] = {"steps": names, "spearman": [float(x) for x in mean_sp],
                                  "ssim": [float(x) for x in np.nanmean(ssim, axis=0)] if ssim.size else [],
                                  "passes": bool(len(mean_sp) and mean_sp[check] < SANITY_BOUND)}
    return out


def gms_summary(ctx: Context, records: list[ImageRecord]) -> dict[str, Any]:
    from deepminer.evaluation.stats import bootstrap_ci
    from deepminer.evaluation.text import DEEPMINER_GMS

    out: dict[str, Any] = {"label_source": ctx.label_source, "deepminer": DEEPMINER_GMS}
    got = [r.gms for r in records if r.gms]
    out["images"] = len(got)
    out["images_with_labels"] = sum(1 for g in got if g.get("top1") is not None)
    for key in ("top1", "top8"):
        vals = np.array([np.nan if g.get(key) is None else g[key] for g in got], dtype=float)
        ci = bootstrap_ci(vals, n_resamples=ctx.cfg.bootstrap, seed=ctx.cfg.seed)
        out[key] = {"mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "n": ci.n}
    shares = [float(g["oov_share"]) for g in got if g.get("oov_share") is not None]
    out["fallback_share"] = float(np.mean(shares)) if shares else None
    return out


def build_report(ctx: Context, records: list[ImageRecord], *, seconds: float) -> dict[str, Any]:
    """``report.json``'s content."""
    abnormal = [r for r in records if r.scored]
    right = sum(1 for r in abnormal if r.prediction == r.label)
    metrics = [m for m in (*LOCALIZATION, *FAITHFULNESS) if m in ctx.metrics]
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "settings": {k: v for k, v in vars(ctx.cfg).items()},
        **ctx.identity,
        "methods": ctx.methods, "reference": ctx.reference, "metrics": {m: METRICS[m] for m in ctx.metrics},
        "counts": {"images": len(records), "abnormal": len(abnormal),
                   "normal_not_evaluated": sum(1 for r in records if r.label == "normal"),
                   "abnormal_without_mask": sum(1 for r in records if r.problem),
                   "true_positive": right, "accuracy_abnormal": right / len(abnormal) if abnormal else None},
        "classification": classification_summary(records, ctx.model.classes, n_resamples=ctx.cfg.bootstrap,
                                                 seed=ctx.cfg.seed),
        "summary": summary_rows(records, methods=ctx.methods, metrics=metrics, views=VIEWS, subsets=SUBSETS,
                                reference=ctx.reference, n_resamples=ctx.cfg.bootstrap, seed=ctx.cfg.seed),
        "seconds": seconds, "env": env_info(),
        "notes": {
            "localization": "abnormal images only, breast-tissue pixels only; maps upsampled to the image "
                            "(bilinear, the engine's cell geometry); pointing tolerance "
                            f"{ctx.cfg.tolerance_px:g} px at the original scale",
            "faithfulness": "ground-truth class; deletion/insertion in 10 steps of 10% of the breast area, "
                            "fill: a Gaussian-blurred copy of the image",
            "intervals": f"95% percentile bootstrap over images, {ctx.cfg.bootstrap} resamples, seed {ctx.cfg.seed}; "
                         f"differences paired against {ctx.reference}",
            "trained_on": ctx.identity["model"].get("trained_on"),
            "classification": "every image explained (normal ones too), from the explanation's probabilities at "
                              f"max_side {ctx.cfg.max_side}: per-class one-vs-rest AUC, abnormal-vs-normal AUC "
                              "(1 - p(normal)), argmax accuracy, confusion (rows truth), top-label ECE (15 bins) and the "
                              "ECE a perfectly calibrated model would show on as many images (ece_if_calibrated); "
                              f"95% bootstrap intervals only when every class has at least {MIN_IMAGES_FOR_CI} "
                              "images",
        },
    }
    if "sanity" in ctx.metrics:
        report["sanity"] = sanity_summary(ctx, records)
    if "gms" in ctx.metrics:
        report["gms"] = gms_summary(ctx, records)
    if "concepts" in ctx.metrics and ctx.atlas is not None:
        from deepminer.evaluation.concepts import concept_discovery

        report["concepts"] = concept_discovery(ctx.atlas)
    return clean_json(report)


def per_image_rows(records: list[ImageRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        base = {"image_id": r.image_id, "label": r.label, "prediction": r.prediction, "abnormal": r.scored,
                "seconds": round(float(r.seconds), 3)}
        if not r.scored:
            rows.append({**base, "method": "", "view": ""})
            continue
        for method, views in r.scores.items():
            for view, v in views.items():
                rows.append({**base, "method": method, "view": view, "target": r.targets.get(view),
                             **{k: v.get(k) for k in (*LOCALIZATION, *FAITHFULNESS)}})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols))
        w.writeheader()
        w.writerows(rows)


def write_report(ctx: Context, records: list[ImageRecord], report: dict[str, Any], out: Path) -> list[Path]:
    """Write the report folder's files into ``out`` (a staging folder)."""
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False), encoding="utf-8")
    _write_csv(out / "per_image.csv", [clean_json(r) for r in per_image_rows(records)])
    _write_csv(out / "summary.csv", [clean_json(r) for r in report["summary"]])
    written = [out / "report.json", out / "per_image.csv", out / "summary.csv"]
    written += write_figures(ctx, records, report, out / "figures")
    return written


def write_figures(ctx: Context, records: list[ImageRecord], report: dict[str, Any], folder: Path) -> list[Path]:
    from deepminer.evaluation import figures
    from deepminer.evaluation.localization import RECALL_GRID

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    rows = [r for r in report["summary"] if r["view"] == "truth" and r["subset"] == "abnormal"]
    for metric in dict.fromkeys(r["metric"] for r in rows):
        path, _order = figures.metric_bars([r for r in rows if r["metric"] == metric], metric,
                                           folder / f"bars_{metric}.png",
                                           title=f"{metric}: {METRICS[metric].split(' (')[0]} (95% bootstrap CI)",
                                           higher_is_better=metric not in LOWER_IS_BETTER)
        paths.append(Path(path))
    abnormal = [r for r in records if r.scored]
    if "auprc" in ctx.metrics and abnormal:
        pr = curves(abnormal, "pr", "truth", ctx.methods, width=RECALL_GRID.size)
        paths.append(Path(figures.pr_curves(pr, RECALL_GRID, folder / "pr_curves.png")))
    if "deletion" in ctx.metrics and abnormal:
        first = abnormal[0].scores[ctx.methods[0]]["truth"]
        fractions = np.array(first.get("fractions") or np.linspace(0, 1, 11))
        paths.append(Path(figures.faithfulness_curves(curves(abnormal, "deletion_curve", "truth", ctx.methods),
                                                      curves(abnormal, "insertion_curve", "truth", ctx.methods),
                                                      fractions, folder / "deletion_insertion.png")))
    if report.get("sanity", {}).get("methods"):
        s = report["sanity"]
        steps = next(iter(s["methods"].values()))["steps"]
        paths.append(Path(figures.sanity_plot({m: v["spearman"] for m, v in s["methods"].items()}, steps,
                                              s["bound"], folder / "sanity.png")))
    if "auprc" in ctx.metrics and abnormal:
        paths.append(_gallery(ctx, abnormal, folder / f"gallery_{ctx.reference}.png"))
    return paths


def _gallery(ctx: Context, abnormal: list[ImageRecord], path: Path, per_side: int = 3) -> Path:
    """The best and worst cases of the reference method by AUPRC, the lesion outlined: the map the
    run kept (:attr:`ImageRecord.saliency`) over the image as the run explained it."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import keep_tissue
    from deepminer.evaluation import figures
    from deepminer.evaluation.localization import to_image
    from deepminer.evaluation.masks import read_lesion
    from deepminer.explanation import normalize_map

    best, worst = best_worst(abnormal, ctx.reference, "truth", "auprc", k=per_side)
    rows_by_id = {r["image_id"]: r for r in ctx.rows}
    data = Path(ctx.cfg.data)
    cases = []
    for tag, group in (("best", best), ("worst", worst)):
        for rec in group:
            if rec.saliency is None:
                continue
            row = rows_by_id[rec.image_id]
            pixels, _ = keep_tissue(load_image(data / row["image"]).pixels)
            auprc = rec.score(ctx.reference, "truth", "auprc")
            cases.append({"title": f"{tag}: {rec.image_id} ({rec.label})",
                          "subtitle": f"{ctx.reference} AUPRC {auprc:.3f}, predicted {rec.prediction}",
                          "image": pixels, "lesion": read_lesion(data / row["lesion_mask"], pixels.shape),
                          "saliency": normalize_map(to_image(rec.saliency, pixels.shape))})
    return Path(figures.gallery(cases, path, title=f"{ctx.reference}: best and worst cases by AUPRC (lesion outlined)"))


def format_table(report: dict[str, Any]) -> str:
    """The summary as a text table: per method (ground-truth class, all abnormal images) each metric's
    mean [95% interval], the sanity result, and whether the difference against the reference excludes 0."""
    rows = [r for r in report["summary"] if r["view"] == "truth" and r["subset"] == "abnormal"]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sanity = (report.get("sanity") or {}).get("methods") or {}
    head = ["method", *metrics, *(["sanity"] if sanity else [])]
    table = [head]
    for m in methods:
        line = [m + (" (baseline)" if m in BASELINES else "")]
        for metric in metrics:
            r = next(x for x in rows if x["method"] == m and x["metric"] == metric)
            cell = "n/a" if r["mean"] is None else f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
            if r.get("diff_excludes_zero"):
                cell += "*"
            line.append(cell)
        if sanity:
            s = sanity.get(m)
            line.append("n/a" if s is None else ("pass" if s["passes"] else "FAIL") +
                        (f" ({s['spearman'][1]:.2f})" if len(s["spearman"]) > 1 else ""))
        table.append(line)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in table]
    c = report["counts"]
    model = report["model"]
    skipped = (f"{c['abnormal_without_mask']} abnormal without a lesion mask skipped; "
               if c.get("abnormal_without_mask") else "")
    lines.insert(0, f"{model['name']} ({model['arch']}, {model['head']} head, trained on {model.get('trained_on')}) "
                    f"on {c['abnormal']} abnormal images ({c['normal_not_evaluated']} normal counted, not evaluated; "
                    f"{skipped}{c['true_positive']} true positives); ground-truth class; mean [95% CI]; "
                    f"* = paired difference vs {report['reference']} excludes 0")
    cl = report.get("classification")
    if cl:
        from deepminer.image_eval import format_metrics

        lines.append(f"how right the model was on the {cl['n']} images explained (whole image, "
                     + ("95% CI" if cl.get("intervals") else
                        f"no intervals: a class has fewer than {cl.get('min_images_for_intervals')} images") + "):")
        lines += ["  " + ln for ln in format_metrics(cl)]
    if report.get("gms"):
        g = report["gms"]
        lines.append(f"GMS (labels: {g['label_source']}): top-1 {_ci(g['top1'])}, top-8 {_ci(g['top8'])} over "
                     f"{g['images_with_labels']} images; DeepMiner on DDSM: {g['deepminer']['top1']} / "
                     f"{g['deepminer']['top8']}")
    if report.get("concepts"):
        cd = report["concepts"]
        share = cd.get("detected_share")
        if share is not None:
            lines.append(f"concepts with a unit at IoU >= 0.04: {share:.2f}")
    return "\n".join(lines)


def _ci(x: dict[str, Any]) -> str:
    return "n/a" if x.get("mean") is None else f"{x['mean']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}] (n={x['n']})"
