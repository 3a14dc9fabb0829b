"""Whole-image predictions over a dataset folder (deepminer.image_eval): the server's answer, the
scale rule, the report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepminer.errors import InputError
from deepminer.image_eval import (image_level_report, image_rows, predict_images,
                                  probability_matrix)
from modelfixtures import tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from deepminer.data.phantoms import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("imgeval") / "data", 6, 4, 160, splits={"test": 1.0},
                            label_mix={"normal": 0.34, "benign": 0.33, "malignant": 0.33})


@pytest.fixture(scope="module")
def model():
    return tiny_model(2)


def test_predictions_equal_the_servers_answer(data, model):
    from deepminer.explain.service import ExplainService

    preds = predict_images(model, data, "test", progress=False)
    assert [p["image_id"] for p in preds] == [r["image_id"] for r in image_rows(data, "test")]
    service = ExplainService(model, name="tiny", settings={"keep_freed_memory": False})
    for p in preds[:2]:
        row = next(r for r in image_rows(data, "test") if r["image_id"] == p["image_id"])
        body = (data / row["image"]).read_bytes()
        exp = service.explain(body, {"unit_maps": "none"})
        assert exp.prediction == p["prediction"]
        for c in model.classes:
            assert p["probabilities"][c] == pytest.approx(exp.probabilities[c], abs=1e-6)
        assert p["side"] == min(160, max(exp.input["height"], exp.input["width"]))
        assert p["side_rule"].startswith("default")  # the tiny model records no scale
        assert p["label"] == row["label"] and p["y"] == list(model.classes).index(row["label"])


def test_max_side_limit_and_spacing(data, model, tmp_path):
    small = predict_images(model, data, "test", max_side=96, limit=2, progress=False)
    assert len(small) == 2 and all(p["side"] == 96 and p["side_rule"].startswith("asked") for p in small)
    from deepminer.data.dataset import pixel_spacing

    meta = json.loads((data / "phantoms.json").read_text())
    (tmp_path / "phantoms.json").write_text(json.dumps({**meta, "pixel_spacing_mm": 0.25}))
    assert pixel_spacing(tmp_path) == 0.25
    with pytest.raises(InputError, match="split 'val' is empty"):
        predict_images(model, data, "val")
    with pytest.raises(InputError, match="--limit"):
        predict_images(model, data, "test", limit=0)


def test_spacing_picks_the_side_of_a_scaled_model(data, model, monkeypatch, tmp_path):
    import shutil

    folder = tmp_path / "d"
    shutil.copytree(data, folder)
    meta = json.loads((folder / "phantoms.json").read_text())
    (folder / "phantoms.json").write_text(json.dumps({**meta, "pixel_spacing_mm": 1.5}))
    monkeypatch.setattr(model, "meta", {**(getattr(model, "meta", None) or {}),
                                        "scale": {"long_side": 128, "mm_per_px": 2.0, "breast_extent_px": 60.0}},
                        raising=False)
    preds = predict_images(model, folder, "test", limit=1, progress=False)
    assert preds[0]["side"] == 120 and preds[0]["side_rule"].startswith("pixel spacing")  # 160 * 1.5 / 2.0


def test_report(data, model):
    rep = image_level_report(model, data, "test", n_boot=100, progress=False)
    assert rep["images"] == 6 and rep["metrics"]["n"] == 6
    y, probs = probability_matrix(rep["predictions"], model.classes)
    assert probs.shape == (6, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert sum(map(sum, rep["metrics"]["confusion"])) == 6
    assert sum(rep["side_rules"].values()) == 6


def test_evaluate_command(data, tmp_path, capsys):
    from deepminer.cli import main
    from deepminer.models import save_model

    path = save_model(tiny_model(2), tmp_path / "model.pt", patch_size=48)
    assert main(["evaluate", "--model", str(path), "--data", str(data), "--bootstrap", "100", "--max-side", "128"]) == 0
    out = capsys.readouterr().out
    assert "patch-max baseline, image-level malignant" in out
    assert "image level (whole image, one prediction each): 6 images, model-input long side 128..128 px" in out
    assert "abnormal vs normal AUC" in out and "confusion (rows = truth, columns = predicted):" in out
    assert "silencing the top 5 units of the predicted class (DeepMiner influence) on the 4 benign/malignant images" in out
    assert main(["evaluate", "--model", str(path), "--data", str(data), "--bootstrap", "100", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    m = body["images"]["metrics"]
    assert body["images"]["images"] == 6 and m["n"] == 6 and set(m["auc"]) == {"normal", "benign", "malignant"}
    assert len(body["images"]["predictions"]) == 6 and "image_level" in body["patches"]
    assert body["images"]["silencing"]["images"] == 4 and len(body["images"]["silencing"]["drops"]) == 4
    assert main(["evaluate", "--model", str(path), "--data", str(data), "--silence", "0", "--json"]) == 0
    assert "silencing" not in json.loads(capsys.readouterr().out)["images"]
    assert main(["evaluate", "--model", str(path), "--data", str(data), "--silence", "257"]) != 0
    assert "--silence: must be in 0..256, got 257" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(path), "--data", str(data), "--no-image-level", "--json"]) == 0
    assert "images" not in json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--model", str(path), "--data", str(data), "--max-side", "10"]) == 2
    assert "--max-side: must be in 64..4096, got 10" in capsys.readouterr().err


def test_classification_summary_of_records():
    from deepminer.evaluation.results import MIN_IMAGES_FOR_CI, ImageRecord, classification_summary
    from deepminer.metrics import image_level_metrics

    rng = np.random.default_rng(0)
    classes = ["normal", "benign", "malignant"]
    probs = rng.dirichlet([1, 1, 1], size=3 * MIN_IMAGES_FOR_CI)
    labels = [classes[i % 3] for i in range(len(probs))]
    recs = [ImageRecord(f"i{i}", lab, classes[int(p.argmax())], probabilities=dict(zip(classes, map(float, p))))
            for i, (lab, p) in enumerate(zip(labels, probs))]
    got = classification_summary(recs + [ImageRecord("old", "benign")], classes, n_resamples=200, seed=1)
    want = image_level_metrics([classes.index(lab) for lab in labels], probs, classes, n_boot=200, seed=1)
    assert got["intervals"] is True and got["images_without_probabilities"] == 1
    assert got["auc"] == want["auc"] and got["confusion"] == want["confusion"]
    few = classification_summary(recs[:-1], classes, n_resamples=200)  # malignant: one image short
    assert few["intervals"] is False and np.isnan(few["accuracy"]["lo"]) and few["n"] == len(recs) - 1
    assert classification_summary([ImageRecord("x", "normal")], classes) is None


def test_evaluate_page_classification_tables():
    from deepminer.evaluation.results import ImageRecord
    from ui import evaluate as ev

    classes = ["normal", "benign", "malignant"]
    probs = {"a": [0.7, 0.2, 0.1], "b": [0.1, 0.6, 0.3], "c": [0.2, 0.3, 0.5], "d": [0.5, 0.3, 0.2]}
    labels = {"a": "normal", "b": "benign", "c": "malignant", "d": "malignant"}
    recs = [ImageRecord(i, labels[i], classes[int(np.argmax(p))], probabilities=dict(zip(classes, p)))
            for i, p in probs.items()] + [ImageRecord("x", None, problem="unreadable")]
    cl = ev.classification(recs)
    assert cl["n"] == 4 and cl["intervals"] is False and cl["accuracy"]["value"] == 0.75
    metrics, confusion = ev.classification_rows(cl)
    assert metrics[0] == {"metric": "AUC normal (one-vs-rest)", "value": "1.000", "images": 1}
    assert confusion[2] == {"truth": "malignant", "predicted normal": 1, "predicted benign": 0,
                            "predicted malignant": 1, "total": 2}
    body = json.loads(ev.report_json([], {"dataset": "x"}, classification=cl))
    assert body["classification"]["confusion"] == cl["confusion"] and body["classification"]["accuracy"]["lo"] is None
    assert "classification" not in json.loads(ev.report_json([], {}))
    assert ev.classification([ImageRecord("x", None)]) is None
    assert [m["metric"] for m in metrics if m["metric"].startswith("ECE")][0] == "ECE (top-label, 15 bins)"
    # with enough images: the ECE's interval, and the ECE a calibrated model would show on as many images
    from deepminer.evaluation.results import MIN_IMAGES_FOR_CI

    rng = np.random.default_rng(3)
    p = rng.dirichlet([1, 1, 1], size=3 * MIN_IMAGES_FOR_CI)
    many = [ImageRecord(f"i{i}", classes[i % 3], classes[int(q.argmax())], probabilities=dict(zip(classes, map(float, q))))
            for i, q in enumerate(p)]
    cl = ev.classification(many, n_resamples=200)
    rows = {m["metric"]: m["value"] for m in ev.classification_rows(cl)[0]}
    ece = cl["ece_interval"]
    assert rows["ECE (top-label, 15 bins)"] == f"{ece['value']:.3f} [{ece['lo']:.3f}, {ece['hi']:.3f}]"
    floor = cl["ece_if_calibrated"]
    assert rows["ECE if perfectly calibrated (mean; 95th pct)"] == \
        f"{floor['mean']:.3f}; {floor['q95']:.3f}"
    note = ev.ece_note(cl)
    assert note.startswith(f"ECE {cl['ece']:.3f}: a perfectly calibrated model would show {floor['mean']:.3f}")
    assert ("more than the noise" in note) == (floor["share_at_least"] < 0.05)
    # 4 images, no intervals: the floor is still drawn (it needs no class), and the sentence says it
    few = ev.classification(recs)
    assert few["intervals"] is False and few["ece_if_calibrated"]["draws"] == 1000
    assert "on 4 images" in ev.ece_note(few)


def test_silencing_equals_the_servers_ablation(data, model):
    """predict_images(silence=N): the N units the explanation ranks first for the prediction, and the
    prediction's probability after the server's own ablation of them; the summary counts it on the
    abnormal images only."""
    from deepminer.explain.service import ExplainService
    from deepminer.image_eval import SILENCE_MOVED, silencing_summary

    preds = predict_images(model, data, "test", progress=False, silence=3)
    plain = predict_images(model, data, "test", progress=False)
    service = ExplainService(model, name="tiny", settings={"keep_freed_memory": False})
    for p, q in zip(preds, plain):
        assert p["probabilities"] == q["probabilities"] and "silenced" not in q  # silencing changes no answer
        row = next(r for r in image_rows(data, "test") if r["image_id"] == p["image_id"])
        body = (data / row["image"]).read_bytes()
        full = service.explain(body, {"unit_maps": "none"})
        units = full.ranked_units(full.prediction, 3)
        assert p["silenced"]["units"] == units and len(set(units)) == 3
        ab = service.explain(body, {"unit_maps": "none", "ablate": units}).ablation
        assert p["silenced"]["probability"] == pytest.approx(ab.probabilities[full.prediction], abs=1e-6)
        assert p["silenced"]["drop"] == pytest.approx(full.probabilities[full.prediction]
                                                      - ab.probabilities[full.prediction], abs=1e-6)
    summary = silencing_summary(preds, model.classes, n_boot=200)
    abnormal = [p["silenced"]["drop"] for p in preds if p["label"] != "normal"]
    assert summary["images"] == len(abnormal) == 4 and summary["units"] == 3
    assert summary["moved"] == sum(d >= SILENCE_MOVED for d in abnormal)
    assert summary["share"]["value"] == pytest.approx(summary["moved"] / 4)
    assert summary["median_drop"] == pytest.approx(float(np.median(abnormal)))
    assert summary["share"]["lo"] <= summary["share"]["value"] <= summary["share"]["hi"]
    with pytest.raises(InputError, match="silence"):
        predict_images(model, data, "test", progress=False, silence=-1)


def test_silencing_summary_by_hand():
    from deepminer.image_eval import format_silencing, silencing_summary

    def row(label, drop):
        return {"label": label, "silenced": {"units": [4, 2], "probability": 0.5, "drop": drop}}

    rows = [row("normal", 0.9), row("benign", 0.05), row("malignant", 0.049), row("benign", 0.2), row("malignant", 0.0)]
    s = silencing_summary(rows, ("normal", "benign", "malignant"), n_boot=0)
    assert s["images"] == 4 and s["moved"] == 2 and s["share"] == {"value": 0.5} and s["units"] == 2
    assert s["median_drop"] == pytest.approx(0.0495)
    line = format_silencing(s, ["normal", "benign", "malignant"])
    assert line.startswith("silencing the top 2 units of the predicted class") and "on 2 (50%)" in line
    assert "no benign/malignant image" in format_silencing(silencing_summary(rows[:1], ("normal", "benign", "malignant")),
                                                          ["normal", "benign", "malignant"])
