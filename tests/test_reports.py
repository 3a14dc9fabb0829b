"""DeepMiner and Lu & Perer explanations from a plain unit -> label mapping."""
import numpy as np
import pytest

from deepminer.errors import InputError
from deepminer.explain import Explanation, UnitMaps, deepminer_explanation, explain_image, label_report
from modelfixtures import box_sketch, random_image, tiny_model

CLASSES = ("normal", "benign", "malignant")


def make_explanation(sketch_iou=None) -> Explanation:
    """12 units; for 'malignant' the influence order is 11, 10, 9, ..., 0 (unit u: u + 1)."""
    k = 12
    influence = np.zeros((3, k), np.float32)
    influence[2] = np.arange(1, k + 1)
    influence[0] = -np.arange(k)
    unit_max = np.linspace(0.5, 6.0, k).astype(np.float32)  # unit u: 0.5 + 0.5 u
    maps = np.stack([np.full((2, 3), u, np.float16) for u in range(k)])
    cam = np.zeros((3, 2, 3), np.float32)
    cam[2] = [[0, 1, 2], [3, 4, 5]]
    return Explanation(
        classes=CLASSES, probabilities={"normal": 0.05, "benign": 0.08, "malignant": 0.87}, prediction="malignant",
        class_maps=np.zeros((3, 2, 3), np.float32), cam=cam, unit_max=unit_max, influence=influence,
        top_units={}, unit_maps=UnitMaps(maps), sketch_iou=sketch_iou, input={"height": 20, "width": 30, "scale": 1.0},
        timing_ms={})


def test_deepminer_explanation_picks_labelled_units_among_the_top_8():
    e = make_explanation()
    # top 8 for malignant: 11, 10, 9, 8, 7, 6, 5, 4; unit 3 is 9th
    labels = {11: "spiculation", "9": "pleomorphic calcifications", 8: "spiculation", 3: "mass", 6: "",
              7: "  architectural   distortion ", 5: "lobulated mass", 4: "round mass"}
    out = deepminer_explanation(e, labels)
    assert out["class"] == "malignant" and out["probability"] == pytest.approx(0.87)
    assert [u["unit"] for u in out["units"]] == [11, 9, 8, 7, 5]  # at most 5, in influence order
    assert [u["rank"] for u in out["units"]] == [1, 3, 4, 5, 7]
    assert out["units"][0]["influence"] == 12.0 and out["units"][0]["max_activation"] == pytest.approx(6.0)
    assert np.array_equal(out["units"][1]["map"], np.full((2, 3), 9.0)) and np.array_equal(out["cam"], e.cam[2])
    assert out["sentence"] == ("Malignant (0.87): most influenced by units labelled spiculation, "
                               "pleomorphic calcifications, architectural distortion, lobulated mass.")
    assert [u["unit"] for u in deepminer_explanation(e, labels, max_units=2, among=3)["units"]] == [11, 9]


def test_deepminer_explanation_without_labels():
    e = make_explanation()
    out = deepminer_explanation(e, {3: "mass", 0: "fat"})  # labelled, but not among the top 8
    assert out["units"] == []
    assert out["sentence"] == "Malignant (0.87): none of its 8 most influential units is labelled yet."
    with pytest.raises(InputError, match="unit 12 out of range"):
        deepminer_explanation(e, {12: "x"})
    with pytest.raises(InputError, match="not a whole number"):
        deepminer_explanation(e, {"u7": "x"})


def test_label_report_means_by_hand():
    iou = np.linspace(0, 0.55, 12).astype(np.float32)  # unit u: 0.05 u
    e = make_explanation(sketch_iou=iou)
    rows = label_report(e, {1: "mass", 3: "mass", 10: "calcification", 2: "", 11: "calcification", 4: "fat"})
    assert [r["label"] for r in rows] == ["calcification", "fat", "mass"]  # by mean max activation
    calc, fat, mass = rows
    assert calc["units"] == [10, 11] and calc["mean_max_activation"] == pytest.approx((5.5 + 6.0) / 2)
    assert calc["mean_sketch_iou"] == pytest.approx((0.5 + 0.55) / 2)
    assert mass["units"] == [1, 3] and mass["mean_max_activation"] == pytest.approx((1.0 + 2.0) / 2)
    assert mass["mean_sketch_iou"] == pytest.approx((0.05 + 0.15) / 2)
    assert fat["mean_max_activation"] == pytest.approx(2.5)
    assert label_report(make_explanation(), {1: "mass"})[0]["mean_sketch_iou"] is None
    assert label_report(e, {}) == []


def test_reports_on_a_real_explanation():
    model, img = tiny_model(0), random_image((96, 96), 0)
    sketch = box_sketch(img.shape, slice(30, 60), slice(30, 60))
    e = explain_image(model, img, max_side=None, sketch=sketch)
    top = e.top_units[e.prediction]
    out = deepminer_explanation(e, {top[1]: "spiculation", top[0]: "calcification"})
    assert [u["unit"] for u in out["units"]] == top[:2]
    assert out["sentence"].startswith(f"{e.prediction.capitalize()} ({e.probabilities[e.prediction]:.2f}): ")
    rows = label_report(e, {u: "all" for u in range(32)})
    assert rows[0]["mean_max_activation"] == pytest.approx(float(e.unit_max.mean()), rel=1e-6)
    assert rows[0]["mean_sketch_iou"] == pytest.approx(float(e.sketch_iou.mean()), rel=1e-5)
