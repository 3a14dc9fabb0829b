"""The phantom generator: anatomy, findings and their masks, the label rule, reports, determinism,
the dataset folder it writes, the CLI's errors, and that a histogram does not give the label away."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from deepminer import CLASSES, concepts
from deepminer.cli import main
from deepminer.data import phantoms as P
from deepminer.data.dataset import MANIFEST_COLUMNS, read_manifest
from deepminer.errors import InputError


def _with(finding: P.Finding, seed: int = 3, index: int = 0, label: str = "malignant") -> P.Patient:
    return replace(P.draw_patient(seed, index, label), findings=(finding,), dense_fraction=0.3)


def _mass(shape: str, margin: str, size: float = 0.1) -> P.Finding:
    return P.Finding("mass", "malignant", size, 0.5, 0.0, 5, shape=shape, margin=margin)


def _calc(ctype: str, dist: str | None = None) -> P.Finding:
    size = 0.12 if ctype == "vascular" else 0.08
    return P.Finding("calcification", "malignant", size, 0.5, 0.0, 5, calc_type=ctype,
                     distribution=dist or P._CALC_DISTRIBUTION[ctype][0])


# ----------------------------------------------------------------------------------- findings
def test_spicules_touch_their_mass_and_radiate_outward():
    ph = P.render_phantom(3, 0, 512, view="CC", laterality="L", patient=_with(_mass("irregular", "spiculated")))
    mass, spic = ph.masks["mass"], ph.masks["spicules"]
    assert mass.sum() > 100 and spic.sum() > 50
    assert ph.masks["mass_spiculated_margin"].sum() == mass.sum()
    cy, cx = ndi.center_of_mass(mass)
    yy, xx = np.mgrid[: mass.shape[0], : mass.shape[1]]
    dist = np.hypot(xx - cx, yy - cy)
    r_mass = dist[mass].max()
    assert (spic & ~mass).sum() >= 0.8 * spic.sum()  # the lines lie outside the mass...
    assert dist[spic].max() > 1.4 * r_mass  # ...and reach well beyond it
    near_mass = ndi.binary_dilation(mass, iterations=1)
    labels, n = ndi.label(spic, structure=np.ones((3, 3)))
    assert n >= 5
    for k in range(1, n + 1):
        comp = labels == k
        assert (comp & near_mass).any(), "every spicule starts at the mass boundary"
        d = dist[comp]
        radial = d.max() - d.min()
        ang = np.unwrap(np.sort(np.arctan2(yy[comp] - cy, xx[comp] - cx)))
        tangential = (ang.max() - ang.min()) * d.mean()
        assert radial > 3 and radial > 1.5 * tangential, "spicules run radially"
    # and they are visible: brighter than the tissue at the same distance from the centre
    ring = (dist > r_mass * 1.2) & (dist < r_mass * 1.8) & ph.breast
    img = ph.image.astype(float)
    assert img[ring & spic].mean() > img[ring & ~ndi.binary_dilation(spic, iterations=2)].mean() + 40


@pytest.mark.parametrize("finding,concept", [
    (_mass("round", "circumscribed"), "mass_round"),
    (_mass("oval", "obscured"), "mass_oval"),
    (_mass("lobular", "microlobulated"), "mass_lobular"),
    (_mass("irregular", "ill_defined"), "mass_irregular"),
    (_calc("coarse"), "calc_coarse"),
    (_calc("rod_like"), "calc_rod_like"),
    (_calc("vascular"), "calc_vascular"),
    (_calc("round", "clustered"), "calc_round"),
    (_calc("fine_pleomorphic"), "calc_fine_pleomorphic"),
    (_calc("fine_linear_branching"), "calc_fine_linear_branching"),
])
def test_each_finding_is_drawn_where_its_masks_say(finding, concept):
    ph = P.render_phantom(4, 1, 384, view="MLO", laterality="R", patient=_with(finding))
    m = ph.masks[concept]
    assert m.any()
    img = ph.image.astype(float)
    around = ndi.binary_dilation(m, iterations=6) & ~ndi.binary_dilation(m, iterations=2) & ph.breast
    assert img[m].mean() > img[around].mean() + 150, "the finding is denser than its surroundings"
    present = {name for name, mk in ph.masks.items() if mk.any()}
    assert present == {c.name for c in concepts.concepts_from_report(ph.report)}
    assert set(finding.concepts()) == present
    lesion = ph.lesion > 0
    assert (m & ~lesion).sum() == 0, "the concept lies inside the lesion mask"
    assert ndi.label(lesion, structure=np.ones((3, 3)))[1] == 1, "one finding, one component"


def test_architectural_distortion_has_radiating_lines_and_a_region():
    f = P.Finding("architectural_distortion", "malignant", 0.12, 0.5, 0.0, 5)
    ph = P.render_phantom(5, 2, 512, view="CC", laterality="L", patient=_with(f))
    region = ph.masks["architectural_distortion"]
    assert region.sum() > 200 and not ph.masks["mass"].any()
    assert ph.report == "LESION_TYPE MASS SHAPE ARCHITECTURAL_DISTORTION"
    cy, cx = ndi.center_of_mass(region)
    yy, xx = np.mgrid[: region.shape[0], : region.shape[1]]
    ang = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    ring = region & (dist > 6) & (dist < 14)
    # lines radiate: brightness along a ring around the centre alternates (many angular peaks)
    order = np.argsort(ang[ring])
    profile = ph.image[ring].astype(float)[order]
    smooth = np.convolve(profile - profile.mean(), np.ones(3) / 3, mode="same")
    assert (np.diff(np.sign(smooth)) != 0).sum() >= 12


# ----------------------------------------------------------------------------------- anatomy
@pytest.fixture(scope="module")
def sample() -> list[P.Phantom]:
    return [P.render_phantom(11, i, 256, label=CLASSES[i % 3], view=P.VIEWS[(i // 3) % 2]) for i in range(18)]


def test_twelve_bit_image_dark_background_bright_breast(sample):
    for ph in sample:
        h, w = ph.image.shape
        assert ph.image.dtype == np.uint16 and (h, w) == (256, round(0.59 * 256))
        assert ph.image.max() <= 4095 and ph.image.max() > 1800
        assert np.median(ph.image[~ph.breast]) < 100 < 600 < np.median(ph.image[ph.breast])
        assert 0.3 < ph.breast.mean() < 0.95


def test_masks_lie_inside_the_breast_and_lesions_follow_the_label(sample):
    for ph in sample:
        assert set(ph.masks) == set(P.PHANTOM_CONCEPTS)
        for name, m in ph.masks.items():
            assert m.shape == ph.image.shape and not (m & ~ph.breast).any(), name
        vals = set(np.unique(ph.lesion)) - {0}
        assert vals == ({2} if ph.label == "malignant" else {1} if ph.label == "benign" else set())
        present = {n for n, m in ph.masks.items() if m.any()}
        assert present == {c.name for c in concepts.concepts_from_report(ph.report)}
        assert (ph.report == "") == (ph.label == "normal")


def test_pectoral_muscle_only_on_mlo_at_the_chest_wall_top(sample):
    for ph in sample:
        pect = ph.pectoral
        if ph.view == "CC":
            assert not pect.any()
            continue
        h, w = pect.shape
        ys, xs = np.nonzero(pect)
        wall = 0 if ph.laterality == "L" else w - 1
        assert pect[0, wall] and ys.max() < 0.6 * h
        assert abs(xs.mean() - wall) < 0.3 * w
        img = ph.image.astype(float)
        assert img[pect].mean() > np.median(img[ph.breast & ~pect])
        assert not any(m[pect].any() for m in ph.masks.values()) and not ph.lesion[pect].any()


def test_left_and_right_are_mirror_images():
    left = P.render_phantom(2, 7, 256, label="malignant", view="MLO", laterality="L")
    right = P.render_phantom(2, 7, 256, label="malignant", view="MLO", laterality="R")
    assert np.array_equal(right.image, left.image[:, ::-1])
    assert np.array_equal(right.lesion, left.lesion[:, ::-1])
    for name in P.PHANTOM_CONCEPTS:
        assert np.array_equal(right.masks[name], left.masks[name][:, ::-1])
    # the chest wall (a full column of breast) is on the left for L and on the right for R
    assert left.breast[:, 0].mean() > 0.4 > left.breast[:, -1].mean()
    assert right.breast[:, -1].mean() > 0.4 > right.breast[:, 0].mean()


def test_breast_mask_agrees_with_the_tissue_detector(sample):
    from deepminer.data.tissue import tissue_mask

    for ph in sample[:6]:
        found = tissue_mask(ph.image.astype(np.float32) / 4095)
        iou = (found & ph.breast).sum() / (found | ph.breast).sum()
        assert iou > 0.85


# ----------------------------------------------------------------------------------- labels
def test_label_rule_and_documented_overlap_rate():
    pats = [P.draw_patient(7, i) for i in range(3000)]
    counts = {c: sum(p.label == c for p in pats) for c in CLASSES}
    assert all(850 < n < 1150 for n in counts.values())
    abnormal = [p for p in pats if p.label != "normal"]
    for p in pats:
        if p.label == "normal":
            assert not p.findings and not p.mimic
            continue
        assert 1 <= len(p.findings) <= 2
        for f in p.findings:
            assert f.pathology == p.label
            assert (f.looks == p.label) != p.mimic
            assert f.looks == ("malignant" if P.looks_malignant(f) else "benign")
        assert p.findings and P.report_line(p.findings).count("LESION_TYPE") == len(p.findings)
    rate = sum(p.mimic for p in abnormal) / len(abnormal)
    assert 0.035 < rate < 0.065  # documented 5 %
    for lab in ("benign", "malignant"):  # both directions of the overlap occur
        assert any(p.mimic for p in abnormal if p.label == lab)
    # hand-checked cases of the rule
    assert P.looks_malignant(_mass("round", "spiculated")) and P.looks_malignant(_mass("irregular", "circumscribed"))
    assert not P.looks_malignant(_mass("oval", "obscured"))
    assert P.looks_malignant(_calc("fine_pleomorphic")) and not P.looks_malignant(_calc("rod_like"))


def test_density_and_exposure_do_not_depend_on_the_label():
    pats = [P.draw_patient(8, i) for i in range(3000)]
    for attr in ("dense_fraction", "gain", "fat"):
        means = [np.mean([getattr(p, attr) for p in pats if p.label == c]) for c in CLASSES]
        spread = np.std([getattr(p, attr) for p in pats])
        assert max(means) - min(means) < 0.12 * spread, attr
    # the same patient's anatomy does not change with the label asked for
    a, b = P.draw_patient(8, 5, "normal"), P.draw_patient(8, 5, "malignant")
    assert (a.density, a.gain, a.laterality) == (b.density, b.gain, b.laterality)


def test_reports_are_ddsm_style():
    assert _mass("irregular", "spiculated").report() == "LESION_TYPE MASS SHAPE IRREGULAR MARGINS SPICULATED"
    assert _calc("fine_pleomorphic").report() == \
        "LESION_TYPE CALCIFICATION TYPE PLEOMORPHIC DISTRIBUTION CLUSTERED"
    assert _calc("rod_like").report() == "LESION_TYPE CALCIFICATION TYPE LARGE_RODLIKE DISTRIBUTION SEGMENTAL"
    two = P.report_line([_mass("lobular", "obscured"), _calc("round", "regional")])
    assert two == ("LESION_TYPE MASS SHAPE LOBULATED MARGINS OBSCURED; "
                   "LESION_TYPE CALCIFICATION TYPE ROUND_AND_REGULAR DISTRIBUTION REGIONAL")


@pytest.mark.slow
def test_an_intensity_histogram_does_not_reveal_the_label():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images, labels = [], []
    for i in range(90):
        ph = P.render_phantom(0, i, 160, label=CLASSES[i % 3], view=P.VIEWS[(i // 3) % 2])
        images.append(ph.image.astype(np.float64))
        labels.append(ph.label)
    y = np.array(labels)

    def auc(imgs, target):
        x = np.array([np.histogram(im, bins=32, range=(0, 4096))[0] / im.size for im in imgs])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        p = cross_val_predict(clf, x, target, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                              method="predict_proba")[:, 1]
        return roc_auc_score(target, p)

    assert auc(images, y == "malignant") < 0.7
    assert auc(images, y != "normal") < 0.7
    # the check has power: malignant images made 20 % brighter are found
    brighter = [np.clip(im * (1.2 if lab == "malignant" else 1.0), 0, 4095) for im, lab in zip(images, y)]
    assert auc(brighter, y == "malignant") > 0.8


# ----------------------------------------------------------------------------------- dataset folder
def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_arguments_same_bytes_other_seed_other_images(tmp_path):
    a = P.generate_dataset(tmp_path / "a", 6, 5, 128)
    b = P.generate_dataset(tmp_path / "b", 6, 5, 128)
    c = P.generate_dataset(tmp_path / "c", 6, 6, 128)
    d = P.generate_dataset(tmp_path / "d", 6, 5, 128, jobs=2)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db == _digest(d) and len(da) == 2 + 6 * (1 + len(P.PHANTOM_CONCEPTS)) + sum(
        1 for r in read_manifest(a) if r["lesion_mask"])
    assert all(da[k] != dc.get(k) for k in da if k.startswith("images/"))
    # any image can be made alone, in any order, and equals the one in the folder
    row = read_manifest(a)[3]
    pid = int(row["patient_id"][1:])
    ph = P.render_phantom(5, pid, 128, label=row["label"], view=row["view"])
    assert np.array_equal(np.asarray(Image.open(a / row["image"])), ph.image)


# numpy picks SIMD kernels for its transcendental functions by CPU, glibc its libm variants (FMA or
# not): these settings make this machine run the code a CPU without them runs (set before Python starts)
CPU_SETTINGS = {
    "AVX-512 off": {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
    "x86-64-v2 baseline, no FMA": {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
                                   "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F,-AVX"},
}
_RENDER = """
import hashlib, sys, numpy as np
from deepminer.data import phantoms as P
h = hashlib.sha256()
for index, size, view in ((0, 384, "CC"), (1, 384, "MLO"), (2, 512, "MLO"), (4, 768, "CC"), (7, 300, "MLO")):
    ph = P.render_phantom(11, index, size, view=view)
    h.update(P.png16(ph.image))
    h.update(ph.lesion.tobytes())
    for name in P.PHANTOM_CONCEPTS:
        h.update(np.packbits(ph.masks[name]).tobytes())
