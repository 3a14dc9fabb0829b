"""``deepminer evaluate-explanations`` end to end on a tiny model and a small phantom set: the report
files, the numbers against the per-image records, resume after a kill, and bad input."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepminer.cli import main

FAST = "cam,class_map,top_units,gradcam,random,tissue_prior"


@pytest.fixture(scope="module")
def eval_data(tiny_demo, tmp_path_factory) -> dict:
    """8 phantoms (192 px), all in the test split, mostly abnormal; the session's tiny model + atlas."""
    from deepminer.data.phantoms import generate_dataset

    root = tmp_path_factory.mktemp("eval")
    data = generate_dataset(root / "data", 8, 11, 192, splits={"test": 1.0},
                            label_mix={"normal": 0.25, "benign": 0.35, "malignant": 0.4})
    return {"data": data, "model": tiny_demo["model_dir"] / "model.pt", "root": root}


def _run(eval_data, out: Path, *extra: str) -> int:
    return main(["evaluate-explanations", "--model", str(eval_data["model"]), "--data", str(eval_data["data"]),
                 "--out", str(out), "--quiet", "--bootstrap", "200", *extra])


@pytest.fixture(scope="module")
def report_dir(eval_data) -> Path:
    out = eval_data["root"] / "report"
    assert _run(eval_data, out, "--methods", FAST, "--sanity-images", "1") == 0
    return out


def test_report_files_and_numbers(report_dir, eval_data, capsys):
    report = json.loads((report_dir / "report.json").read_text())
    rows = list(csv.DictReader(open(report_dir / "per_image.csv")))
    summary = list(csv.DictReader(open(report_dir / "summary.csv")))
    manifest = list(csv.DictReader(open(eval_data["data"] / "manifest.csv")))
    abnormal = [r for r in manifest if r["label"] != "normal"]
    c = report["counts"]
    assert c["images"] == 8 and c["abnormal"] == len(abnormal) and c["normal_not_evaluated"] == 8 - len(abnormal)
    assert report["model"]["weights_sha256"] and report["data"]["manifest_sha256"] and report["reference"] == "cam"
    assert report["methods"] == FAST.split(",")
    # every summary mean is the mean of the per-image values it summarises (truth view, all abnormal)
    for metric in ("auprc", "pointing", "iou", "relevance_mass", "deletion", "insertion"):
        for method in ("cam", "random", "tissue_prior"):
            vals = [float(r[metric]) for r in rows if r["method"] == method and r["view"] == "truth" and r[metric] != ""]
            s = next(x for x in summary if x["method"] == method and x["metric"] == metric and x["view"] == "truth"
                     and x["subset"] == "abnormal")
            assert int(s["n"]) == len(vals) and float(s["mean"]) == pytest.approx(np.mean(vals), abs=1e-9)
            assert float(s["lo"]) <= float(s["mean"]) <= float(s["hi"])
    # baselines and the reference's paired differences are there
    assert {"random", "tissue_prior"} <= {s["method"] for s in summary if s["baseline"] == "True"}
    assert all(s["diff_vs"] == "cam" for s in summary if s["method"] != "cam" and int(s["n"]) > 0)
    # sanity on one image: the baselines ignore the model (correlation 1 at every step: they fail), CAM's
    # map moves with the model (the pass/fail of CAM itself is checked on a structured case in test_eval_sanity)
    sanity = report["sanity"]["methods"]
    assert report["sanity"]["images"] == 1
    for baseline in ("random", "tissue_prior"):
        assert sanity[baseline]["passes"] is False and sanity[baseline]["spearman"][1] == pytest.approx(1.0)
    assert sanity["cam"]["spearman"][1] < 0.9 and sanity["cam"]["steps"][0] == "head"
    for name in ("bars_auprc.png", "pr_curves.png", "deletion_insertion.png", "sanity.png", "gallery_cam.png"):
        assert (report_dir / "figures" / name).stat().st_size > 1000
    assert not any(p.name.startswith(".") for p in report_dir.parent.iterdir() if "report" in p.name)  # no resume left
    # how right the model was on the images it explained: the records' own predictions, every image
    cl = report["classification"]
    truth = {r["image_id"]: (r["label"], r["prediction"]) for r in rows}
    classes = ["normal", "benign", "malignant"]
    assert cl["n"] == 8 and cl["classes"] == classes and cl["intervals"] is False  # 8 images: no intervals
    want = [[sum(1 for t, p in truth.values() if t == a and p == b) for b in classes] for a in classes]
    assert cl["confusion"] == want
    assert cl["accuracy"]["value"] == pytest.approx(sum(t == p for t, p in truth.values()) / 8)
    from deepminer.evaluation.report import format_table

    text = format_table(report)
    assert "how right the model was on the 8 images explained" in text and "abnormal vs normal AUC" in text


