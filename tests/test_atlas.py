"""The unit atlas (deepminer.atlas): dissection of a model with a planted calcification unit over a
few small phantoms, every field cross-checked against a direct in-memory computation."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.decomposition import PCA
from torch import nn

from deepminer import CLASSES
from deepminer.atlas import Atlas, dissect
from deepminer.cli import main as cli_main
from deepminer.errors import InputError
from deepminer.models import FCN, GAPHead, build_model, save_model

PATCH = 64
K = 8


class PlantedFeatures(nn.Module):
    """Unit 0 is a calcification detector (white top-hat: grey minus its 5x5 morphological opening,
    i.e. bright structures smaller than 5 px, max-pooled by 4); units 1..K-1 are a random 3x3 conv +
    ReLU on the 4x average-pooled input. Total stride 4."""

    def __init__(self, k: int = K, bias: float = 0.02):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, k - 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x[:, :1] * 0.229 + 0.485  # undo the FCN's ImageNet normalisation of channel 0
        opened = F.max_pool2d(-F.max_pool2d(-grey, 5, 1, 2), 5, 1, 2)
        dots = F.max_pool2d(F.relu(grey - opened - self.bias) * 10, 4)
        return torch.cat([dots, F.relu(self.conv(F.avg_pool2d(x, 4)))], 1)


def planted_model() -> FCN:
    head = GAPHead(K, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.linspace(-1, 1, 3 * K).view(3, K, 1, 1).roll(5))
        head.fc.bias.copy_(torch.tensor([0.3, 0.0, -0.1]))
    return FCN(PlantedFeatures(), head, arch="planted", classes=CLASSES, layer="features", num_units=K).eval()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """12 phantoms (384 px high, all in the test split, with findings) and their patch table."""
    from deepminer.data.patches import PATCHES_CSV, extract_patches
    from deepminer.data.phantoms import generate_dataset

    out = tmp_path_factory.mktemp("atlas") / "ph"
    generate_dataset(out, 12, 3, size=384, splits={"train": 0, "val": 0, "test": 1, "holdout": 0},
                     label_mix={"normal": 0, "benign": 0.5, "malignant": 0.5})
    extract_patches(out, progress=False).to_csv(out / PATCHES_CSV, index=False)
    return out


@pytest.fixture(scope="module")
def atlas(phantoms, tmp_path_factory) -> Atlas:
    out = tmp_path_factory.mktemp("atlas_out") / "atlas"
    return dissect(planted_model(), phantoms, "test", out, patch_size=PATCH, topk=5, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def recomputed(atlas, phantoms):
    """Unit maps of every reference patch, computed directly (all in memory; small set)."""
    from deepminer.data.patches import PatchDataset

    refs = atlas.references
    ds = PatchDataset(phantoms, refs, size=PATCH)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    model = planted_model()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    return feats, logits.argmax(1), model.unit_weights.detach()


def test_files_and_shapes(atlas, phantoms):
    m = atlas.meta
    for name in ("atlas.json", "atlas.npz", "references.csv"):
        assert (atlas.path / name).is_file()
    assert not [p for p in atlas.path.parent.iterdir() if ".partial-" in p.name]
    n_ref, n_img = m["counts"]["references"], m["counts"]["images"]
    table = pd.read_csv(phantoms / "patches.csv")
    assert n_ref == len(table[table.split == "test"]) == len(atlas.references) and n_img == 12
    assert m["model"]["arch"] == "planted" and m["model"]["num_units"] == K and len(m["model"]["weights_sha256"]) == 64
    assert m["quantile"] == 0.99 and m["threshold_method"] == "exact"
    assert m["data"]["split"] == "test" and Path(m["data"]["folder"]) == phantoms.resolve()
    c = len(atlas.concepts)
    assert c == 23 and "calcification" in atlas.concepts and "mass" in atlas.concepts
    shapes = {"thresholds": (K,), "max": (K,), "embedding": (n_img, K), "pca": (K, 2), "topk_index": (K, 5),
              "topk_box": (K, 5, 4), "topk_activation": (K, 5), "topk_maps": (K, 5, 16, 16),
              "frequency": (3, K), "iou": (K, c), "iou_complete": (K,)}
    for key, shape in shapes.items():
        assert atlas.arrays[key].shape == shape, key
    assert atlas.arrays["embedding"].dtype == np.float16
    assert len(m["units"]) == K and set(m["per_class"]) == set(CLASSES)
    refs = atlas.references
    assert list(refs.columns[:8]) == ["index", "image_id", "image", "x0", "y0", "x1", "y1", "label"]
    assert all((phantoms / p).is_file() for p in refs["image"].unique())


def test_thresholds_equal_numpy_quantile(atlas, recomputed):
    from deepminer.explain.units import quantile_thresholds

    feats = recomputed[0]
    values = feats.permute(0, 2, 3, 1).reshape(-1, K).numpy()
    want = np.quantile(values, 0.99, axis=0)
    np.testing.assert_allclose(atlas.thresholds, want, rtol=1e-6, atol=1e-7)  # exact within float32
    np.testing.assert_allclose(atlas.thresholds, quantile_thresholds(values, 0.99), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(atlas.arrays["max"], values.max(axis=0), rtol=1e-6)


def test_topk_sorted_and_recomputed(atlas, recomputed):
    item_max = recomputed[0].amax(dim=(2, 3)).numpy()  # (N, K)
    refs = atlas.references
    for u in range(K):
        entries = atlas.topk(u)
        acts = [e.activation for e in entries]
        assert acts == sorted(acts, reverse=True) and len(entries) == 5
        np.testing.assert_allclose(acts, np.sort(item_max[:, u])[::-1][:5], rtol=1e-6)  # the true top 5
        for e in entries:
            assert item_max[e.reference, u] == pytest.approx(e.activation, rel=1e-6)
            row = refs.iloc[e.reference]
            assert e.box == (row.x0, row.y0, row.x1, row.y1) and e.image_id == row.image_id


def test_influence_frequency_and_coverage(atlas, recomputed):
    feats, pred, w = recomputed
    item_max = feats.amax(dim=(2, 3))
    counts = np.zeros((3, K), dtype=np.int64)
    for b in range(len(pred)):  # a plain loop: the top 8 units of each patch, for its predicted class
        infl = (item_max[b] * w[pred[b]]).numpy()
        for u in np.argsort(-infl, kind="stable")[:8]:
            counts[pred[b], u] += 1
    np.testing.assert_array_equal(atlas.arrays["frequency"], counts)
    assert (atlas.references["pred"] == [CLASSES[p] for p in pred.tolist()]).all()
    for c, name in enumerate(CLASSES):
        top = atlas.top_units(name)
        assert len(top) == K  # fewer than 20 units: all of them, ranked
        freq = counts[c, top]
        assert list(freq) == sorted(freq, reverse=True)
        n_c = int((pred == c).sum())
        assert atlas.meta["per_class"][name]["predicted_patches"] == n_c
        if n_c:
            cov = atlas.coverage(name)
            assert 0.0 <= cov <= 1.0 and cov == pytest.approx(counts[c, top[:20]].sum() / (8 * n_c))
        else:
            assert atlas.coverage(name) is None
    assert sum(atlas.meta["per_class"][n]["predicted_patches"] for n in CLASSES) == len(pred)


def test_embedding_and_pca(atlas, recomputed):
    item_max = recomputed[0].amax(dim=(2, 3)).numpy()
    refs = atlas.references
    for j, image_id in enumerate(atlas.meta["images"]):
        rows = (refs["image_id"] == image_id).to_numpy()
        assert (refs["image_index"][rows] == j).all()
        np.testing.assert_allclose(atlas.embedding[j], item_max[rows].max(axis=0), rtol=1e-3)
    ref = PCA(n_components=2).fit_transform(atlas.embedding.T.astype(np.float64))
    for j in range(2):
        sign = np.sign(atlas.unit_coords[:, j] @ ref[:, j]) or 1.0
        np.testing.assert_allclose(atlas.unit_coords[:, j], sign * ref[:, j], atol=1e-4)


def test_iou_equals_dense_computation(atlas, recomputed, phantoms):
    """IoU summed over the set from the heaps equals a dense computation over every patch and unit
    (checked for a few concepts; each concept's IoU is computed independently)."""
    feats = recomputed[0]
    refs, s = atlas.references, atlas.meta["iou"]["grid"]
    names = ["calcification", "calc_segmental", "mass", "spicules"]
    cols = [atlas.concepts.index(c) for c in names]
    t = torch.from_numpy(atlas.thresholds)[None, :, None, None]
    masks_up = (F.interpolate(feats, size=(s, s), mode="bilinear", align_corners=False) > t).flatten(2).double()
    inter = np.zeros((K, len(names)))
    concept_area = np.zeros(len(names))
    for image_id, rows in refs.groupby("image_id").indices.items():
        masks = np.stack([np.asarray(Image.open(phantoms / "masks" / c / f"{image_id}.png")) > 0 for c in names])
        masks = torch.from_numpy(masks.astype(np.float32))
        crops = torch.stack([masks[:, y0:y1, x0:x1] for x0, y0, x1, y1 in
                             refs.loc[rows, ["x0", "y0", "x1", "y1"]].to_numpy()])
        frac = F.interpolate(crops, size=(s, s), mode="area").flatten(2).double()   # (n, C, s*s)
        inter += torch.einsum("nkx,ncx->kc", masks_up[rows], frac).numpy()
        concept_area += frac.sum(dim=(0, 2)).numpy()
    unit_area = masks_up.sum(dim=(0, 2)).numpy()
    union = unit_area[:, None] + concept_area[None] - inter
    want = np.where(union > 0, inter / np.maximum(union, 1e-12), 0)
    assert atlas.arrays["iou_complete"].all() and atlas.meta["iou"]["heap_dtype"] == "float32"
    np.testing.assert_allclose(atlas.iou[:, cols], want, rtol=1e-5, atol=1e-7)
    assert want[0, 0] > 0.01  # the check is not vacuous


def test_planted_unit_gets_calcification_label(atlas):
    label = atlas.suggested_label(0)
    assert label is not None and label[0].startswith("calc"), label
    iou = atlas.iou
    calc = [i for i, c in enumerate(atlas.concepts) if c.startswith("calc")]
    other = [i for i, c in enumerate(atlas.concepts) if not c.startswith("calc")]
    assert iou[0, calc].max() > 1.5 * iou[0, other].max()
    assert np.argmax(iou[:, calc].max(axis=1)) == 0  # no random unit is a better calcification detector
    unit = atlas.meta["units"][0]
    assert unit["concept"] == label[0] and unit["iou"] == pytest.approx(label[1], abs=1e-6)


def test_render_topk(atlas, phantoms, artifacts_dir):
    from deepminer.data.io import load_image

    gallery = atlas.render_topk(0, size=48)
    assert len(gallery) == 5
    for (crop, mask), e in zip(gallery, atlas.topk(0)):
        assert crop.dtype == np.uint8 and crop.shape == (48, 48) and mask.dtype == bool and mask.shape == (48, 48)
        px = load_image(phantoms / e.image).pixels
        x0, y0, x1, y1 = e.box
        assert abs(crop.mean() / 255.0 - px[y0:y1, x0:x1].mean()) < 0.02  # the right crop
        assert mask.any()  # the top patches exceed the threshold somewhere
    # rendered from the references: a moved data folder needs data_root
    with pytest.raises(InputError, match="reference image missing"):
        atlas.render_topk(0, data_root=phantoms / "nowhere")
    strip = np.concatenate([np.concatenate([c, np.where(m, 255, c // 2).astype(np.uint8)], 0) for c, m in gallery], 1)
    Image.fromarray(strip).save(artifacts_dir / "atlas_planted_unit0_gallery.png")


def test_cli_tiny_model_and_bad_input(phantoms, tmp_path, capsys):
    torch.manual_seed(0)
    model_path = save_model(build_model("tiny", pretrained=False), tmp_path / "m" / "model.pt", patch_size=32)
    out = tmp_path / "atlas"
    rc = cli_main(["dissect", "--model", str(model_path), "--data", str(phantoms), "--out", str(out),
                   "--quantile", "0.995", "--topk", "3", "--batch-size", "64"])
    assert rc == 0, capsys.readouterr().err
    a = Atlas.load(out)
    assert a.quantile == 0.995 and a.meta["data"]["patch_size"] == 32 and a.num_units == 32
    assert a.meta["model"]["name"] == "m" and len(a.meta["model"]["file_sha256"]) == 64
    assert a.arrays["topk_maps"].shape == (32, 3, 2, 2)
    err = capsys.readouterr().err
    assert str(out) in err and "coverage" in err
    # bad input: one line, exit 2, nothing written
    cases = [
        (["--model", str(tmp_path / "missing.pt"), "--data", str(phantoms)], "missing.pt"),
        (["--model", str(model_path), "--data", str(tmp_path / "nodata")], "nodata"),
        (["--model", str(model_path), "--data", str(phantoms), "--split", "holdout"], "holdout"),
        (["--model", str(model_path), "--data", str(phantoms), "--quantile", "1.5"], "--quantile"),
    ]
    for args, word in cases:
        bad_out = tmp_path / "bad"
        assert cli_main(["dissect", *args, "--out", str(bad_out)]) == 2
        msg = capsys.readouterr().err.strip()
        assert len(msg.splitlines()) == 1 and word in msg and "Traceback" not in msg, msg
        assert not bad_out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["dissect", "--model", str(model_path), "--data", str(phantoms), "--out",
                     str(blocker / "atlas")]) == 2
    msg = capsys.readouterr().err.strip()
    assert "cannot write" in msg and len(msg.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas", "file", "m"]  # no partial folders


def test_atlas_load_errors(tmp_path, atlas):
    with pytest.raises(InputError, match="no such atlas folder"):
        Atlas.load(tmp_path / "none")
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match="atlas.json: missing"):
        Atlas.load(tmp_path / "a")
    for name in ("atlas.json", "atlas.npz", "references.csv"):
        (tmp_path / "a" / name).write_bytes((atlas.path / name).read_bytes())
    (tmp_path / "a" / "atlas.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="not a deepminer atlas"):
        Atlas.load(tmp_path / "a")
    with pytest.raises(InputError, match="unit 99 out of range"):
        atlas.topk(99)
    with pytest.raises(InputError, match="not in"):
        atlas.top_units("cancer")


def test_memory_budget_samples_thresholds(phantoms, recomputed, tmp_path):
    """A tiny memory budget switches to sampled thresholds (within the documented bound) and
    smaller heaps (units whose heap misses patches above threshold are marked incomplete)."""
    import math

    small = dissect(planted_model(), phantoms, "test", tmp_path / "a", patch_size=PATCH, topk=5, batch_size=16,
                    memory_mb=0.02, progress=False)
    assert small.meta["threshold_method"].startswith("sampled")
    values = recomputed[0].permute(0, 2, 3, 1).reshape(-1, K).numpy()
    n_patches = recomputed[0].shape[0]
    ranks = (values <= small.thresholds[None]).mean(axis=0)
    eps = math.sqrt(math.log(2 / 1e-3) / (2 * n_patches))
    assert np.all(np.abs(ranks - 0.99) <= eps), ranks
    assert small.meta["iou"]["heap_patches"] < n_patches
    complete = small.arrays["iou_complete"]
    assert small.meta["iou"]["complete_units"] == complete.sum()
    top = small.arrays["topk_activation"]  # galleries stay exact
    item_max = recomputed[0].amax(dim=(2, 3)).numpy()
    np.testing.assert_allclose(top, -np.sort(-item_max.T, axis=1)[:, :5], rtol=1e-6)


def test_profile_batch_one_by_one_equals_dissect(phantoms, tmp_path):
    """The public per-batch step: a tiny model's patches fed batch by batch through profile_batch
    give dissect()'s thresholds, maxima, galleries, influence counts, embedding and predictions, and
    thresholds equal to np.quantile over all the unit maps."""
    from deepminer.atlas import ProfileState, profile_batch
    from deepminer.data.patches import PatchDataset

    torch.manual_seed(1)
    model = build_model("tiny", pretrained=False).eval()
    a = dissect(model, phantoms, "test", tmp_path / "a", patch_size=PATCH, topk=4, batch_size=16, progress=False)
    refs = a.references                                   # the atlas's order: grouped by image
    ds = PatchDataset(phantoms, refs, size=PATCH)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    state = ProfileState(model, len(refs), refs["image_index"].to_numpy(), topk=4, device="cpu")
    preds = torch.cat([profile_batch(model, x[i:i + 16], state) for i in range(0, len(refs), 16)])
    res = state.result()
    assert state.seen == len(refs) == a.meta["counts"]["references"]
    np.testing.assert_array_equal(res.thresholds, a.thresholds)
    np.testing.assert_array_equal(res.counts, a.arrays["frequency"])
    np.testing.assert_array_equal(res.sums, a.arrays["influence_sum"])
    np.testing.assert_array_equal(res.scores[:, 0].numpy(), a.arrays["max"])
    np.testing.assert_array_equal(res.index[:, :4].numpy(), a.arrays["topk_index"])
    np.testing.assert_array_equal(res.embedding, a.embedding)
    assert [CLASSES[p] for p in preds.tolist()] == refs["pred"].tolist() == [CLASSES[p] for p in res.preds]
    # independently of dissect(): the exact quantile over every activation, the influence by a loop
    with torch.no_grad():
        feats = model.forward_features(x)
        pred = model(x).argmax(1)
    values = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).numpy()
    np.testing.assert_allclose(res.thresholds, np.quantile(values, 0.99, axis=0), rtol=1e-5, atol=1e-6)
    item_max, w = feats.amax(dim=(2, 3)), model.unit_weights.detach()
    counts = np.zeros_like(res.counts)
    for b in range(len(pred)):
        for u in np.argsort(-(item_max[b] * w[pred[b]]).numpy(), kind="stable")[:8]:
            counts[pred[b], u] += 1
    np.testing.assert_array_equal(res.counts, counts)
    assert counts.sum() == 8 * len(refs)
    with pytest.raises(ValueError, match="more than the"):
        profile_batch(model, x[:1], state)
