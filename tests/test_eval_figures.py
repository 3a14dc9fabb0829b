"""deepminer.evaluation.figures: every figure is a real, non-blank PNG written atomically; NaN input is
named, not fatal; bars are ordered by mean with baselines last."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepminer.evaluation import figures

RNG = np.random.default_rng(0)
FRACTIONS = np.linspace(0, 1, 11)
RECALL = np.linspace(0, 1, 21)


def check_png(path, min_w: int = 300, min_h: int = 200) -> Image.Image:
    path = Path(path)
    assert path.is_file()
    im = Image.open(path)
    im.load()
    assert im.format == "PNG"
    assert min_w <= im.width <= 4000 and min_h <= im.height <= 6000, im.size
    assert np.asarray(im.convert("L"), dtype=np.float32).std() > 0
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    return im


def description(im: Image.Image) -> str:
    return im.info.get("Description", "")


def rows_of(n: int, width: int, *, falling: bool) -> np.ndarray:
    base = np.linspace(1, 0, width) if falling else np.linspace(0, 1, width)
    return np.clip(base[None, :] + RNG.normal(0, 0.05, (n, width)), 0, 1)


def summary(method: str, mean: float, *, baseline: bool = False) -> dict:
    return {"method": method, "metric": "auprc", "mean": mean, "lo": mean - 0.05, "hi": mean + 0.04,
            "n": 40, "baseline": baseline}


def test_metric_bars_order_baselines_and_nan(tmp_path):
    rows = [summary("random", 0.10, baseline=True), summary("cam", 0.30), summary("tissue_prior", 0.20, baseline=True),
            summary("gradcam", 0.45), summary("broken", math.nan),
            {**summary("cam", 0.9), "metric": "other"}]  # another metric: ignored
    path, order = figures.metric_bars(rows, "auprc", tmp_path / "bars.png")
    assert order == ["gradcam", "cam", "tissue_prior", "random"]
    im = check_png(path)
    assert "broken" in description(im)

    two = [summary("a", 0.2), summary("b", 0.7)]
    path2, order2 = figures.metric_bars(two, "auprc", tmp_path / "two.png", title="two methods")
    assert order2 == ["b", "a"]
    assert description(check_png(path2)) == "complete"
    _, low_first = figures.metric_bars(two, "auprc", tmp_path / "low.png", higher_is_better=False)
    assert low_first == ["a", "b"]


def test_pr_curves_with_an_all_nan_method(tmp_path):
    curves = {"cam": rows_of(6, len(RECALL), falling=True), "random": np.full((6, len(RECALL)), 0.1),
              "tissue_prior": np.full((6, len(RECALL)), 0.2), "dead": np.full((4, len(RECALL)), np.nan)}
    curves["cam"][0, 3] = np.nan  # one bad row: ignored
    im = check_png(figures.pr_curves(curves, RECALL, tmp_path / "sub" / "pr.png"))
    assert "dead" in description(im)
    with pytest.raises(ValueError, match="n_images"):
        figures.pr_curves({"cam": np.zeros((2, 3))}, RECALL, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []  # nothing left by the failure


def test_faithfulness_curves(tmp_path):
    deletion = {"cam": rows_of(5, len(FRACTIONS), falling=True), "random": rows_of(5, len(FRACTIONS), falling=True),
                "nanmethod": np.full((5, len(FRACTIONS)), np.nan)}
    insertion = {"cam": rows_of(5, len(FRACTIONS), falling=False), "random": rows_of(5, len(FRACTIONS), falling=False)}
    im = check_png(figures.faithfulness_curves(deletion, insertion, FRACTIONS, tmp_path / "faith.png"), min_w=600)
    assert "nanmethod" in description(im)


def test_gallery_downscales_and_outlines(tmp_path):
    yy, xx = np.mgrid[0:900, 0:600]
    big = {"title": "big case", "image": np.clip(RNG.normal(0.4, 0.1, (900, 600)), 0, 1),
           "lesion": (yy - 400) ** 2 + (xx - 300) ** 2 < 80 ** 2,
           "saliency": np.exp(-((yy - 420) ** 2 + (xx - 310) ** 2) / 2e4), "subtitle": "cam, p=0.91"}
    small = {"title": "no lesion", "image": RNG.random((64, 80)), "lesion": np.zeros((64, 80), bool),
             "saliency": RNG.random((64, 80)), "subtitle": ""}
    im = check_png(figures.gallery([big, small], tmp_path / "gallery.png", title="Top cases"), min_h=500)
    assert "no lesion" in description(im)
    assert figures._fit(np.zeros((2000, 1000))).shape == (512, 256)
    check_png(figures.gallery([], tmp_path / "empty.png", title="nothing"), min_h=100)


def test_sanity_plot(tmp_path):
    steps = ["original", "head", "+block -1", "+block -2", "+block -3"]
    results = {"cam": [1.0, 0.6, 0.3, 0.1, 0.05], "gradient": [1.0, 0.95, 0.9, math.nan, 0.85],
               "void": [math.nan] * 5}
    im = check_png(figures.sanity_plot(results, steps, 0.2, tmp_path / "sanity.png"))
    assert "void" in description(im)


def test_import_is_cheap():
    import subprocess
    import sys

    code = ("import sys, deepminer.evaluation.figures as f; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported at module import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
