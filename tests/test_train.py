"""Training (tiny model, one short epoch on a few phantoms), resume, the run folder, evaluate."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deepminer import CLASSES
from deepminer.cli import main

PATCH = 48


@pytest.fixture(scope="session")
def phantom_folder(tmp_path_factory):
    """18 small phantoms (9 patients: one normal, benign, malignant per split) and their patch table."""
    from deepminer.data.patches import PATCHES_CSV, extract_patches
    from deepminer.data.phantoms import generate_dataset

    root = tmp_path_factory.mktemp("train") / "ph"
    generate_dataset(root, 18, 11, size=256, splits={"train": 0.34, "val": 0.33, "test": 0.33, "holdout": 0.0})
    extract_patches(root, progress=False).to_csv(root / PATCHES_CSV, index=False)
    return root


@pytest.fixture(scope="session")
def tiny_run(phantom_folder, tmp_path_factory):
    """One short epoch of the tiny model; returns (run folder, metrics)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    argv = ["train", "--data", str(phantom_folder), "--arch", "tiny", "--out", str(run), "--epochs", "1",
            "--patch-size", str(PATCH), "--lr", "0.01", "--batch-size", "16", "--max-patches-per-epoch", "320",
            "--seed", "3"]
    assert main(argv) == 0
    return run, json.loads((run / "metrics.json").read_text())


def _balanced_loss(model, folder, table) -> float:
    """Class-balanced cross-entropy of ``model`` on the patches of ``table`` (eval mode)."""
    from deepminer.data.patches import PatchDataset

    ds = PatchDataset(folder, table, size=PATCH)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.as_tensor(ds.labels)
    model.eval()
    with torch.no_grad():
        per = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    return float(np.mean([per[y == c].mean() for c in y.unique()]))


@pytest.mark.slow  # carries the session fixtures: phantoms, patches, one epoch (~30 s CPU)
def test_one_epoch_lowers_loss_and_writes_the_run(tiny_run, phantom_folder):
    from deepminer.data.patches import read_patches
    from deepminer.models import build_model, load_model

    run, m = tiny_run
    assert {p.name for p in run.iterdir()} >= {"last.pt", "best.pt", "metrics.json", "MODEL_CARD.md"}
    # the same initial weights train() started from (it seeds, then builds)
    torch.manual_seed(3)
    before = build_model("tiny", pretrained=False)
    after = load_model(run / "best.pt")
    table = read_patches(phantom_folder / "patches.csv")
    train_tab = table[table.split == "train"].reset_index(drop=True)
    l0, l1 = _balanced_loss(before, phantom_folder, train_tab), _balanced_loss(after, phantom_folder, train_tab)
    assert l1 < l0 - 0.05, (l0, l1)
    (e,) = m["epochs"]
    assert e["train_loss_last"] < e["train_loss_first"] - 0.1   # and the running training loss fell

    # metrics.json: per-epoch entries with losses and per-class AUC/pAUC, test metrics + baseline
    assert m["config"]["arch"] == "tiny" and m["best_epoch"] == 1
    assert e["epoch"] == 1 and e["patches"] == 320 and e["train_loss"] > 0 and e["val_loss"] > 0
    assert set(e["val"]["auc"]) == set(CLASSES) == set(e["val"]["pauc"])
    assert m["initial"]["val_loss"] > 0
    for key in ("test",):
        rep = m[key]
        assert set(rep["auc"]) == set(CLASSES)
        for v in list(rep["auc"].values()) + list(rep["pauc"].values()) + list(rep["baseline"]["auc"].values()):
            assert v is None or 0.0 <= v <= 1.0
        assert rep["n"] == int((table.split == "test").sum())
        assert rep["image_level"]["n_images"] == table[table.split == "test"].image_id.nunique()
    assert m["data"]["train"]["patches"] == len(train_tab)
    card = (run / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card or "not for clinical use" in card.lower()
    assert "deepminer train --data" in card and "--lr 0.01" in card and "histogram baseline" in card


def test_best_checkpoint_reloads_with_same_outputs(tiny_run):
    from deepminer.models import build_model, load_model
    from deepminer.models.checkpoints import torch_load

    run, _ = tiny_run
    best = load_model(run / "best.pt")
    assert best.meta["patch_size"] == PATCH and best.meta["epoch"] == 1
    from deepminer.data.dataset import SYNTHETIC_PHANTOMS

    assert best.meta["trained_on"] == SYNTHETIC_PHANTOMS  # phantoms.json in the training folder
    last = torch_load(run / "last.pt")
    ref = build_model("tiny", pretrained=False)
    ref.load_state_dict(last["model"])     # best epoch == last epoch here
    ref.eval()
    x = torch.rand(3, 1, PATCH, PATCH)
    with torch.no_grad():
        assert torch.allclose(best(x), ref(x), atol=1e-6)
        assert not torch.allclose(best(x), build_model("tiny", pretrained=False).eval()(x), atol=1e-3)


def test_resume_continues_at_next_epoch(tiny_run, tmp_path, phantom_folder):
    import shutil

    run, m1 = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    argv = ["train", "--data", str(phantom_folder), "--arch", "tiny", "--out", str(copy), "--epochs", "2",
            "--patch-size", str(PATCH), "--lr", "0.01", "--batch-size", "16", "--max-patches-per-epoch", "64",
            "--seed", "3", "--no-baseline"]
    assert main(argv) == 2                     # exists, no --resume
    assert main(argv + ["--resume"]) == 0
    m2 = json.loads((copy / "metrics.json").read_text())
    assert [e["epoch"] for e in m2["epochs"]] == [1, 2]
    assert m2["epochs"][0] == m1["epochs"][0]  # epoch 1 untouched, epoch 2 newly trained
    assert m2["epochs"][1]["patches"] == 64
    assert torch.load(copy / "last.pt", weights_only=True)["epoch"] == 2
    # the resumed run starts from epoch 1's weights, not from scratch
    assert m2["epochs"][1]["train_loss"] < m1["initial"]["val_loss"] + 1.0


def test_cached_trunk_features_equal_the_full_forward(phantom_folder):
    from deepminer.data.patches import PatchDataset, read_patches
    from deepminer.errors import InputError
    from deepminer.models import build_model
    from deepminer.trunk import CachedFeatures, TopOfTrunk, freeze_before, split_features

    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False)
    frozen = freeze_before(model, "block3")
    assert frozen and all(n.startswith(("block1", "block2")) for n in frozen)
    assert all(p.requires_grad for n, p in model.features.named_parameters() if n.startswith("block3"))
    trunk, rest = split_features(model, "block3")
    table = read_patches(phantom_folder / "patches.csv").head(10)
    ds = PatchDataset(phantom_folder, table, size=PATCH)
    cached = CachedFeatures(trunk, model, ds, flips=True, progress=False)
    assert tuple(cached.feats.shape[:2]) == (10, 4)
    top = TopOfTrunk(model, rest)
    model.eval()
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(10)])
        full = model(x)
        via_cache = top(cached.feats[:, 0].float())
        flipped = top(cached.feats[:, 1].float())
        assert torch.allclose(full, via_cache, atol=2e-2)
        assert torch.allclose(model(x.flip(-1)), flipped, atol=2e-2)
    with pytest.raises(InputError, match="cannot split"):
        split_features(model, "nope")
    with pytest.raises(InputError, match="no layer"):
        freeze_before(build_model("tiny", pretrained=False), "nope")