# the control: numpy's own float32 functions, which do depend on the CPU
x = np.linspace(0.01, 30, 200_001, dtype=np.float32)
ctl = hashlib.sha256(np.arctan2(x, x[::-1]).tobytes() + np.power(x, np.float32(0.7)).tobytes()
                     + np.tanh(x / 10).tobytes() + np.exp(-x).tobytes())
features = np._core._multiarray_umath.__cpu_features__  # X86_V3: AVX2 + FMA; X86_V4: AVX-512 (if not disabled)
print(h.hexdigest(), ctl.hexdigest(), " ".join(k for k in ("X86_V3", "X86_V4") if features.get(k)))
"""


def _render_in(env_extra: dict[str, str]) -> tuple[str, str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("NPY_DISABLE_CPU_FEATURES", "GLIBC_TUNABLES")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _RENDER], env=env, capture_output=True, text=True, check=True,
                         timeout=300).stdout.split(maxsplit=2)
    return out[0], out[1], out[2] if len(out) > 2 else ""


@pytest.mark.slow
def test_same_bytes_whatever_simd_kernels_the_cpu_gives():
    """Phantoms (image bytes and every mask) rendered with this CPU's SIMD kernels equal those rendered
    as a CPU without AVX-512, and as one with only the x86-64-v2 baseline and no FMA, would render them;
    the control (numpy's own float32 transcendental functions) shows that the settings do change the
    kernels on this machine, so the comparison is not vacuous."""
    here, here_ctl, features = _render_in({})
    for name, env in CPU_SETTINGS.items():
        other, other_ctl, _ = _render_in(env)
        assert other == here, f"phantom bytes differ with {name}"
        if name.startswith("x86-64-v2") and "X86_V3" in features:
            assert other_ctl != here_ctl, "the control: numpy's kernels should differ without AVX2"
        if name.startswith("AVX-512") and "X86_V4" in features:
            assert other_ctl != here_ctl, "the control: numpy's kernels should differ without AVX-512"


def test_dataset_folder_contract(tmp_path):
    out = tmp_path / "ds"
    assert main(["phantoms", "--out", str(out), "--count", "13", "--seed", "2", "--size", "128",
                 "--splits", "0.5,0.25,0.25", "--label-mix", "0.2,0.4,0.4"]) == 0
    rows = read_manifest(out)
    assert len(rows) == 13 and list(rows[0]) == list(MANIFEST_COLUMNS)
    by_patient: dict[str, set] = {}
    for r in rows:
        assert r["image_id"] == f"{r['patient_id']}_{r['image_id'].split('_')[1]}_{r['view']}"
        by_patient.setdefault(r["patient_id"], set()).add((r["split"], r["label"], r["report"]))
        im = Image.open(out / r["image"])
        assert im.mode.startswith("I;16") and im.size == (76, 128)
        assert im.info.get("View") == r["view"]
        for c in P.PHANTOM_CONCEPTS:
            m = np.asarray(Image.open(out / "masks" / c / f"{r['image_id']}.png"))
            assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        if r["label"] == "normal":
            assert r["lesion_mask"] == "" and r["report"] == ""
        else:
            les = np.asarray(Image.open(out / r["lesion_mask"]))
            assert set(np.unique(les)) == {0, 1 if r["label"] == "benign" else 2}
    assert all(len(v) == 1 for v in by_patient.values()), "one split, label and report per patient"
    assert len(by_patient) == 7
    labels = [next(iter(v))[1] for v in by_patient.values()]
    assert sorted(labels).count("normal") == 1  # 20 % of 7 patients, largest remainder
    from deepminer.data.io import load_image

    img = load_image(out / rows[0]["image"])
    assert img.bits_stored == 12 and img.laterality == rows[0]["image_id"].split("_")[1]
    assert img.view == rows[0]["view"]


def test_cli_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "deepminer", "phantoms", "--out", str(tmp_path / "x"),
                        "--count", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--count" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    capsys.readouterr()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for args, says in [(["--out", str(blocker / "ds"), "--count", "2"], "cannot write"),
                       (["--out", str(tmp_path / "y"), "--count", "2", "--splits", "0.5,0.2"], "sum to 1"),
                       (["--out", str(tmp_path / "y"), "--count", "2", "--label-mix", "a,b"], "not a list"),
                       (["--out", str(tmp_path / "y"), "--count", "2", "--size", "10"], "size"),
                       (["--out", str(tmp_path / "y"), "--count", "2", "--seed", "-1"], "seed")]:
        assert main(["phantoms", "--size", "64", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    # a folder that is not a dataset is never replaced
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    with pytest.raises(InputError, match="not a dataset folder"):
        P.generate_dataset(keep, 2, 0, 64)
    assert (keep / "precious.txt").exists()


# ----------------------------------------------------------------------------------- for a person
def test_save_cc_and_mlo_with_lesion_outline(artifacts_dir):
    tiles = []
    for view, f in (("CC", _mass("irregular", "spiculated", 0.09)), ("MLO", _calc("fine_pleomorphic"))):
        ph = P.render_phantom(21, 4, 1024, view=view, patient=_with(f, 21, 4))
        grey = (ph.image.astype(np.float32) / 4095 * 255).clip(0, 255).astype(np.uint8)
        rgb = np.stack([grey] * 3, -1)
        lesion = ph.lesion > 0
        edge = lesion & ~ndi.binary_erosion(lesion, iterations=2)
        rgb[edge] = (255, 40, 40)
        Image.fromarray(rgb).save(artifacts_dir / f"phantom_{view.lower()}.png")
        tiles.append(rgb)
    assert tiles[0].shape == (1024, 604, 3)
