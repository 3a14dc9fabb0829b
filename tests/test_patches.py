"""DeepMiner patch rules on hand-built masks, the patch table of a folder, PatchDataset, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepminer.data.patches import (BASE_COLUMNS, PatchDataset, image_patches, label_findings,
                                    patch_boxes, patch_label, read_patches)
from deepminer.errors import InputError


def _crop(n_benign: int = 0, n_malignant: int = 0, side: int = 10) -> np.ndarray:
    flat = np.zeros(side * side, dtype=np.uint8)
    flat[:n_malignant] = 2
    flat[n_malignant:n_malignant + n_benign] = 1
    return flat.reshape(side, side)


# ---------------------------------------------------------------- the pure rule, 30% both sides
@pytest.mark.parametrize("n, expected", [(29, "normal"), (30, "malignant"), (31, "malignant"), (100, "malignant")])
def test_malignant_area_rule_boundary(n, expected):
    assert patch_label(_crop(n_malignant=n)) == expected


@pytest.mark.parametrize("n, expected", [(29, "normal"), (30, "benign"), (55, "benign")])
def test_benign_area_rule_boundary(n, expected):
    assert patch_label(_crop(n_benign=n)) == expected


@pytest.mark.parametrize("frac, expected", [(0.29, "normal"), (0.2999, "normal"), (0.3, "malignant"), (1.0, "malignant")])
def test_finding_fraction_rule_boundary(frac, expected):
    # a tiny finding: 1% of the patch area, but the patch may hold most of it
    crop = _crop(n_malignant=1)
    assert patch_label(crop, [(2, frac)]) == expected
    assert patch_label(_crop(n_benign=1), [(1, frac)]) == expected.replace("malignant", "benign")


def test_malignant_takes_precedence_and_classes_do_not_add_up():
    assert patch_label(_crop(n_benign=40, n_malignant=30)) == "malignant"
    assert patch_label(_crop(n_benign=60), [(2, 0.5)]) == "malignant"
    assert patch_label(_crop(n_benign=60), [(2, 0.1)]) == "benign"
    # 20% benign + 20% malignant: neither class reaches 30% on its own
    assert patch_label(_crop(n_benign=20, n_malignant=20)) == "normal"
    # a benign finding fraction never makes a patch malignant
    assert patch_label(_crop(), [(1, 0.9), (2, 0.29)]) == "benign"


def test_threshold_is_a_parameter():
    assert patch_label(_crop(n_malignant=20), min_lesion=0.2) == "malignant"
    assert patch_label(_crop(n_malignant=19), min_lesion=0.2) == "normal"


# ---------------------------------------------------------------- geometry and findings
def test_patch_boxes_side_stride_and_edge_window():
    boxes = patch_boxes(80, 40)  # side 10, stride 5
    xs = sorted({b[0] for b in boxes})
    ys = sorted({b[1] for b in boxes})
    assert xs == list(range(0, 31, 5)) and ys == list(range(0, 71, 5))
    assert all(b[2] - b[0] == 10 and b[3] - b[1] == 10 for b in boxes)
    # 42 wide: side round(10.5)=10 (banker's rounding), stride 5; the grid stops at 30..40 so a
    # flush window at 32 is added
    xs42 = sorted({b[0] for b in patch_boxes(50, 42)})
    assert xs42[-1] == 32 and xs42[:-1] == list(range(0, 31, 5))
    assert patch_boxes(5, 40) == []  # image shorter than one patch


def test_label_findings_components_per_value():
    lesion = np.zeros((10, 10), np.uint8)
    lesion[0:2, 0:2] = 1          # benign finding, 4 px
    lesion[2, 2] = 2              # touches the benign one diagonally but is another value
    lesion[3, 3] = 2              # 8-connected to (2,2): one malignant finding of 2 px
    lesion[8:10, 8:10] = 1        # a second benign finding
    labels, values, sizes = label_findings(lesion)
    assert sorted(values[1:].tolist()) == [1, 1, 2]
    assert sorted(sizes[1:].tolist()) == [2, 4, 4]
    assert labels[2, 2] == labels[3, 3] and labels[2, 2] != labels[1, 1]


def _reference_labels(tissue, lesion, boxes, min_tissue=0.5, min_lesion=0.3):
    """Independent brute force: finding membership by flood fill written here, loops over pixels."""
    h, w = lesion.shape
    comp = -np.ones((h, w), int)
    sizes, vals = [], []
    for y in range(h):
        for x in range(w):
            if lesion[y, x] and comp[y, x] < 0:
                k = len(sizes)
                stack, n = [(y, x)], 0
                comp[y, x] = k
                while stack:
                    cy, cx = stack.pop()
                    n += 1
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and comp[ny, nx] < 0 and lesion[ny, nx] == lesion[y, x]:
                                comp[ny, nx] = k
                                stack.append((ny, nx))
                sizes.append(n)
                vals.append(int(lesion[y, x]))
    out = {}
    for x0, y0, x1, y1 in boxes:
        if tissue[y0:y1, x0:x1].mean() < min_tissue:
            continue
        area = (x1 - x0) * (y1 - y0)
        label = "normal"
        for v, name in ((1, "benign"), (2, "malignant")):  # later wins: malignant precedence
            inside = comp[y0:y1, x0:x1]
            frac_area = (lesion[y0:y1, x0:x1] == v).sum() / area
            held = max([(inside == k).sum() / sizes[k] for k in range(len(sizes)) if vals[k] == v] or [0])
            if frac_area >= min_lesion or held >= min_lesion:
                label = name
        out[(x0, y0)] = label
    return out


def test_image_patches_on_hand_built_masks():
    h, w = 80, 40                                  # side 10, stride 5
    tissue = np.zeros((h, w), bool)
    tissue[:, :25] = True                          # window x0=20 has exactly 50% tissue, x0=25 none
    lesion = np.zeros((h, w), np.uint8)
    lesion[8:12, 8:12] = 2                         # small malignant finding (16 px)
    lesion[40:60, 0:18] = 1                        # large benign finding (360 px)
    concept = np.zeros((h, w), np.uint8)
    concept[0:10, 0:5] = 255
    rows = image_patches(tissue, lesion, {"mass": concept})
    got = {(r["x0"], r["y0"]): r for r in rows}
    # tissue rule: x0 = 20 kept (exactly 50%), x0 = 25 and 30 dropped
    assert {x for x, _ in got} == {0, 5, 10, 15, 20}
    assert got[(20, 0)]["tissue"] == 0.5 and got[(0, 0)]["tissue"] == 1.0
    # malignant finding: the window at (0,0) holds 4/16 = 25% -> normal; (5,0) holds 8/16 -> malignant
    assert got[(0, 0)]["label"] == "normal"
    assert got[(10, 0)]["label"] == "normal"       # 4/16
    for key in [(5, 0), (0, 5), (5, 5)]:
        assert got[key]["label"] == "malignant", key
    # benign finding: window x0=15 covers 3 of its columns -> exactly 30% of the patch -> benign
    assert got[(15, 40)]["label"] == "benign"
    assert got[(15, 35)]["label"] == "normal"      # 15 px = 15% of patch, 4% of finding
    assert got[(0, 45)]["label"] == "benign"
    # concept fractions
    assert got[(0, 0)]["frac_mass"] == 0.5 and got[(5, 0)]["frac_mass"] == 0.0
    # every window agrees with the independent brute force
    ref = _reference_labels(tissue, lesion, patch_boxes(h, w))
    assert {k: r["label"] for k, r in got.items()} == ref


def test_image_patches_random_masks_match_brute_force():
    rng = np.random.default_rng(0)
    h, w = 48, 32
    for _ in range(5):
        lesion = np.zeros((h, w), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            lesion[y:y + rng.integers(1, 7), x:x + rng.integers(1, 7)] = rng.integers(1, 3)
        tissue = rng.random((h, w)) < 0.8
        got = {(r["x0"], r["y0"]): r["label"] for r in image_patches(tissue, lesion)}
        assert got == _reference_labels(tissue, lesion, patch_boxes(h, w))


# ---------------------------------------------------------------- a hand-built dataset folder
def _write_folder(root, n=4):
    """Tiny dataset: a bright 'breast' block on the left of a dark background, one finding each."""
    from deepminer.data.dataset import write_manifest

    (root / "images").mkdir(parents=True)
    (root / "lesions").mkdir()
    (root / "masks" / "mass").mkdir(parents=True)
    rows = []
    for i in range(n):
        h, w = 96, 64
        img = np.zeros((h, w), np.uint16)
        img[:, :44] = 1500 + 200 * i + 10 * np.arange(h)[:, None]   # a vertical ramp: no flip symmetry
        lesion = np.zeros((h, w), np.uint8)
        lesion[30:46, 10:26] = 2 if i % 2 else 1
        img[lesion > 0] = 4000
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(lesion).save(root / "lesions" / f"im{i}.png")
        Image.fromarray(((lesion > 0) * 255).astype(np.uint8)).save(root / "masks" / "mass" / f"im{i}.png")
        rows.append({"image_id": f"im{i}", "patient_id": f"p{i}", "view": "CC",
                     "split": ["train", "train", "val", "test"][i % 4],
                     "label": "malignant" if i % 2 else "benign", "image": f"images/im{i}.png",
                     "lesion_mask": f"lesions/im{i}.png", "report": ""})
    write_manifest(root, rows)
    return rows


def test_extract_patches_folder_and_cli(tmp_path):
    from deepminer.cli import main
    from deepminer.data.io import load_image
    from deepminer.data.patches import extract_patches
    from deepminer.data.tissue import tissue_mask

    rows = _write_folder(tmp_path / "ds")
    df = extract_patches(tmp_path / "ds", progress=False)
    assert list(df.columns) == list(BASE_COLUMNS) + ["frac_mass"]
    assert set(df["split"]) == {"train", "val", "test"}
    # each image's rows equal the array-level function on that image's own arrays
    for r in rows:
        px = load_image(tmp_path / "ds" / r["image"]).pixels
        lesion = np.asarray(Image.open(tmp_path / "ds" / r["lesion_mask"]))
        expect = image_patches(tissue_mask(px), lesion, {"mass": (lesion > 0) * 255})
        mine = df[df.image_id == r["image_id"]]
        assert len(mine) == len(expect) > 0
        assert mine["label"].tolist() == [e["label"] for e in expect]
        assert r["label"] in set(mine["label"])      # the finding produced patches of its class
        assert (mine["patient_id"] == r["patient_id"]).all() and (mine["split"] == r["split"]).all()
        assert (mine.loc[mine.label != "normal", "frac_mass"] > 0).all()

    assert main(["patches", "--data", str(tmp_path / "ds")]) == 0
    saved = read_patches(tmp_path / "ds" / "patches.csv")
    assert saved["label"].tolist() == df["label"].tolist()
    assert all(isinstance(v, str) for v in saved["image_id"])
    out = tmp_path / "other.csv"
    assert main(["patches", "--data", str(tmp_path / "ds"), "--out", str(out)]) == 0 and out.is_file()

    # PatchDataset: crops resized, flips keep content, labels as indices
    import torch

    ds = PatchDataset(tmp_path / "ds", saved, size=32)
    k = int(np.flatnonzero((saved.x1 > 44).to_numpy() & (saved.x0 < 44).to_numpy())[0])  # straddles the edge
    x, y = ds[k]
    assert tuple(x.shape) == (1, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y == ("normal", "benign", "malignant").index(saved["label"][k])
    r0 = saved.iloc[k]
    px0 = load_image(tmp_path / "ds" / f"images/{r0.image_id}.png").pixels
    assert np.allclose(ds.crop(k), px0[r0.y0:r0.y1, r0.x0:r0.x1], atol=1e-4)
    assert len({tuple(f.flatten().tolist()) for f in [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]}) == 4
    torch.manual_seed(0)
    aug = PatchDataset(tmp_path / "ds", saved, size=32, augment=True)
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    seen = set()
    for _ in range(24):
        a = aug[k][0]
        hits = [j for j, f in enumerate(flips) if torch.equal(a, f)]
        assert hits, "augmentation must only flip"
        seen.add(hits[0])
    assert seen == {0, 1, 2, 3}


def test_patches_bad_input(tmp_path, capsys):
    from deepminer.cli import main

    assert main(["patches", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    _write_folder(tmp_path / "ds")
    Image.fromarray(np.full((96, 64), 7, np.uint8)).save(tmp_path / "ds" / "lesions" / "im1.png")
    assert main(["patches", "--data", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "im1.png" in err and "0/1/2" in err
    assert not (tmp_path / "ds" / "patches.csv").exists()   # nothing half-written
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "ds" / "lesions" / "im1.png")
    assert main(["patches", "--data", str(tmp_path / "ds")]) == 2
    assert "mask is 10x10" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="missing columns"):
        read_patches(tmp_path / "bad.csv")


def test_cap_per_class_and_stratified_subsample():
    import pandas as pd

    from deepminer.data.patches import cap_per_class, subsample

    t = pd.DataFrame({"label": ["normal"] * 900 + ["benign"] * 60 + ["malignant"] * 40, "i": range(1000)})
    capped = cap_per_class(t, 50, seed=0)
    assert capped.label.value_counts().to_dict() == {"normal": 50, "benign": 50, "malignant": 40}
    assert capped.i.is_monotonic_increasing and capped.i.is_unique          # order kept, no repeats
    assert cap_per_class(t, 50, seed=0).equals(capped)                      # seeded
    assert not cap_per_class(t, 50, seed=1).equals(capped)
    sub = subsample(t, 100, seed=0)
    assert sub.label.value_counts().to_dict() == {"normal": 90, "benign": 6, "malignant": 4}  # the mix is kept
    assert len(subsample(t, None, seed=0)) == 1000 and len(cap_per_class(t, None, seed=0)) == 1000
