"""Image-level classification metrics (issue 21): equal to scikit-learn's, ECE by hand, the bootstrap
intervals, temperature scaling and the benign/malignant mix, the ECE of a calibrated model on as many
images."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from deepminer.evaluation.stats import bootstrap_ci
from deepminer.metrics import (calibrated_probabilities, ece_if_calibrated, ece_rows, expected_calibration_error,
                               fit_calibration, fit_temperature, image_level_metrics, rank_auc, reliability_bins,
                               softmax)

CLASSES = ("normal", "benign", "malignant")


def _data(n: int, seed: int = 0, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits, y, probs)`` from a calibrated model: y is drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, size=(n, 3))
    p = softmax(z)
    y = np.array([rng.choice(3, p=row) for row in p])
    return z, y, p


def test_image_metrics_equal_sklearn():
    _, y, p = _data(200, seed=1)
    m = image_level_metrics(y, p, CLASSES, n_boot=200)
    for c, name in enumerate(CLASSES):
        assert m["auc"][name]["value"] == pytest.approx(roc_auc_score(y == c, p[:, c]), abs=1e-12)
    assert m["abnormal_auc"]["value"] == pytest.approx(roc_auc_score(y != 0, 1 - p[:, 0]), abs=1e-12)
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert m["confusion"] == confusion_matrix(y, p.argmax(1), labels=[0, 1, 2]).tolist()
    assert m["counts"] == {n: int((y == c).sum()) for c, n in enumerate(CLASSES)}
    assert m["predicted_counts"] == {n: int((p.argmax(1) == c).sum()) for c, n in enumerate(CLASSES)}
    assert sum(map(sum, m["confusion"])) == m["n"] == 200
    # NLL and Brier by their definitions (sklearn's log_loss / multi-class Brier)
    from sklearn.metrics import log_loss

    assert m["nll"] == pytest.approx(log_loss(y, p, labels=[0, 1, 2]), rel=1e-9)
    assert m["brier"] == pytest.approx(np.mean(np.sum((p - np.eye(3)[y]) ** 2, 1)), rel=1e-12)


def test_rank_auc_equals_sklearn_on_resamples_with_ties():
    """The bootstrap's vectorised AUC is roc_auc_score on each resample (duplicates make ties)."""
    _, y, p = _data(50, seed=2)
    s = np.round(p[:, 2], 1)  # coarse scores: many ties
    idx = np.random.default_rng(0).integers(0, 50, size=(20, 50))
    got = rank_auc((y == 2)[idx], s[idx])
    for row, g in zip(idx, got):
        yb = (y == 2)[row]
        want = roc_auc_score(yb, s[row]) if 0 < yb.sum() < yb.size else float("nan")
        assert (math.isnan(g) and math.isnan(want)) or g == pytest.approx(want, abs=1e-12)
    assert math.isnan(rank_auc(np.zeros(5), np.arange(5.0)))


def test_ece_by_hand():
    # five images, top-label confidence and whether the argmax is right:
    #   a 0.9 right, b 0.9 wrong  -> bin (13/15, 14/15]: accuracy 0.5, confidence 0.9, gap 0.4, weight 2/5
    #   c 0.5 right, d 0.5 wrong  -> bin (7/15, 8/15]:   accuracy 0.5, confidence 0.5, gap 0.0, weight 2/5
    #   e 0.7 right               -> bin (10/15, 11/15]: accuracy 1.0, confidence 0.7, gap 0.3, weight 1/5
    # ECE = 2/5 * 0.4 + 2/5 * 0 + 1/5 * 0.3 = 0.16 + 0.06 = 0.22
    p = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    y = np.array([0, 1, 0, 2, 2])
    assert expected_calibration_error(y, p) == pytest.approx(0.22, abs=1e-12)
    bins = reliability_bins(y, p)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 5
    assert {i: b["count"] for i, b in enumerate(bins) if b["count"]} == {7: 2, 10: 1, 13: 2}
    assert bins[13]["accuracy"] == 0.5 and bins[13]["confidence"] == pytest.approx(0.9)
    assert bins[13]["lo"] == pytest.approx(13 / 15) and bins[13]["hi"] == pytest.approx(14 / 15)
    assert math.isnan(bins[0]["accuracy"])
    m = image_level_metrics(y, p, CLASSES, n_boot=0)
    assert m["ece"] == pytest.approx(0.22, abs=1e-12) and m["reliability"] == bins
    assert math.isnan(m["accuracy"]["lo"])  # no resamples, no interval


