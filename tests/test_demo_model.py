"""The bundled demo model: it loads, is small, records both stages, and is right on whole fresh phantoms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "model_store" / "demo"
FRESH_SEED = 5          # the demo model was trained on seed 12 and tested on seeds 7 and 21 (MODEL_CARD.md)


def test_demo_model_files_and_card():
    from deepminer.models import load_model

    path = DEMO / "model.pt"
    assert path.is_file(), "model_store/demo/model.pt is missing"
    assert path.stat().st_size <= 20e6
    model = load_model(path)
    assert model.arch == "efficientnet_lite0" and model.head_type == "gap"
    assert model.classes == ("normal", "benign", "malignant")
    assert model.meta["patch_size"] >= 64 and model.meta["seed"] is not None
    card = (DEMO / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card.lower()
    assert "deepminer train" in card and "histogram baseline" in card and "--seed" in card
    metrics = json.loads((DEMO / "metrics.json").read_text())
    patch = metrics["patch_stage"]["fresh_test"]                  # the patch stage (the start model)
    assert patch["auc"]["malignant"] >= 0.85                       # the recorded result (0.944, MODEL_CARD.md)
    assert patch["baseline"]["auc"]["malignant"] < patch["auc"]["malignant"] - 0.1
    whole = metrics["fresh_test"]["metrics"]                       # the served model on whole images
    assert whole["abnormal_auc"]["value"] >= 0.95 and whole["auc"]["malignant"]["value"] >= 0.85


@pytest.mark.slow
def test_demo_model_is_right_on_whole_fresh_phantoms(tmp_path):
    """What the issue measured as broken (a GAP demo that never predicted normal on a whole image):
    60 whole phantoms of a seed it never saw, at 1024 px, explained as the server explains them (the
    model's own scale from the phantoms' recorded spacing), every class predicted, AUCs well above
    chance (the recorded 200-image test: whole_image.json, MODEL_CARD.md)."""
    from sklearn.metrics import roc_auc_score

    from deepminer.data.phantoms import generate_dataset
    from deepminer.image_eval import predict_images, probability_matrix
    from deepminer.models import load_model

    model = load_model(DEMO / "model.pt")
    data = tmp_path / "fresh"
    generate_dataset(data, 60, FRESH_SEED, size=1024, splits={"train": 0, "val": 0, "test": 1, "holdout": 0}, jobs=2)
    preds = predict_images(model, data, "test", progress=False)
    assert all(p["side_rule"].startswith("pixel spacing") for p in preds)
    y, probs = probability_matrix(preds, model.classes)
    predicted = set(probs.argmax(1).tolist())
    assert predicted == {0, 1, 2}, f"classes predicted: {sorted(predicted)}"
    assert roc_auc_score(y > 0, 1 - probs[:, 0]) >= 0.9
    assert roc_auc_score(y == 2, probs[:, 2]) >= 0.8
    assert (probs.argmax(1) == y).mean() >= 0.7
