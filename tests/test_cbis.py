"""CBIS-DDSM import on a tiny download the test writes in the real folder and CSV layout (real DICOMs,
real column names, TCIA's two folder namings, a swapped ROI/crop row, a half-size ROI mask)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from deepminer.cli import main
from deepminer.concepts import concepts_from_report, parse_report
from deepminer.data.cbis import assign_splits, describe, import_cbis, read_cases
from deepminer.data.dataset import concepts_in, read_manifest
from deepminer.data.io import load_image
from dicomfixtures import CALC_COLUMNS, write_cbis_fixture, write_csv


@pytest.fixture(scope="module")
def cbis(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbis")
    truth = write_cbis_fixture(root)
    out = tmp_path_factory.mktemp("ds") / "cbis_ds"
    assert main(["import-cbis", "--root", str(root), "--out", str(out)]) == 0
    return root, truth, out


def test_manifest_labels_reports_and_patient_disjoint_splits(cbis):
    root, truth, out = cbis
    rows = {r["image_id"]: r for r in read_manifest(out)}  # also validates labels/splits
    assert sorted(rows) == ["P_00001_LEFT_CC", "P_00001_LEFT_MLO", "P_00002_RIGHT_MLO", "P_00003_LEFT_CC",
                            "P_00003_RIGHT_CC"]
    labels = {k: r["label"] for k, r in rows.items()}
    assert labels == {"P_00001_LEFT_CC": "malignant", "P_00001_LEFT_MLO": "benign",  # BENIGN_WITHOUT_CALLBACK
                      "P_00002_RIGHT_MLO": "benign", "P_00003_LEFT_CC": "malignant", "P_00003_RIGHT_CC": "benign"}
    assert rows["P_00001_LEFT_CC"]["report"] == (
        "LESION_TYPE MASS SHAPE IRREGULAR-ARCHITECTURAL_DISTORTION MARGINS SPICULATED; "
        "LESION_TYPE CALCIFICATION TYPE PLEOMORPHIC DISTRIBUTION CLUSTERED")
    assert rows["P_00002_RIGHT_MLO"]["report"] == (
        "LESION_TYPE CALCIFICATION TYPE PUNCTATE-PLEOMORPHIC DISTRIBUTION CLUSTERED; "
        "LESION_TYPE CALCIFICATION TYPE AMORPHOUS")  # N/A distribution left out
    assert rows["P_00003_RIGHT_CC"]["report"] == "LESION_TYPE CALCIFICATION TYPE VASCULAR"
    # the project's report parser reads the multi-valued CBIS descriptor as two shape values
    lesions = parse_report(rows["P_00001_LEFT_CC"]["report"])
    assert lesions[0]["SHAPE"] == ["IRREGULAR", "ARCHITECTURAL_DISTORTION"] and lesions[1]["TYPE"] == ["PLEOMORPHIC"]
    names = {c.name for c in concepts_from_report(rows["P_00001_LEFT_CC"]["report"])}
    assert {"mass_irregular", "architectural_distortion", "mass_spiculated_margin", "calc_fine_pleomorphic",
            "calc_clustered"} <= names
    split = {r["patient_id"]: set() for r in rows.values()}
    for r in rows.values():
        split[r["patient_id"]].add(r["split"])
    assert all(len(s) == 1 for s in split.values())  # patient-disjoint
    assert split["P_00003"] == {"test"}  # in the test CSV (and in a training CSV): test
    assert {next(iter(split["P_00001"])), next(iter(split["P_00002"]))} == {"train", "val"}
    assert {r["view"] for r in rows.values()} == {"CC", "MLO"}
    meta = json.loads((out / "cbis_import.json").read_text())
    assert meta["images"] == 5 and meta["patients"] == 3 and meta["labels"] == {"benign": 3, "malignant": 2}


def test_images_are_the_dicom_pixels_as_16bit_png(cbis):
    root, truth, out = cbis
    for image_id, values in truth["images"].items():
        img = load_image(out / "images" / f"{image_id}.png")
        with Image.open(out / "images" / f"{image_id}.png") as im:
            assert im.mode == "I;16"
            np.testing.assert_array_equal(np.asarray(im), values)  # lossless, MONOCHROME2, 16 bits stored
        assert img.bits_stored == 16
        side, view = image_id.split("_")[2:]
        assert (img.laterality, img.view) == (side[0], view)


def test_lesion_masks_union_of_rois_benign_1_malignant_2(cbis):
    root, truth, out = cbis
    rois = truth["rois"]
    for image_id in truth["images"]:
        lesion = np.asarray(Image.open(out / "lesions" / f"{image_id}.png"))
        expect = np.zeros_like(lesion)
        for (iid, kind, _abn), m in rois.items():
            if iid == image_id:
                label = {"P_00001_LEFT_CC": {"mass": 2, "calc": 1}, "P_00003_LEFT_CC": {"mass": 2}}
                value = label.get(image_id, {}).get(kind, 1)
                expect = np.maximum(expect, m.astype(np.uint8) * value)
        if image_id == "P_00001_LEFT_CC":  # the calc ROI was stored at half size: nearest-resized back
            assert np.count_nonzero(lesion != expect) <= 0.2 * np.count_nonzero(expect == 1)
            assert set(np.unique(lesion)) == {0, 1, 2}
            assert np.array_equal(lesion == 2, rois[(image_id, "mass", 1)])
        else:
            np.testing.assert_array_equal(lesion, expect)
    # the swapped ROI/crop row of P_00002 found the binary mask, not the cropped image
    lesion = np.asarray(Image.open(out / "lesions" / "P_00002_RIGHT_MLO.png"))
    assert np.array_equal(lesion > 0, rois[("P_00002_RIGHT_MLO", "calc", 1)] | rois[("P_00002_RIGHT_MLO", "calc", 2)])


def test_concept_masks_from_the_rois(cbis):
    root, truth, out = cbis
    concepts = concepts_in(out)
    assert {"mass_spiculated_margin", "calc_clustered", "mass_oval", "mass", "calcification"} <= set(concepts)
    spic = np.asarray(Image.open(out / "masks" / "mass_spiculated_margin" / "P_00001_LEFT_CC.png"))
    assert set(np.unique(spic)) == {0, 255}
    assert np.array_equal(spic > 0, truth["rois"][("P_00001_LEFT_CC", "mass", 1)])
    assert not np.asarray(Image.open(out / "masks" / "mass_spiculated_margin" / "P_00003_LEFT_CC.png")).any()
    for c in concepts:  # every image has every concept's mask
        assert len(list((out / "masks" / c).glob("*.png"))) == 5


def test_describe_and_seeded_splits(cbis):
    root, _, _ = cbis
    assert describe("mass", "lobulated-irregular", " N/A ") == "LESION_TYPE MASS SHAPE LOBULATED-IRREGULAR"
    assert describe("calc", "ROUND_AND_REGULAR-LUCENT_CENTER", "") == \
        "LESION_TYPE CALCIFICATION TYPE ROUND_AND_REGULAR-LUCENT_CENTER"
    images = read_cases(root)
    a = assign_splits(images, val_fraction=0.15, seed=0)
    assert a == assign_splits(images, val_fraction=0.15, seed=0)
    seen = {tuple(sorted(assign_splits(images, seed=s).items())) for s in range(8)}
    assert len(seen) == 2  # the train/val choice depends on the seed; test never does
    assert all(dict(s)["P_00003"] == "test" for s in seen)
    assert set(assign_splits(images, val_fraction=0.0).values()) == {"train", "test"}


def test_limit_keeps_whole_rows_and_the_contract(cbis, tmp_path):
    root, truth, _ = cbis
    summary = import_cbis(root, tmp_path / "two", limit=2)
    rows = read_manifest(tmp_path / "two")
    assert summary["images"] == 2 and [r["image_id"] for r in rows] == ["P_00001_LEFT_CC", "P_00001_LEFT_MLO"]
    assert all((tmp_path / "two" / r["image"]).is_file() and (tmp_path / "two" / r["lesion_mask"]).is_file()
               for r in rows)


# --------------------------------------------------------------------------------------- bad input
def _run_bad(capsys, root, out):
    code = main(["import-cbis", "--root", str(root), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("import-cbis:")]  # the progress bar
    assert code == 2 and len(err) == 1 and err[0].startswith("deepminer import-cbis: error: "), err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no staging left
    return err[0]


def test_missing_csv(tmp_path, capsys):
    root = tmp_path / "cbis"
    write_cbis_fixture(root)
    (root / "calc_case_description_test_set.csv").unlink()
    msg = _run_bad(capsys, root, tmp_path / "out")
    assert "calc_case_description_test_set.csv: missing" in msg


def test_csv_missing_columns_named(tmp_path, capsys):
    root = tmp_path / "cbis"
    write_cbis_fixture(root)
    cols = [c for c in CALC_COLUMNS if c not in ("pathology", "calc distribution")]
    write_csv(root / "calc_case_description_train_set.csv", cols, [])
    msg = _run_bad(capsys, root, tmp_path / "out")
    assert msg.endswith("calc_case_description_train_set.csv: missing columns pathology, calc distribution")


def test_missing_dicom_named(tmp_path, capsys):
    root = tmp_path / "cbis"
    truth = write_cbis_fixture(root)
    victim = next(p for p in truth["dicoms"] if "Mass-Test_P_00003_LEFT_CC/" in str(p))
    import shutil
    shutil.rmtree(root / "CBIS-DDSM" / "Mass-Test_P_00003_LEFT_CC")
    assert not victim.exists()
    msg = _run_bad(capsys, root, tmp_path / "out")
    assert "mass_case_description_test_set.csv:2: full mammogram DICOM Mass-Test_P_00003_LEFT_CC/" in msg
    assert "not found" in msg


def test_broken_dicom_fails_mid_import_leaving_nothing(tmp_path, capsys):
    root = tmp_path / "cbis"
    truth = write_cbis_fixture(root)
    victim = next(p for p in truth["dicoms"] if "Mass-Test_P_00003_LEFT_CC/" in str(p))
    victim.write_bytes(victim.read_bytes()[:-2000])  # truncated pixel data, found only when decoding
    msg = _run_bad(capsys, root, tmp_path / "out")
    assert f"{victim}: truncated or corrupt DICOM pixel data" in msg


def test_bad_pathology_and_existing_output(tmp_path, capsys):
    root = tmp_path / "cbis"
    write_cbis_fixture(root)
    path = root / "mass_case_description_test_set.csv"
    rows = list(csv.DictReader(open(path, newline="")))
    rows[0]["pathology"] = "UNKNOWN"
    write_csv(path, list(rows[0]), rows)
    msg = _run_bad(capsys, root, tmp_path / "out")
    assert msg.endswith("mass_case_description_test_set.csv:2: pathology 'UNKNOWN' not in "
                        "MALIGNANT/BENIGN/BENIGN_WITHOUT_CALLBACK")
    (tmp_path / "taken").mkdir()
    assert main(["import-cbis", "--root", str(root), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
