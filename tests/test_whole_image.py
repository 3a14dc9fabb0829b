"""The whole-image training stage (``deepminer train-whole``, issue 21): a tiny run learns a planted
lesion signal from image-level labels only and predicts all three classes; the checkpoint records its
scale, pooling and temperature; the engine's image rule pools over the breast cells."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepminer import CLASSES
from deepminer.data.dataset import SYNTHETIC_PHANTOMS, write_manifest
from deepminer.data.io import png16
from deepminer.errors import InputError
from deepminer.explain.engine import explain_image, image_probabilities
from deepminer.models import build_model, load_model, save_model
from deepminer.models.fcn import breast_cells
from deepminer.metrics import fit_temperature
from deepminer.whole_image import WholeImageConfig, train_whole

H, W = 96, 64


def _image(rng: np.random.Generator, label: str) -> np.ndarray:
    """A 'breast' (a half ellipse against the left edge, textured), black outside; benign images
    carry one grey disc, malignant ones a brighter, larger one; the lesion is small (a few per cent of
    the breast), so pooling over the whole image must find it."""
    yy, xx = np.mgrid[0:H, 0:W]
    breast = ((yy - H / 2) / (0.45 * H)) ** 2 + (xx / (0.9 * W)) ** 2 <= 1
    img = np.where(breast, 0.35 + 0.08 * rng.standard_normal((H, W)), 0.0)
    cy, cx = rng.integers(int(0.3 * H), int(0.7 * H)), rng.integers(6, int(0.5 * W))
    if label == "benign":
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 0.7
    elif label == "malignant":
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 1.0
    return np.clip(img, 0, 1) * breast


def _dataset(folder, n_per_class: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for split, n in n_per_class.items():
        for label in CLASSES:
            for i in range(n):
                iid = f"{split}_{label}_{i}"
                img = _image(rng, label)
                (folder / "images" / f"{iid}.png").write_bytes(png16((img * 4095).round().astype(np.uint16), bits=12))
                rows.append({"image_id": iid, "patient_id": iid, "view": "CC", "split": split, "label": label,
                             "image": f"images/{iid}.png", "lesion_mask": "", "report": ""})
    write_manifest(folder, rows)
    (folder / "phantoms.json").write_text(json.dumps({"size": H, "pixel_spacing_mm": 0.5}), encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    data = root / "data"
    _dataset(data, {"train": 24, "val": 10, "test": 10}, seed=0)
    torch.manual_seed(0)
    patch = build_model("tiny", num_classes=3, pretrained=False)
    save_model(patch, root / "patch.pt", patch_size=32)
    cfg = WholeImageConfig(model=str(root / "patch.pt"), data=str(data), out=str(root / "run"), long_side=H,
                           train_from="block2", epochs=15, lr=0.2, batch_size=8, flips=2, patience=None)
    metrics = train_whole(cfg, progress=False)
    return root, data, metrics


def test_learns_a_planted_signal_from_image_labels_and_predicts_every_class(trained):
    root, data, metrics = trained
    model = load_model(root / "run" / "best.pt")
    val = metrics["val"]["after_temperature"]
    assert val["accuracy"] >= 0.9, val
    assert all(v > 0 for v in val["predicted"].values()), val
    # held-out test images, explained as the server would (engine, the model's scale and rule)
    from deepminer.data.dataset import read_manifest
    from deepminer.data.io import load_image

    right, seen = 0, set()
    for r in read_manifest(data):
        if r["split"] != "test":
            continue
        e = explain_image(model, load_image(str(data / r["image"])).pixels, max_side=None, unit_maps="none")
        assert e.probability_rule.startswith("whole image: breast cells: mean"), e.probability_rule
        right += e.prediction == r["label"]
        seen.add(e.prediction)
    assert right >= 26 and seen == set(CLASSES), (right, seen)


def test_the_checkpoint_records_its_scale_pooling_and_temperature(trained):
    root, _, metrics = trained
    model = load_model(root / "run" / "best.pt")
    scale, level = model.meta["scale"], model.meta["image_level"]
    assert scale["long_side"] == H and scale["mm_per_px"] == pytest.approx(0.5)
    assert 0 < scale["breast_extent_px"] < H
    assert level["temperature"] == pytest.approx(metrics["image_level"]["temperature"]) and level["temperature"] > 0
    assert model.meta["trained_on"] == SYNTHETIC_PHANTOMS  # the data folder is a phantom set (phantoms.json)
    # the frozen layers did not move
    start = load_model(root / "patch.pt")
    assert torch.equal(start.features.block1[0].weight, model.features.block1[0].weight)
    assert not torch.equal(start.features.block4[0].weight, model.features.block4[0].weight)


def test_the_image_rule_pools_over_breast_cells_only_and_applies_the_temperature():
    torch.manual_seed(1)
    model = build_model("tiny", num_classes=3, pretrained=False).eval()
    model.meta = {"image_level": {"pool": "breast cells: mean", "temperature": 2.0}}
    logits = torch.randn(1, 3, 4, 5)
    cells = torch.zeros(4, 5, dtype=torch.bool)
    cells[1:3, 0:2] = True
    p, rule, window = image_probabilities(model, logits, (64, 80), cells=cells)
    want = torch.softmax(logits[0][:, cells].mean(1) / 2.0, 0)  # by hand: mean of the 4 cells, / T
    assert torch.allclose(p, want, atol=1e-6) and window is None and "4 of 20 cells" in rule
    # the breast cells of a tissue-masked input: a cell is breast when >= half its pixels are tissue
    x = torch.zeros(1, 1, 8, 8)
    x[..., :, :3] = 0.5   # columns 0-2: tissue; cells are 4x4 px -> the left cell column has 3/4 tissue
    assert breast_cells(x, (2, 2))[0].tolist() == [[True, False], [True, False]]
    assert breast_cells(torch.zeros(1, 1, 8, 8), (2, 2)).all()  # no tissue at all: every cell


def test_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, size=(4000, 3))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(true_logits * 3.0, y)  # logits 3x too confident
    assert t == pytest.approx(3.0, rel=0.1)


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such dataset folder"):
        train_whole(WholeImageConfig(model=str(tmp_path / "m.pt"), data=str(tmp_path / "none"), out=str(tmp_path / "o")))
    with pytest.raises(InputError, match="--flips"):
        WholeImageConfig(model="m", data=str(tmp_path), out="o", flips=3).check()


def test_a_converted_wildcat_head_starts_at_the_scale_of_its_training_logits():
    """GAP weights copied into a WILDCAT head give top-k logits many times too large; the head is
    multiplied by 1 / T (T fitted on the training logits), which by the pooling's homogeneity scales
    every logit by exactly that factor and keeps every argmax; it never grows the head."""
    from deepminer.whole_image import _evaluate, _rescale_head

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("tiny", head="wildcat", num_classes=3, pretrained=False, wildcat_k=0.1).eval()
    feats = [torch.relu(torch.randn(1, model.num_units, 5, 4)) for _ in range(300)]
    cells = [torch.ones(1, 5, 4, dtype=torch.bool) for _ in feats]
    with torch.no_grad():
        z = torch.cat([model.pool(model.class_logits(f), c) for f, c in zip(feats, cells)]).numpy()
        spread = 2.0 / float(z.std(0).mean())  # logits of a useful spread (a std of about 2)
        z = z * spread
        model.head.conv.weight.mul_(40.0 * spread)
        model.head.conv.bias.mul_(40.0 * spread)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p])  # drawn from the unscaled head's probabilities
    cache = type("Cache", (), {"__len__": lambda self: len(feats)})()
    cache.feats, cache.cells, cache.labels = feats, cells, labels
    before, _ = _evaluate(model, torch.nn.Identity(), cache, 16, "cpu")
    factor = _rescale_head(model, torch.nn.Identity(), cache, 16, "cpu")
    after, _ = _evaluate(model, torch.nn.Identity(), cache, 16, "cpu")
    assert factor == pytest.approx(1 / 40, rel=0.25)
    np.testing.assert_allclose(after, before * factor, rtol=1e-4, atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all()
    # a training set the head already separates asks for larger logits: the head is left as it is
    cache.labels = before.argmax(1)
    assert _rescale_head(model, torch.nn.Identity(), cache, 16, "cpu") == 1.0


@pytest.mark.parametrize(("surround", "epochs", "lr", "floor"), [(0.0, 3, 0.01, 0.9), (2.0, 8, 0.05, 0.8)])
def test_a_wildcat_head_trained_from_a_whole_image_gap_model(trained, surround, epochs, lr, floor):
    """`--head wildcat` from a GAP model: every map starts at its class's weights, brought to the scale
    of the training logits, and the run trains the WILDCAT head only (`--train-from head`); with a
    local surround too (`--wildcat-surround`), recorded in the checkpoint and its pooling rule."""
    root, data, _ = trained
    cfg = WholeImageConfig(model=str(root / "run" / "best.pt"), data=str(data), out=str(root / f"wc{surround:g}"),
                           long_side=H, head="wildcat", wildcat_k=0.1, train_from="head", epochs=epochs, lr=lr,
                           batch_size=8, flips=1, patience=None, wildcat_surround=surround)
    metrics = train_whole(cfg, progress=False)
    assert 0 < metrics["initial"]["head_rescaled_by"] <= 1.0
    assert metrics["start"] == {"model": cfg.model, "stage": "whole-image", "head_converted": True,
                                "head_rescaled_by": metrics["initial"]["head_rescaled_by"]}
    gap, model = load_model(root / "run" / "best.pt"), load_model(Path(cfg.out) / "best.pt")
    assert model.head_type == "wildcat" and model.meta["image_level"]["pool"].startswith("breast cells: wildcat")
    assert model.head.surround == surround and ("ring mean" in model.meta["image_level"]["pool"]) == bool(surround)
    assert torch.equal(gap.features.block4[0].weight, model.features.block4[0].weight)  # only the head trained
    # the GAP model's own records travel on: its whole-image stage and the patch model it started from
    assert model.meta["start_whole_image"] == gap.meta["whole_image"] and model.meta["patch_model"] == gap.meta["patch_model"]
    from deepminer.model_card import whole_image_section

    text = whole_image_section(metrics)
    assert "Started from the whole-image model" in text and "trained: the head only" in text
    assert "| the whole-image model, before this stage (its head converted) |" in text
    # it starts where the GAP model was (a positive multiple of its unit weights; a surround changes the maps
    # it pools, so only without one: there it starts at chance) and ends right (chance 1/3)
    assert surround or metrics["initial"]["accuracy"] >= 0.8
    assert metrics["val"]["after_temperature"]["accuracy"] >= floor


def test_head_l1_concentrates_the_evidence_on_fewer_units(trained):
    """`--head-l1` (with `--optimizer adam`, the bundled `wildcat`'s recipe): the same head-only run with an
    L1 penalty on the unit weights ends with a smaller L1 norm and fewer units holding 90% of it (by hand
    from the checkpoint, and as metrics.json says), and still classifies."""
    from deepminer.whole_image import head_weight_spread

    root, data, _ = trained

    def run(l1: float, optimizer: str):
        cfg = WholeImageConfig(model=str(root / "run" / "best.pt"), data=str(data), out=str(root / f"l1_{l1:g}"),
                               long_side=H, head="wildcat", wildcat_k=0.1, train_from="head", epochs=3, lr=0.01,
                               batch_size=8, flips=1, patience=None, head_l1=l1, optimizer=optimizer)
        metrics = train_whole(cfg, progress=False)
        return metrics, load_model(Path(cfg.out) / "best.pt")

    (m0, plain), (m1, sparse) = run(0.0, "sgd"), run(0.05, "adam")
    assert m1["config"]["head_l1"] == 0.05 and sparse.meta["whole_image"]["config"]["optimizer"] == "adam"

    def holding(model, share=0.9):  # by hand: units, largest |w| first, until their sum reaches the share
        out = []
        for row in model.unit_weights.detach().abs().numpy():
            srt = np.sort(row)[::-1]
            out.append(int(np.searchsorted(np.cumsum(srt), share * srt.sum()) + 1))
        return out

    for metrics, model in ((m0, plain), (m1, sparse)):
        got = metrics["head_weights"]["classes"]
        assert [got[c]["units_holding_share"] for c in CLASSES] == holding(model)
        assert head_weight_spread(model) == metrics["head_weights"]
    l1_plain = plain.unit_weights.detach().abs().sum(1)
    l1_sparse = sparse.unit_weights.detach().abs().sum(1)
    assert (l1_sparse < 0.8 * l1_plain).all()
    assert sum(holding(sparse)) < sum(holding(plain))
    assert m1["val"]["after_temperature"]["accuracy"] >= 0.8  # chance 1/3
    from deepminer.model_card import whole_image_section

    held = ", ".join(f"{c} {n}" for c, n in zip(CLASSES, holding(sparse)))
    assert f"`--head-l1`); units holding 90% of each class's L1 norm, of {sparse.num_units}: {held}" in whole_image_section(m1)
    assert "--head-l1" not in whole_image_section(m0)
    assert "- Adam lr 0.01, weight decay" in whole_image_section(m1) and "- SGD lr 0.01, momentum 0.9" in whole_image_section(m0)
    with pytest.raises(InputError, match="--head-l1"):
        WholeImageConfig(model="m", data=str(data), out="o", head_l1=-1.0).check()
    with pytest.raises(InputError, match="--optimizer"):
        WholeImageConfig(model="m", data=str(data), out="o", optimizer="rmsprop").check()


def test_the_image_rule_mixes_benign_and_malignant_at_the_recorded_rate():
    """A checkpoint's calibration mix (``meta["image_level"]["mix"]``): the engine's torch rule equals
    :func:`deepminer.metrics.calibrated_probabilities` on the pooled logits, and says so in the rule."""
    from deepminer.metrics import calibrated_probabilities

    torch.manual_seed(2)
    model = build_model("tiny", num_classes=3, pretrained=False).eval()
    model.meta = {"image_level": {"pool": "breast cells: mean", "temperature": 0.8,
                                  "mix": {"classes": ["benign", "malignant"], "rate": 0.1}}}
    logits = torch.randn(1, 3, 4, 5) * 3
    p, rule, _ = image_probabilities(model, logits, (64, 80))
    want = calibrated_probabilities(logits[0].mean((1, 2))[None].double().numpy(), 0.8, 0.1, (1, 2))[0]
    assert np.allclose(p.numpy(), want, atol=1e-6) and "benign/malignant mixed at 0.1" in rule
    # a surer-than-(1 - rate) answer is impossible for the pair, whatever the logits
    huge = torch.zeros(1, 3, 2, 2)
    huge[:, 2] = 50.0
    assert float(image_probabilities(model, huge, (32, 32))[0][2]) == pytest.approx(0.9, abs=1e-6)
    # a calibration that names a class the model lacks is a one-line error, not a wrong answer
    model.meta["image_level"]["mix"] = {"classes": ["benign", "cancer"], "rate": 0.1}
    with pytest.raises(InputError, match="not its classes"):
        image_probabilities(model, logits, (64, 80))


def test_calibrate_refits_on_served_predictions_and_keeps_the_weights(trained, tmp_path):
    """``deepminer calibrate``: the served logits of the split, a fit equal to fitting those logits
    directly, the same weights written with the new calibration; what the engine then serves equals
    the calibrated probabilities of the served logits."""
    from deepminer.cli import main
    from deepminer.metrics import calibrated_probabilities, fit_calibration
    from deepminer.models.checkpoints import weights_sha256
    from deepminer.whole_image import calibrate_model, served_logits

    root, data, _ = trained
    src = root / "run" / "best.pt"
    model = load_model(src)
    z, y, preds = served_logits(model, str(data), "test", progress=False)
    assert model.meta["image_level"]["temperature"] != 1.0  # set aside during the pass, then restored
    assert z.shape == (30, 3) and sorted(set(y.tolist())) == [0, 1, 2]
    # the served probabilities at T = 1 are softmax of those logits (log p less a constant per image)
    p1 = np.array([[q["probabilities"][c] for c in CLASSES] for q in preds])
    assert np.allclose(calibrated_probabilities(z), p1, atol=1e-6)
    out = tmp_path / "cal.pt"
    rep = calibrate_model(str(src), str(data), str(out), split="test", progress=False)
    want = fit_calibration(z, y)
    assert rep["calibrated"]["temperature"] == pytest.approx(want["temperature"], rel=1e-4)
    assert rep["calibrated"]["mix"] == pytest.approx(want["mix"], abs=1e-4)
    assert rep["calibrated"]["nll"] <= rep["temperature_alone"]["nll"] + 1e-9 <= rep["before"]["nll"] + 2e-9
    cal = load_model(out)
    assert weights_sha256(cal) == weights_sha256(model)  # atlas, ablation and domain files still fit it
    level = cal.meta["image_level"]
    assert level["calibrated_on"]["split"] == "test" and level["calibrated_on"]["images"] == 30
    assert level["mix"]["classes"] == ["benign", "malignant"] and level["pool"] == model.meta["image_level"]["pool"]
    served = [explain_image(cal, load_image_pixels(data / f"images/{q['image_id']}.png"), max_side=None,
                            input_side=(q["side"], q["side_rule"]), unit_maps="none").probabilities for q in preds[:6]]
    got = np.array([[s[c] for c in CLASSES] for s in served])
    assert np.allclose(got, calibrated_probabilities(z[:6], level["temperature"], level["mix"]["rate"]), atol=1e-5)
    # the command line: same fit, one-line errors for a patch model and for overwriting the input
    assert main(["calibrate", "--model", str(src), "--data", str(data), "--split", "test",
                 "--out", str(tmp_path / "cli.pt")]) == 0
    assert load_model(tmp_path / "cli.pt").meta["image_level"]["temperature"] == pytest.approx(level["temperature"])
    assert main(["calibrate", "--model", str(root / "patch.pt"), "--data", str(data), "--out", str(tmp_path / "x.pt")]) == 2
    with pytest.raises(InputError, match="new file"):
        calibrate_model(str(src), str(data), str(src))


def load_image_pixels(path):
    from deepminer.data.io import load_image

    from deepminer.data.tissue import tissue_region

    return tissue_region(load_image(str(path)).pixels)[0]