def test_bootstrap_intervals():
    _, y, p = _data(60, seed=3)
    a = image_level_metrics(y, p, CLASSES, n_boot=500, seed=7)
    b = image_level_metrics(y, p, CLASSES, n_boot=500, seed=7)
    c = image_level_metrics(y, p, CLASSES, n_boot=500, seed=8)
    assert a == b  # reproducible with the seed
    assert a["accuracy"]["lo"] != c["accuracy"]["lo"] or a["auc"]["benign"]["lo"] != c["auc"]["benign"]["lo"]
    for est in [*a["auc"].values(), a["abnormal_auc"], a["accuracy"]]:
        assert est["lo"] <= est["value"] <= est["hi"]
        assert 0 < est["resamples"] <= 500
    # the accuracy interval is the shared one of evaluation.stats (same draws from the same seed)
    ci = bootstrap_ci((p.argmax(1) == y).astype(float), n_resamples=500, seed=7)
    assert (a["accuracy"]["lo"], a["accuracy"]["hi"]) == pytest.approx((ci.lo, ci.hi), abs=1e-12)
    _, y2, p2 = _data(1500, seed=4)
    big = image_level_metrics(y2, p2, CLASSES, n_boot=500, seed=7)
    for key in ("normal", "benign", "malignant"):
        assert big["auc"][key]["hi"] - big["auc"][key]["lo"] < a["auc"][key]["hi"] - a["auc"][key]["lo"]
    assert big["accuracy"]["hi"] - big["accuracy"]["lo"] < a["accuracy"]["hi"] - a["accuracy"]["lo"]


def test_resamples_without_a_class_are_skipped():
    y = np.array([0] * 30 + [2])  # one malignant image: most resamples miss it
    p = np.tile([0.6, 0.3, 0.1], (31, 1))
    p[-1] = [0.1, 0.1, 0.8]
    m = image_level_metrics(y, p, CLASSES, n_boot=400, seed=0)
    assert math.isnan(m["auc"]["benign"]["value"]) and m["auc"]["benign"]["resamples"] == 0
    assert m["auc"]["malignant"]["value"] == 1.0
    assert 0 < m["auc"]["malignant"]["resamples"] < 400  # about 1 - (30/31)^31 = 64% of them


def test_fit_temperature_recovers_the_scale():
    z, y, _ = _data(20000, seed=5, scale=1.5)
    for factor in (0.5, 2.5):
        t = fit_temperature(z * factor, y)
        assert t == pytest.approx(factor, rel=0.08)
        # calibrating lowers the NLL and the ECE, keeps the argmax
        before = image_level_metrics(y, softmax(z * factor), CLASSES, n_boot=0)
        after = image_level_metrics(y, softmax(z * factor, t), CLASSES, n_boot=0)
        assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
        assert after["confusion"] == before["confusion"]
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.08)
    with pytest.raises(ValueError):
        fit_temperature(z[:, :2], y)


def test_the_mix_by_hand():
    # softmax([0, ln 2, ln 7]) = [0.1, 0.2, 0.7]; benign and malignant mixed at 0.1:
    #   benign 0.9 * 0.2 + 0.1 * 0.7 = 0.25, malignant 0.9 * 0.7 + 0.1 * 0.2 = 0.65, normal stays 0.1
    z = np.log(np.array([[1.0, 2.0, 7.0]]))
    assert calibrated_probabilities(z, 1.0, 0.1) == pytest.approx(np.array([[0.1, 0.25, 0.65]]), abs=1e-12)
    assert calibrated_probabilities(z, 1.0, 0.0) == pytest.approx(softmax(z), abs=1e-15)
    z2, _, _ = _data(50, seed=9)
    q = calibrated_probabilities(z2, 0.7, 0.3)
    assert q.sum(1) == pytest.approx(np.ones(50)) and q[:, 0] == pytest.approx(softmax(z2, 0.7)[:, 0])
    # the order of the pair is kept below 0.5
    assert ((q[:, 2] > q[:, 1]) == (z2[:, 2] > z2[:, 1])).all()


def _labels_of(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random((p.shape[0], 1)) > np.cumsum(p, axis=1)).sum(axis=1)


