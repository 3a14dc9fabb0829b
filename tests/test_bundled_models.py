"""The bundled models (model_store/demo, wildcat, probe): the committed phantom generator reproduces
their training and test data (model_store/phantom-sets.json, recorded from the files they were trained
on), each loads, has its card, metrics and atlas, and is the kind its card says."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "model_store"
SETS = json.loads((STORE / "phantom-sets.json").read_text())["sets"]
MODELS = {"demo": ("gap", False), "wildcat": ("wildcat", False), "probe": ("gap", True)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", sorted(SETS))
def test_the_committed_generator_reproduces_the_training_data(name, tmp_path):
    """The patients, labels and splits of the whole set (the plan) and a sample of its files (an image of
    each label, its lesion mask) come out byte for byte as recorded, on any CPU (the recorded bytes differ
    from those the models were trained on by one grey level in ~1 pixel of some images: the "as_trained"
    entry of phantom-sets.json)."""
    from deepminer.data.phantoms import PHANTOM_CONCEPTS, plan_patients, render_phantom, write_phantom

    rec = SETS[name]
    plan = plan_patients(rec["count"], rec["seed"], None, rec["splits"])
    lines = sorted(f"P{i:05d},{label},{split}\n" for i, label, split, _ in plan)
    assert _sha("".join(lines).encode()) == rec["plan_sha256"]
    views = {f"P{i:05d}": (i, label) for i, label, _, _ in plan}
    for sub in ["images", "lesions"] + [f"masks/{c}" for c in PHANTOM_CONCEPTS]:
        (tmp_path / sub).mkdir(parents=True)
    rendered = set()
    for path, want in rec["sample_sha256"].items():
        image_id = Path(path).stem
        pid, _, view = image_id.split("_")
        if image_id not in rendered:
            index, label = views[pid]
            write_phantom(tmp_path, render_phantom(rec["seed"], index, rec["size"], label, view))
            rendered.add(image_id)
        assert _sha((tmp_path / path).read_bytes()) == want, path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bundled_model_loads_with_its_card(name):
    from deepminer.models import load_model, weights_sha256

    head, probe = MODELS[name]
    folder = STORE / name
    model = load_model(folder / "model.pt")
    assert model.arch == "efficientnet_lite0" and model.head_type == head
    assert model.classes == ("normal", "benign", "malignant")
    assert "phantom" in str(model.meta.get("trained_on", "")).lower()
    card = (folder / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card.lower() and "deepminer train-whole" in card
    # the patch stage's command is in the card, or (wildcat: a head trained on demo's units) in demo's, pointed to
    assert "deepminer train " in card or (name == "wildcat" and "model_store/demo/MODEL_CARD.md" in card)
    assert ("--train-from head" in card) == (name != "demo") and ("linear probe" in card) == probe
    if head == "wildcat":
        assert "maps per class" in card and "validation" in card
    # two stages: patches (deepminer train), then whole images at the served scale (deepminer train-whole)
    metrics = json.loads((folder / "metrics.json").read_text())
    # demo's patch stage is cut from the whole-image training set, at the served scale; wildcat is a WILDCAT head
    # trained on demo's units (so demo's patch stage, a GAP patch model); probe's is from the 512 px set of issue 13
    patch_data = "train_s1" if probe else "whole_s12_1024"
    patch_head = "gap" if name == "wildcat" else head
    assert metrics["patch_stage"]["config"]["head"] == patch_head
    assert metrics["patch_stage"]["config"]["data"].endswith(patch_data)
    if name == "wildcat":
        import torch

        demo = load_model(STORE / "demo" / "model.pt")
        assert metrics["whole_image"]["config"]["train_from"] == "head"
        assert metrics["start_model"]["image_level"]["pool"] == "breast cells: mean"  # demo's GAP stage
        # the same trunk and unit layer as demo, weight for weight: only the head differs
        trunk = {k: v for k, v in demo.state_dict().items() if not k.startswith("head.")}
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in trunk.items())
        # its head: WILDCAT top-k pooling of class maps with a local surround (docs/models.md), as trained and carded
        cfg = metrics["whole_image"]["config"]
        assert model.head.surround == cfg["wildcat_surround"] == 2.0 and "--wildcat-surround 2" in card
        assert "ring mean" in model.meta["image_level"]["pool"] and model.head.k == cfg["wildcat_k"]
        # a sparse head (--head-l1 with Adam, session 14): few units carry each class, as the card and metrics say
        from deepminer.whole_image import head_weight_spread

        assert cfg["head_l1"] == 0.03 and cfg["optimizer"] == "adam" and "--head-l1 0.03" in card
        spread = head_weight_spread(model)
        assert spread["classes"].keys() == metrics["whole_image"]["head_weights"]["classes"].keys()
        for c, v in spread["classes"].items():  # the float16 weights as served, against the run's float32 record
            assert abs(v["units_holding_share"] - metrics["whole_image"]["head_weights"]["classes"][c]["units_holding_share"]) <= 1
            assert v["units_holding_share"] <= 64 and f"{c} {metrics['whole_image']['head_weights']['classes'][c]['units_holding_share']}" in card
    assert metrics["whole_image"]["config"]["data"].endswith("whole_s12_1024")
    assert model.meta["scale"] == metrics["whole_image"]["scale"] and model.meta["scale"]["long_side"] == 1024
    # the GAP demo (and wildcat, on its units): trained with the unit layer's ReLU6 cap lifted, served at the stride
    # it was trained at (32: its CAM localized better there than at 16); the probe keeps the unit layer as built
    # (docs/models.md, "The unit layer")
    from deepminer.models.unit_layer import unit_layer

    lifted = name in ("demo", "wildcat")
    expected = {"activation": "relu" if lifted else "relu6", "output_stride": 32}
    assert unit_layer(model) == expected == metrics["whole_image"].get("unit_layer", expected)
    # calibrated anew (deepminer calibrate) on a phantom set of its own: the temperature and the benign/malignant
    # mix the checkpoint serves are the ones its metrics and card report, fitted on that set
    level = model.meta["image_level"]
    fit = metrics["calibration"]["calibrated"]
    assert level["temperature"] == fit["temperature"] > 0 and level["mix"]["rate"] == fit["mix"] > 0
    assert level["mix"]["classes"] == ["benign", "malignant"]
    assert level["calibrated_on"]["folder"].endswith("calib_s14_1024") and level["calibrated_on"]["images"] == 2000
    assert SETS["calibration_1024"]["seed"] == 14 and SETS["calibration_1024"]["count"] == 2000
    assert fit["nll"] < metrics["calibration"]["temperature_alone"]["nll"] <= metrics["calibration"]["before"]["nll"]
    assert "deepminer calibrate" in card and "calib_s14_1024" in card
    assert metrics["fresh_test"]["temperature"] == level["temperature"]  # the test was of the calibrated model
    from deepminer.data.dataset import SYNTHETIC_PHANTOMS

    assert model.meta["trained_on"] == SYNTHETIC_PHANTOMS  # what every answer and the workbench say
    # the recorded test on 200 fresh whole phantoms: every class predicted on some image
    fresh = metrics["fresh_test"]["metrics"]
    assert fresh["n"] >= 200 and all(n > 0 for n in fresh["predicted_counts"].values())
    assert (folder / "reliability.png").is_file() and "reliability.png" in card
    atlas = json.loads((folder / "atlas" / "atlas.json").read_text())
    assert atlas["model"]["num_units"] == len(atlas["units"]) == model.num_units == 1280
    assert atlas["model"]["weights_sha256"] == weights_sha256(model)  # the atlas of these weights
    # profiled at the served scale: the 1024 px reference phantoms (what scripts/model_store.sh regenerates and the
    # workbench falls back to), DeepMiner patches of 151 px fed at 160
    from ui.settings import DEMO_REFERENCE

    assert Path(atlas["data"]["folder"]).name == DEMO_REFERENCE.name == "reference-1024"
    assert atlas["data"]["patch_size"] == 160 and model.meta["scale"]["long_side"] == 1024
    ablation = json.loads((folder / "atlas" / "ablation.json").read_text())
    assert ablation["model"]["weights_sha256"] == weights_sha256(model)


@pytest.mark.serve
@pytest.mark.slow
def test_the_three_bundled_models_served_in_one_torchserve(tmp_path):
    """What `make run` serves: every built model_store/<name>.mar in one TorchServe (one worker each);
    each answers with its own weights, head and domain summary, and lists in GET /models."""
    import io

    import numpy as np
    from PIL import Image

    from deepminer.client import Client
    from deepminer.data.phantoms import render_phantom
    from deepminer.models import load_model, weights_sha256
    from serve.launch import TorchServe, served_models

    mars = {n: f"{n}.mar" for n in MODELS if (STORE / f"{n}.mar").is_file()}
    assert sorted(mars) == sorted(MODELS), "build them first: bash scripts/model_store.sh (make test does)"
    buf = io.BytesIO()
    Image.fromarray(np.asarray(render_phantom(23, 2, size=512).image).astype(np.uint16)).save(buf, format="PNG")
    with TorchServe(STORE, mars, tmp_path / "ts", profile="demo") as ts:
        assert served_models(ts.management_url) == sorted(MODELS)
        for name, (head, _) in MODELS.items():
            with Client(ts.inference_url, model=name, timeout=120) as c:
                exp = c.explain(buf.getvalue(), max_side=512)
            assert exp.model["name"] == name and exp.model["head"] == head
            assert exp.model["weights_sha256"] == weights_sha256(load_model(STORE / name / "model.pt"))
            assert exp.domain is not None and exp.domain["in_domain"], exp.domain  # a phantom: in domain
            assert sum(exp.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