def test_resume_skips_kept_images_and_refuses_other_settings(eval_data, tmp_path, monkeypatch, capsys):
    from deepminer.evaluation import runner

    out = tmp_path / "r"
    calls: list[str] = []
    kill_at = {"n": 3}
    real = runner.evaluate_image

    def counting(ctx, row, index, *, sanity):
        calls.append(row["image_id"])
        if len(calls) == kill_at["n"]:
            raise KeyboardInterrupt  # a kill during the third image
        return real(ctx, row, index, sanity=sanity)

    monkeypatch.setattr(runner, "evaluate_image", counting)
    args = ("--methods", "cam,random", "--metrics", "auprc,pointing", "--limit", "5")
    assert _run(eval_data, out, *args) == 130
    assert not out.exists() and len((runner.resume_dir(out) / "records.jsonl").read_text().splitlines()) == 2
    calls.clear()
    kill_at["n"] = 0
    assert _run(eval_data, out, *args) == 0
    assert len(calls) == 3  # the two kept images were not evaluated again
    assert json.loads((out / "report.json").read_text())["counts"]["images"] == 5
    assert not runner.resume_dir(out).exists()  # removed once the report is in place
    # resume data kept by a run with other settings is refused, not mixed in
    calls.clear()
    kill_at["n"] = 3
    assert _run(eval_data, tmp_path / "s", *args) == 130
    rc = _run(eval_data, tmp_path / "s", "--methods", "cam", "--metrics", "auprc", "--limit", "5")
    assert rc == 2 and "other settings" in capsys.readouterr().err
    calls.clear()
    kill_at["n"] = 0
    assert _run(eval_data, tmp_path / "s", "--methods", "cam", "--metrics", "auprc", "--limit", "5", "--fresh") == 0
    assert len(calls) == 5  # --fresh: the other run's kept images are dropped, every image runs


@pytest.mark.parametrize("case", ["no lesion masks", "mask size", "unknown method", "unknown metric", "empty split",
                                  "classes"])
def test_bad_input_is_one_line_and_writes_nothing(case, eval_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(eval_data["data"], data)
    rows = list(csv.DictReader(open(data / "manifest.csv")))
    extra: list[str] = []
    if case == "no lesion masks":
        for r in rows:
            r["lesion_mask"] = ""
    elif case == "mask size":
        from PIL import Image

        first = next(r for r in rows if r["lesion_mask"])
        Image.new("L", (10, 12)).save(data / first["lesion_mask"])
    elif case == "unknown method":
        extra = ["--methods", "cam,lime"]
    elif case == "unknown metric":
        extra = ["--metrics", "auprc,accuracy"]
    elif case == "empty split":
        extra = ["--split", "holdout"]
    elif case == "classes":
        for r in rows:
            r["label"] = "cancer" if r["label"] == "malignant" else r["label"]
    with open(data / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    chosen = {"--methods": "cam", "--metrics": "auprc"}
    chosen.update(dict(zip(extra[::2], extra[1::2])))
    rc = main(["evaluate-explanations", "--model", str(eval_data["model"]), "--data", str(data), "--out", str(out),
               "--quiet", *(x for kv in chosen.items() for x in kv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("deepminer evaluate-explanations: error:"), err
    expect = {"no lesion masks": "no lesion mask", "mask size": "differs from its image",
              "unknown method": "known: cam", "unknown metric": "known: auprc", "empty split": "is empty",
              "classes": "cancer"}[case]
    assert expect in err[0]
    assert not out.exists()


def test_an_abnormal_image_without_a_mask_is_counted_not_evaluated(eval_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(eval_data["data"], data)
    rows = list(csv.DictReader(open(data / "manifest.csv")))
    dropped = next(r for r in rows if r["lesion_mask"])
    dropped["lesion_mask"] = ""
    with open(data / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    assert main(["evaluate-explanations", "--model", str(eval_data["model"]), "--data", str(data), "--out", str(out),
                 "--quiet", "--methods", "cam", "--metrics", "auprc", "--bootstrap", "200"]) == 0
    c = json.loads((out / "report.json").read_text())["counts"]
    with_masks = sum(1 for r in rows if r["label"] != "normal" and r["lesion_mask"])
    assert c["abnormal_without_mask"] == 1 and c["abnormal"] == with_masks
    assert c["normal_not_evaluated"] == sum(1 for r in rows if r["label"] == "normal")


def test_explicit_methods_keep_the_baselines(eval_data, tmp_path, capsys):
    """docs/evaluation.md: a table always carries the random and tissue-prior baselines, also when
    ``--methods`` names other methods only."""
    from deepminer.evaluation.methods import resolve_methods
    from deepminer.models import load_model

    model = load_model(eval_data["model"])
    assert resolve_methods(model, ["gradcam", "cam"]) == ["gradcam", "cam", "random", "tissue_prior"]
    assert resolve_methods(model, ["random", "cam"]) == ["random", "cam", "tissue_prior"]
    out = tmp_path / "out"
    assert _run(eval_data, out, "--methods", "cam", "--metrics", "auprc", "--limit", "4") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["methods"] == ["cam", "random", "tissue_prior"]
    assert {s["method"] for s in report["summary"]} == {"cam", "random", "tissue_prior"}
    table = capsys.readouterr().out
    assert "random (baseline)" in table and "tissue_prior (baseline)" in table, table