def test_fit_calibration_recovers_a_known_temperature_and_mix():
    """Labels drawn from softmax(z / 2) with benign and malignant swapped at 8 % (look-alikes): the fit
    finds T and the rate; with no swap, the rate stays near 0 and T is the temperature alone."""
    rng = np.random.default_rng(11)
    z = rng.normal(0.0, 4.0, size=(20000, 3))
    y = _labels_of(calibrated_probabilities(z, 2.0, 0.08), rng)
    fit = fit_calibration(z, y)
    assert fit["temperature"] == pytest.approx(2.0, rel=0.08) and fit["mix"] == pytest.approx(0.08, abs=0.012)
    alone = fit_temperature(z, y)
    assert alone > 2.2  # a temperature alone can only flatten everything to pay for the swaps
    assert fit["nll"] < image_level_metrics(y, softmax(z, alone), CLASSES, n_boot=0)["nll"]
    y0 = _labels_of(softmax(z, 2.0), rng)
    fit0 = fit_calibration(z, y0)
    assert fit0["mix"] < 0.01 and fit0["temperature"] == pytest.approx(fit_temperature(z, y0), rel=0.05)
    t_only = fit_calibration(z, y, pair=None)
    assert t_only["mix"] == 0.0 and t_only["temperature"] == pytest.approx(alone)


def test_ece_of_resamples_and_of_a_calibrated_model():
    _, y, p = _data(300, seed=12)
    right = p.argmax(1) == y
    idx = np.random.default_rng(0).integers(0, 300, size=(20, 300))
    rows = ece_rows(p.max(1)[idx], right[idx])
    assert rows == pytest.approx([expected_calibration_error(y[i], p[i]) for i in idx], abs=1e-12)
    # labels drawn from the probabilities: calibrated; the measured ECE is typical of the draws
    m = image_level_metrics(y, p, CLASSES, n_boot=500, seed=3)
    floor = m["ece_if_calibrated"]
    assert floor["draws"] == 500 and 0.02 < floor["mean"] < floor["q95"] < 0.15
    assert floor["share_at_least"] > 0.05
    assert m["ece_interval"]["lo"] <= m["ece"] <= m["ece_interval"]["hi"]
    # the same probabilities, every top-label answer wrong: far beyond what calibration noise gives
    wrong = (p.argmax(1) + 1) % 3
    bad = image_level_metrics(wrong, p, CLASSES, n_boot=500, seed=3)
    assert bad["ece_if_calibrated"]["share_at_least"] == 0.0
    # the floor shrinks with more images (about 1 / sqrt(N))
    _, _, p_big = _data(3000, seed=13)
    assert ece_if_calibrated(p_big, draws=200).mean() < 0.5 * ece_if_calibrated(p, draws=200).mean()


def test_reliability_diagram_and_card_section(tmp_path):
    from PIL import Image

    from deepminer.evaluation.figures import reliability_diagram
    from deepminer.model_card import image_level_section

    z, y, _ = _data(300, seed=6)
    before = image_level_metrics(y, softmax(z * 2.0), CLASSES, n_boot=100)
    t = fit_temperature(z * 2.0, y)
    after = image_level_metrics(y, softmax(z * 2.0, t), CLASSES, n_boot=100)
    path = reliability_diagram(after["reliability"], tmp_path / "reliability.png", ece=after["ece"],
                               before=before["reliability"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.text["Description"] == "complete"
    empty = reliability_diagram(image_level_metrics([], np.zeros((0, 3)), CLASSES)["reliability"], tmp_path / "e.png")
    with Image.open(empty) as im:
        assert "nothing to draw" in im.text["Description"]
    md = image_level_section(after, uncalibrated=before, temperature=t, figure="reliability.png")
    assert f"| AUC malignant | {after['auc']['malignant']['value']:.3f} [" in md
    assert f"ECE (top-label, 15 bins), before -> after T = {t:.3f} | {before['ece']:.3f} -> {after['ece']:.3f}" in md
    assert "| normal | " + " | ".join(str(v) for v in after["confusion"][0]) in md
    assert "![reliability diagram](reliability.png)" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| (")]
    assert len(rows) == sum(1 for b in after["reliability"] if b["count"])
    plain = image_level_section(image_level_metrics(y, softmax(z), CLASSES, n_boot=0))
    assert "| AUC normal | 0." in plain and "[" not in plain.split("| AUC normal |")[1].split("\n")[0]