def test_train_with_cached_features_runs(phantom_folder, tmp_path):
    run = tmp_path / "cached"
    assert main(["train", "--data", str(phantom_folder), "--arch", "tiny", "--out", str(run), "--epochs", "1",
                 "--patch-size", str(PATCH), "--lr", "0.05", "--max-patches-per-epoch", "64",
                 "--train-from", "block3", "--cache-features", "--max-train-patches-per-class", "30",
                 "--no-baseline"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["frozen_parameters"] > 0 and m["config"]["cache_features"]
    assert "cached" in (run / "MODEL_CARD.md").read_text()


def test_linear_probe_trains_only_the_head(phantom_folder, tmp_path):
    """--train-from head: the backbone is frozen bit for bit, only the head moves; the card says so."""
    from deepminer.models import build_model, load_model
    from deepminer.trunk import freeze_before, split_features

    run = tmp_path / "probe"
    assert main(["train", "--data", str(phantom_folder), "--arch", "tiny", "--out", str(run), "--epochs", "1",
                 "--patch-size", str(PATCH), "--lr", "0.05", "--max-patches-per-epoch", "64", "--seed", "3",
                 "--train-from", "head", "--cache-features", "--max-train-patches-per-class", "30",
                 "--no-baseline", "--no-pretrained"]) == 0
    trained = load_model(run / "best.pt")
    torch.manual_seed(3)
    fresh = build_model("tiny", pretrained=False)
    for (name, a), b in zip(trained.features.state_dict().items(), fresh.features.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(next(iter(trained.head.state_dict().values())), next(iter(fresh.head.state_dict().values())))
    card = (run / "MODEL_CARD.md").read_text()
    assert "linear probe" in card
    model = build_model("tiny", pretrained=False)
    assert freeze_before(model, "head") == [n for n, _ in model.features.named_parameters()]
    trunk, rest = split_features(model, "head")
    x = model.normalize(torch.rand(1, 1, 64, 64))
    assert torch.equal(rest(trunk(x)), model.features(x))


def test_wildcat_settings_reach_the_checkpoint_and_the_card(phantom_folder, tmp_path):
    from deepminer.models import load_model

    run = tmp_path / "wildcat"
    assert main(["train", "--data", str(phantom_folder), "--arch", "tiny", "--out", str(run), "--epochs", "1",
                 "--patch-size", str(PATCH), "--lr", "0.05", "--max-patches-per-epoch", "32", "--head", "wildcat",
                 "--wildcat-maps", "2", "--wildcat-k", "0.3", "--wildcat-alpha", "0", "--no-baseline",
                 "--no-pretrained"]) == 0
    head = load_model(run / "best.pt").head
    assert (head.num_maps, head.k, head.alpha) == (2, 0.3, 0.0)
    card = (run / "MODEL_CARD.md").read_text()
    assert "2 maps per class, k 0.3, alpha 0.0" in card and "--wildcat-maps 2" in card
    assert main(["train", "--data", str(phantom_folder), "--arch", "tiny", "--out", str(run), "--head", "wildcat",
                 "--wildcat-maps", "0"]) == 2


def test_evaluate_command_matches_an_independent_computation(tiny_run, phantom_folder, capsys):
    from sklearn.metrics import roc_auc_score

    from deepminer.data.patches import read_patches
    from deepminer.models import load_model

    run, _ = tiny_run
    assert main(["evaluate", "--model", str(run / "best.pt"), "--data", str(phantom_folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rep = out["patches"]
    table = read_patches(phantom_folder / "patches.csv")
    test = table[table.split == "test"].reset_index(drop=True)
    model = load_model(run / "best.pt")
    from deepminer.data.patches import PatchDataset

    ds = PatchDataset(phantom_folder, test, size=PATCH)
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([ds[i][0] for i in range(len(ds))])), 1).numpy()
    for c, name in enumerate(CLASSES):
        y = (ds.labels == c).astype(int)
        if 0 < y.sum() < len(y):
            assert rep["auc"][name] == pytest.approx(roc_auc_score(y, probs[:, c]), abs=1e-6)
        else:
            assert rep["auc"][name] is None
    assert rep["n"] == len(test) and rep["patch_size"] == PATCH
    assert main(["evaluate", "--model", str(run / "best.pt"), "--data", str(phantom_folder), "--split", "all"]) == 0
    text = capsys.readouterr().out
    assert "malignant" in text and "AUC" in text and f"{len(table)} patches" in text


def test_bad_input_one_line_errors(phantom_folder, tiny_run, tmp_path, capsys):
    import shutil

    def err_of(argv):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    base = ["--out", str(tmp_path / "r"), "--epochs", "1", "--patch-size", str(PATCH)]
    assert "no such dataset folder" in err_of(["train", "--data", str(tmp_path / "missing"), "--arch", "tiny", *base])
    assert "unknown arch 'vgg99'" in err_of(["train", "--data", str(phantom_folder), "--arch", "vgg99", *base])
    # a folder whose val split has no patches
    noval = tmp_path / "noval"
    shutil.copytree(phantom_folder, noval)
    csv = (noval / "patches.csv").read_text().replace(",val,", ",train,")
    (noval / "patches.csv").write_text(csv)
    assert "no patches in split 'val'" in err_of(["train", "--data", str(noval), "--arch", "tiny", *base])
    assert "--cache-features" in err_of(["train", "--data", str(phantom_folder), "--arch", "tiny", "--cache-features", *base])
    if not torch.cuda.is_available():
        assert "no CUDA" in err_of(["train", "--data", str(phantom_folder), "--arch", "tiny", "--device", "cuda", *base])
    assert "nothing to resume" in err_of(["train", "--data", str(phantom_folder), "--arch", "tiny", "--resume", *base])
    assert not (tmp_path / "r" / "last.pt").exists()
    assert "no such file" in err_of(["evaluate", "--model", str(tmp_path / "nope.pt"), "--data", str(phantom_folder)])
    assert "no patches in split 'holdout'" in err_of(["evaluate", "--model", str(tiny_run[0] / "best.pt"),
                                                      "--data", str(phantom_folder), "--split", "holdout"])


def test_metrics_json_is_standard_json(tiny_run):
    run, _ = tiny_run
    text = (run / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = json.loads(text)
    assert not any(isinstance(v, float) and math.isnan(v) for v in m["epochs"][0]["val"]["auc"].values())


def test_image_level_scores_an_image_by_its_most_malignant_patch():
    import pandas as pd

    from deepminer.model_card import fmt_number
    from deepminer.patch_eval import image_level

    table = pd.DataFrame({"image_id": ["a", "a", "b", "b", "c"]})
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.1, 0.7], [0.6, 0.2, 0.2], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    got = image_level(table, probs, {"a": "malignant", "b": "normal", "c": "benign"})
    # image scores a 0.7, b 0.3, c 0.8; only a is malignant: ranked below c, above b -> AUC 1/2
    assert got["n_images"] == 3 and got["n_positive"] == 1 and got["auc"] == 0.5
    assert fmt_number(0.5) == "0.500" and fmt_number(float("nan")) == "n/a" and fmt_number(None) == "n/a"
