"""The Markdown model card of a training run (``MODEL_CARD.md``), from its ``metrics.json``
content: command, data, recipe, training curve, test metrics, limitations. Pure text (the
architecture registry is the one model-stack import, for the pretrained weights' name).
"""
from __future__ import annotations

import math
from typing import Any

from deepminer import CLASSES
from deepminer.defaults import PROBE


def fmt_number(v: Any) -> str:
    """A metric as the card prints it: 3 decimals, ``n/a`` for a missing or NaN value."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _metric_rows(rep: dict, name: str) -> list[str]:
    rows = [f"| {name} | " + " | ".join(f"{fmt_number(rep['auc'].get(c))} / {fmt_number(rep['pauc'].get(c))}" for c in CLASSES)
            + f" | {fmt_number(rep.get('accuracy'))} |"]
    base = rep.get("baseline")
    if base:
        rows.append("| histogram baseline (logistic regression) | "
                    + " | ".join(f"{fmt_number(base['auc'].get(c))} / {fmt_number(base['pauc'].get(c))}" for c in CLASSES)
                    + f" | {fmt_number(base.get('accuracy'))} |")
    return rows


def _frozen_text(cfg: dict, metrics: dict) -> str:
    n = metrics.get("frozen_parameters")
    if cfg.get("train_from") == PROBE:
        return f"the whole ImageNet backbone ({n} tensors): only the head was trained (a linear probe)"
    if cfg.get("train_from"):
        return f"layers before `{cfg['train_from']}` ({n} tensors)"
    return "nothing (all layers fine-tuned)"


def fmt_interval(est: dict | None) -> str:
    """``value [lo, hi]`` of an estimate of :func:`deepminer.metrics.image_level_metrics` (``n/a``
    parts where undefined; the interval left out when there is none)."""
    if not est:
        return "n/a"
    v, lo, hi = est.get("value"), est.get("lo"), est.get("hi")
    has_ci = not any(x is None or (isinstance(x, float) and math.isnan(x)) for x in (lo, hi))
    return fmt_number(v) + (f" [{fmt_number(lo)}, {fmt_number(hi)}]" if has_ci else "")


def image_level_section(metrics: dict, *, uncalibrated: dict | None = None, temperature: float | None = None,
                        figure: str | None = None, title: str = "Image level", calibration: str | None = None) -> str:
    """The model card's image-level section (Markdown) from :func:`deepminer.metrics.image_level_metrics`
    of the calibrated probabilities: per-class AUC [95% CI], abnormal-vs-normal AUC, 3-class
    accuracy, ECE (and NLL, Brier) before -> after temperature scaling when ``uncalibrated`` (the same
    metrics at T = 1) and ``temperature`` are given (``calibration``: how the calibration is named
    instead, e.g. :func:`calibration_rule` short), the ECE a perfectly calibrated model would show on
    as many images, the confusion matrix, the reliability table,
    and ``figure`` (a path relative to the card, the PNG of
    :func:`deepminer.evaluation.figures.reliability_diagram`)."""
    m = metrics
    classes = list(m.get("classes") or CLASSES)
    boot = m.get("bootstrap") or {}
    counts = ", ".join(f"{c} {m['counts'].get(c, 0)}" for c in classes)
    lines = [f"## {title}", "",
             f"{m['n']} images ({counts}), one prediction per "
             "whole image. AUC one-vs-rest (score p(class)); abnormal = benign or malignant vs normal (score "
             "1 - p(normal)); accuracy of the argmax over the classes. Brackets: 95% percentile bootstrap over "
             f"images ({boot.get('resamples', 'n/a')} resamples, seed {boot.get('seed', 'n/a')}; a resample "
             "missing a class is skipped for that AUC).", "",
             "| metric | value [95% CI] |", "|---|---|"]
    for c in classes:
        lines.append(f"| AUC {c} | {fmt_interval(m['auc'].get(c))} |")
    lines += [f"| AUC abnormal vs normal | {fmt_interval(m.get('abnormal_auc'))} |",
              f"| accuracy ({len(classes)} classes) | {fmt_interval(m.get('accuracy'))} |"]
    n_bins = len(m.get("reliability") or [])
    floor = m.get("ece_if_calibrated") or {}
    if uncalibrated is not None:
        t = calibration or (f"T = {temperature:.3f}" if temperature is not None else "temperature scaling")
        for key, name in (("ece", f"ECE (top-label, {n_bins} bins)"), ("nll", "NLL"), ("brier", "Brier")):
            lines.append(f"| {name}, before -> after {t} | {fmt_number(uncalibrated.get(key))} -> {fmt_number(m.get(key))} |")
    else:
        if temperature is not None:
            lines.append(f"| temperature | {temperature:.3f} |")
        lines += [f"| ECE (top-label, {n_bins} bins) | {fmt_interval(m.get('ece_interval') or {'value': m.get('ece')})} |",
                  f"| NLL | {fmt_number(m.get('nll'))} |", f"| Brier | {fmt_number(m.get('brier'))} |"]
    if floor.get("draws"):
        lines.append(f"| ECE a perfectly calibrated model would show on these {m['n']} images (mean; 95th "
                     f"percentile; share of {floor['draws']} draws >= the measured) | {fmt_number(floor.get('mean'))}; "
                     f"{fmt_number(floor.get('q95'))}; {fmt_number(floor.get('share_at_least'))} |")
    lines += ["", "Confusion matrix (rows = truth, columns = prediction, images):", "",
              "| truth \\ predicted | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
    for c, row in zip(classes, m["confusion"]):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + f" | {sum(int(v) for v in row)} |")
    lines.append("| predicted | " + " | ".join(str(m['predicted_counts'].get(c, 0)) for c in classes)
                 + f" | {m['n']} |")
    lines += ["", "Reliability (top-label confidence, equal-width bins; empty bins left out):", "",
              "| confidence bin | images | mean confidence | accuracy |", "|---|---|---|---|"]
    for b in m.get("reliability") or []:
        if b.get("count"):
            lines.append(f"| ({b['lo']:.3f}, {b['hi']:.3f}] | {b['count']} | {fmt_number(b.get('confidence'))} | "
                         f"{fmt_number(b.get('accuracy'))} |")
    if figure:
        lines += ["", f"![reliability diagram]({figure})"]
    return "\n".join(lines) + "\n"


def model_card(metrics: dict) -> str:
    """The Markdown model card of a run (from its ``metrics.json`` content)."""
    cfg = metrics["config"]
    lines = [f"# Model card: {cfg['arch']} FCN, {cfg['head']} head (DeepMiner Studio)", "",
             "**Intended use: demonstration and research on interpretability tooling only. Not for clinical "
             "use, not a medical device, not validated on patients.**", "",
             "## Command", "", "```", cfg.get("command") or "(library call)", "```", "",
             "## Data", "", f"Dataset folder `{cfg['data']}`; patches by the DeepMiner rules (side 25% of the "
             "image width, stride 50% of the side, >= 50% breast tissue, 30% lesion rules, malignant over "
             "benign); patient-disjoint splits from the manifest.", "",
             "| split | images | patches | normal | benign | malignant |", "|---|---|---|---|---|---|"]
    for split, s in metrics["data"].items():
        lines.append(f"| {split} | {s['images']} | {s['patches']} | {s['normal']} | {s['benign']} | {s['malignant']} |")
    from deepminer.models import ARCHS

    weights = cfg["pretrained"] and cfg["arch"] in ARCHS and ARCHS[cfg["arch"]].weights
    rec = [f"- architecture `{cfg['arch']}` ({'ImageNet-pretrained' if weights else 'random init'}), "
           f"head `{cfg['head']}`" + (f" ({cfg.get('wildcat_maps')} maps per class, k {cfg.get('wildcat_k')}, "
                                       f"alpha {cfg.get('wildcat_alpha')})" if cfg['head'] == "wildcat" else "")
           + f", patch size {cfg['patch_size']} px (grey, resized crops)",
           f"- SGD lr {cfg['lr']}, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, "
           f"batch {cfg['batch_size']}, at most {cfg['epochs']} epochs"
           + (f" (stopped after {cfg['patience']} epochs without a lower validation loss)" if cfg.get("patience") else "")
           + (f" of {cfg['max_patches_per_epoch']} patches" if cfg.get("max_patches_per_epoch") else ""),
           f"- sampler: {'class-balanced (1/count weights, with replacement)' if cfg['balance'] else 'shuffled'}; "
           "augmentation: random horizontal and vertical flips",
           f"- frozen: {_frozen_text(cfg, metrics)}"
           + ("; the frozen trunk's outputs for every training patch and its 4 flips were computed once and cached "
              "(float16)" if cfg.get("cache_features") else ""),
           (f"- training patches capped at {cfg['max_train_patches_per_class']} per class (seeded draw)"
            if cfg.get("max_train_patches_per_class") else "- all training patches used"),
           (f"- validation patches capped at {cfg['max_val_patches_per_class']} per class (seeded draw; the "
            "validation AUCs below are on that class mix, which has more benign negatives than the full set)"
            if cfg.get("max_val_patches_per_class") else "- all validation patches used"),
           f"- seed {cfg['seed']}; device {metrics.get('device')}; training time {metrics.get('train_seconds')} s"
           + (f" (+ {metrics.get('cache_seconds')} s computing the feature cache)" if cfg.get("cache_features") else ""),
           f"- best checkpoint: epoch {metrics.get('best_epoch')} (lowest validation loss)"]
    lines += ["", "## Recipe", "", *rec, "", "## Training curve", "",
              "| epoch | train loss | val loss | val AUC normal / benign / malignant | seconds |", "|---|---|---|---|---|"]
    init = metrics.get("initial") or {}
    if init:
        a = init["val"]["auc"]
        lines.append(f"| 0 (before) | | {fmt_number(init['val_loss'])} | {fmt_number(a.get('normal'))} / {fmt_number(a.get('benign'))} / "
                     f"{fmt_number(a.get('malignant'))} | |")
    for e in metrics["epochs"]:
        a = e["val"]["auc"]
        lines.append(f"| {e['epoch']}{' *' if e.get('best') else ''} | {fmt_number(e['train_loss'])} | {fmt_number(e['val_loss'])} | "
                     f"{fmt_number(a.get('normal'))} / {fmt_number(a.get('benign'))} / {fmt_number(a.get('malignant'))} | {e['seconds']} |")
    for key, title in (("test", "Test split"), ("fresh_test", "Fresh test set")):
        rep = metrics.get(key)
        if not rep:
            continue
        capped = cfg.get("max_test_patches")
        lines += ["", f"## {title}: `{rep['data']}`", "",
                  (f"A seeded random sample of at most {capped} patches, stratified by class (the class mix "
                   "of the full set is kept, so per-class AUCs estimate those of the full set). "
                   if capped else "")
                  + f"Patch level, {rep['n']} patches ({', '.join(f'{c} {n}' for c, n in rep['counts'].items())}); "
                  "one-vs-rest AUC / pAUC at TPR 0.8 (pAUC normalised to [0, 1]: area of the ROC in the band "
                  "TPR >= 0.8 divided by 0.2; DeepMiner prints the raw area = 0.2 x this).", "",
                  "| scorer | normal | benign | malignant | accuracy |", "|---|---|---|---|---|",
                  *_metric_rows(rep, "this model")]
        il = rep.get("image_level")
        if il:
            lines += ["", f"Image level, patch-max baseline (score = max over the image's {'sampled ' if capped else ''}patches of P(malignant); "
                      f"{il['n_images']} images, {il['n_positive']} malignant): AUC {fmt_number(il['auc'])}, "
                      f"pAUC {fmt_number(il['pauc'])}."]
    lines += ["", "## Limitations", "",
              "- Trained and tested on the data above only; numbers on synthetic phantoms say nothing about "
              "real mammograms.",
              "- Patch-level classifier run fully convolutionally; the class maps are coarse (stride 32).", ""]
    return "\n".join(lines)


def _unit_layer_lines(metrics: dict) -> list[str]:
    """The unit layer's activation and output stride, when the run set them (``--unit-activation``,
    ``--serve-output-stride``)."""
    cfg, unit = metrics["config"], metrics.get("unit_layer") or {}
    out = []
    if cfg.get("unit_activation"):
        out.append(f"- unit layer activation: {cfg['unit_activation']} (trained with it"
                   + ("; EfficientNet-Lite's ReLU6 cap lifted, so the strongest units are not clipped and the "
                      "CAM peaks on the lesion rather than forming a plateau around it)" if cfg["unit_activation"] == "relu"
                      else ")"))
    at = metrics["val"].get("at_training_stride")
    if cfg.get("output_stride"):
        out.append(f"- output stride: {cfg['output_stride']}, trained and served (`--output-stride`)")
    if cfg.get("serve_output_stride") and at:
        out.append(f"- output stride: trained at {at['output_stride']} (cached trunk), served at "
                   f"{unit.get('output_stride')} (the last stride-2 step removed, later convolutions dilated: the "
                   "same weights on a map twice as fine in each direction; DeepLab's train-coarse, serve-fine)")
    return out


def _head_l1_lines(metrics: dict) -> list[str]:
    """The ``--head-l1`` penalty of a run and how many units carry each class (none without it)."""
    l1 = float(metrics["config"].get("head_l1") or 0.0)
    spread = metrics.get("head_weights") or {}
    if not l1:
        return []
    held = ", ".join(f"{c} {v['units_holding_share']}" for c, v in (spread.get("classes") or {}).items())
    return [f"- sparse evidence: {l1:g} x the L1 norm of the head's unit weights added to the loss (`--head-l1`)"
            + (f"; units holding {spread['share']:.0%} of each class's L1 norm, of {spread['units']}: {held}"
               if held else "")]


def whole_image_section(metrics: dict) -> str:
    """The model card's section on the whole-image stage (``deepminer train-whole``), from its run's
    ``metrics.json``: the recipe, the scale and the pooling the checkpoint records, the temperature,
    the validation metrics before training, per epoch and of the kept model, and the wall times."""
    cfg, scale, level = metrics["config"], metrics["scale"], metrics["image_level"]
    data = metrics["data"]
    mm = scale.get("mm_per_px")
    start = metrics.get("start") or {}
    stage = start.get("stage", "patch")
    if cfg["train_from"] == "head":
        trained = "the head only (everything before it frozen)"
    else:
        trained = f"from `{cfg['train_from']}` on (BatchNorm statistics kept)"
    lines = ["## Whole-image stage (`deepminer train-whole`)", "",
             f"Started from the {stage} model `{cfg['model']}`"
             + (f" (every WILDCAT map started at its class's GAP weights x {start['head_rescaled_by']:.3g}, "
                "the scale of the training logits)"
                if start.get("head_converted") and start.get("head_rescaled_by") else "")
             + f"; trained on WHOLE images of `{cfg['data']}` "
             f"({data['train_images']} train, {data['val_images']} val; train labels "
             + ", ".join(f"{c} {n}" for c, n in data["train_labels"].items())
             + ") with image-level labels only (lesion masks never read).", "",
             f"- scale: long side {scale['long_side']} px for an image of the data's size"
             + (f", {mm:.4g} mm per model-input pixel" if mm else "")
             + f"; breast extent (median sqrt of the breast area) {scale['breast_extent_px']:.1f} px",
             f"- trained: {trained}; the frozen trunk's outputs "
             f"cached ({cfg['flips']} flip variant(s) per training image)",
             f"- pooling: {level['pool']}, over the breast cells (cells at least half tissue); 3-class "
             "cross-entropy, classes weighted by 1/frequency",
             (f"- Adam lr {cfg['lr']}, weight decay {cfg['weight_decay']}, batch " if cfg.get("optimizer") == "adam" else
              f"- SGD lr {cfg['lr']}, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, batch ")
             + f"{cfg['batch_size']} images, cosine schedule over {cfg['epochs']} epochs"
             + (f", patience {cfg['patience']}" if cfg.get("patience") else "")
             + f"; kept epoch {metrics['best_epoch']} (lowest validation loss)",
             *_unit_layer_lines(metrics), *_head_l1_lines(metrics),
             f"- calibration: {calibration_rule(level)}, fitted on the validation logits (minimum NLL)"
             + (" at the served output stride" if metrics["val"].get("at_training_stride") else ""),
             f"- wall time: {metrics['seconds']['cache']:.0f} s caching the trunk + {metrics['seconds']['train']:.0f} s "
             "training",
             "", "| validation (images) | accuracy | AUC normal | AUC benign | AUC malignant | AUC abnormal | predicted n/b/m |",
             "|---|---|---|---|---|---|---|"]

    def row(name: str, s: dict) -> str:
        p = s.get("predicted") or {}
        return (f"| {name} | {fmt_number(s.get('accuracy'))} | {fmt_number(s.get('auc_normal'))} | "
                f"{fmt_number(s.get('auc_benign'))} | {fmt_number(s.get('auc_malignant'))} | "
                f"{fmt_number(s.get('auc_abnormal'))} | {'/'.join(str(p.get(c, 0)) for c in CLASSES)} |")

    lines.append(row(f"the {stage} model, before this stage"
                     + (" (its head converted)" if start.get("head_converted") else ""), metrics["initial"]))
    for e in metrics["history"]:
        lines.append(row(f"epoch {e['epoch']} (val loss {e['val_loss']:.4f})", e))
    at = metrics["val"].get("at_training_stride")
    if at:
        lines.append(row(f"kept model at the training stride {at['output_stride']}, T = 1", at))
        lines.append(row(f"kept model as served (stride {metrics['unit_layer']['output_stride']}), T = 1",
                         metrics["val"]["before_temperature"]))
    lines.append(row(f"kept model, calibrated ({calibration_rule(level, short=True)})",
                     metrics["val"]["after_temperature"]))
    lines.append("")
    if metrics["val"].get("calibration"):
        lines.append(calibration_section(metrics["val"]["calibration"], title="### Calibration on the validation images"))
    return "\n".join(lines) + "\n"


def calibration_rule(level: dict, *, short: bool = False) -> str:
    """How a whole-image model's ``meta["image_level"]`` turns pooled logits into probabilities."""
    t = float(level.get("temperature") or 1.0)
    mix = level.get("mix") or {}
    rate = float(mix.get("rate") or 0.0)
    if short:
        return f"T = {t:.3f}" + (f", mix {rate:.3f}" if rate else "")
    rule = f"softmax(pooled logits / T), T = {t:.3f}"
    if rate:
        a, b = mix["classes"]
        rule += (f"; then p({a}) and p({b}) mixed at rate {rate:.3f} (each becomes (1 - {rate:.3f}) x itself + "
                 f"{rate:.3f} x the other: look-alikes, no {a}/{b} answer surer than {1 - rate:.3f})")
    return rule


def calibration_section(report: dict, *, title: str = "## Calibration") -> str:
    """A table of :func:`deepminer.whole_image.fit_image_calibration`'s report: validation NLL and
    ECE before calibration, with the temperature alone, and with the fitted calibration."""
    lines = [title, "", f"Fitted by {report.get('fitted', 'minimum NLL')}: {report.get('rule', '')}.", "",
             "| probabilities | T | mix | NLL | ECE |", "|---|---|---|---|---|"]
    for key, name in (("before", "pooled logits, softmax (T = 1)"), ("temperature_alone", "temperature alone"),
                      ("calibrated", "calibrated (what is served)")):
        r = report.get(key)
        if r:
            lines.append(f"| {name} | {r['temperature']:.3f} | {r['mix']:.3f} | {fmt_number(r['nll'])} | "
                         f"{fmt_number(r['ece'])} |")
    return "\n".join(lines) + "\n"
