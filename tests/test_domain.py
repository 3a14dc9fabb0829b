"""The out-of-domain score (:mod:`deepminer.domain`, docs/domain.md).

* the score against independent computations: scipy's Mahalanobis distance with the inverse of
  scikit-learn's Ledoit-Wolf covariance (all directions kept), and with the inverse of the truncated
  covariance built here with numpy (fewer directions kept);
* the threshold is the stated percentile of the validation scores; the file loads with
  ``weights_only=True``, stays small and is refused for other weights;
* ``deepminer domain-fit --kind unit-max`` on a tiny model, the service's ``input.domain``, the CLI's line, bad input;
* (the bundled models' frozen-trunk guards: tests/test_domain_guard.py)
* a real TorchServe answers ``input.domain``.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepminer.domain import DomainModel, describe, fit_domain, stand_in
from deepminer.errors import InputError



def _correlated(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows of a correlated Gaussian in ``k`` dimensions (non-zero mean)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.linspace(2.0, 0.1, k)[:, None]
    shift = rng.standard_normal(k) * 3
    return rng.standard_normal((n, k)) @ mix + shift, rng.standard_normal((n // 2, k)) @ mix + shift


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# -- the score ------------------------------------------------------------------------------------

def test_all_directions_kept_is_the_ledoit_wolf_mahalanobis_distance():
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    x, v = _correlated(80, 12, 0)
    dm = fit_domain(x, v, components=12)
    lw = LedoitWolf().fit(x)
    vi = np.linalg.inv(lw.covariance_)
    queries = np.vstack([v[:5], x.mean(0), x.mean(0) + 10])
    for q in queries:
        assert dm.score(q) == pytest.approx(mahalanobis(q, lw.location_, vi), rel=1e-8)
    assert np.asarray(dm.score(queries)) == pytest.approx([mahalanobis(q, lw.location_, vi) for q in queries], rel=1e-8)
    assert dm.fit["shrinkage"] == pytest.approx(lw.shrinkage_, abs=1e-6)


def test_fewer_directions_is_mahalanobis_under_the_truncated_covariance():
    """d < K: the top d eigen-directions of the shrunk covariance exact, the rest at their mean
    variance; here with fewer samples than dimensions (a singular sample covariance)."""
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    x, v = _correlated(30, 40, 1)
    d = 7
    dm = fit_domain(x, v, components=d)
    lw = LedoitWolf().fit(x)
    evals, evecs = np.linalg.eigh(lw.covariance_)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    top = evecs[:, :d]
    cov = top @ np.diag(evals[:d]) @ top.T + evals[d:].mean() * (np.eye(40) - top @ top.T)
    vi = np.linalg.inv(cov)
    for q in np.vstack([v[:4], x[:2], x.mean(0) - 5]):
        assert dm.score(q) == pytest.approx(mahalanobis(q, lw.location_, vi), rel=1e-7)
    assert dm.components.shape == (d, 40) and np.isfinite(np.asarray(dm.score(v))).all()


def test_threshold_is_the_stated_percentile_of_the_validation_scores():
    x, v = _correlated(200, 10, 2)
    dm = fit_domain(x, v, percentile=90, components=10)
    scores = np.asarray(dm.score(v))
    assert dm.threshold == pytest.approx(np.percentile(scores, 90))
    assert (scores <= dm.threshold).mean() >= 0.9
    near = dm.verdict(x.mean(0))
    far = dm.verdict(x.mean(0) + 50 * x.std(0))
    assert near["in_domain"] and not far["in_domain"]
    assert set(far) == {"method", "score", "threshold", "percentile", "in_domain", "reason"}
    assert far["method"] == "mahalanobis" and far["percentile"] == 90.0 and near["reason"] is None
    assert far["reason"].startswith("score above the threshold")
    # no breast tissue: out of domain whatever the features
    blank = dm.verdict(x.mean(0), tissue_fraction=0.0)
    assert not blank["in_domain"] and blank["reason"].startswith("no breast tissue found (tissue fraction 0.0000")
    assert dm.verdict(x.mean(0), tissue_fraction=0.3)["in_domain"]
    assert "no breast tissue found" in describe(blank)
    assert describe(far, "synthetic phantoms").startswith("domain: OUT of the model's training domain (score ")
    assert "not meaningful" in describe(far) and describe(near).startswith("domain: in the model's training domain")
    assert describe(None) == "domain: not checked (no domain summary for this model)"
    with pytest.raises(InputError, match="percentile"):
        fit_domain(x, v, percentile=0)
    with pytest.raises(InputError, match="validation features"):
        fit_domain(x, v[:, :3])
    with pytest.raises(InputError, match="9 features for a summary of 10 units"):
        dm.score(np.zeros(9))


def test_sqrt_transform_is_the_same_gaussian_on_the_square_roots():
    x, v = _correlated(60, 10, 4)
    x, v = np.abs(x), np.abs(v)  # activations are non-negative
    a = fit_domain(x, v, components=10, transform="sqrt")
    b = fit_domain(np.sqrt(x), np.sqrt(v), components=10, transform="none")
    assert np.asarray(a.score(v)) == pytest.approx(np.asarray(b.score(np.sqrt(v))), rel=1e-9)
    assert a.threshold == pytest.approx(b.threshold) and a.fit["transform"] == "sqrt"
    with pytest.raises(InputError, match="unknown transform"):
        fit_domain(x, v, transform="log")


def test_file_loads_weights_only_is_small_and_refuses_other_weights(tmp_path):
    import torch

    x, v = _correlated(50, 16, 3)
    dm = fit_domain(np.abs(x), np.abs(v), components=8, weights_sha256="a" * 64, fit={"data": "here"}, transform="sqrt")
    path = dm.save(tmp_path / "domain.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["method"] == "mahalanobis" and raw["weights_sha256"] == "a" * 64 and raw["fit"]["data"] == "here"
    assert raw["transform"] == "sqrt" and raw["min_tissue"] == 0.01
    back = DomainModel.load(path, weights_sha256="a" * 64)
    assert back.threshold == pytest.approx(dm.threshold) and back.percentile == dm.percentile
    assert back.transform == "sqrt"
    assert np.asarray(back.score(np.abs(v))) == pytest.approx(np.asarray(dm.score(np.abs(v))), rel=1e-4)
    with pytest.raises(InputError) as err:
        DomainModel.load(path, weights_sha256="b" * 64)
    assert "\n" not in str(err.value) and "refit it with 'deepminer domain-fit'" in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(InputError, match="not a deepminer domain file"):
        DomainModel.load(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="no such domain file"):
        DomainModel.load(tmp_path / "missing.pt")
    # the default shape for EfficientNet-Lite0's 1280 units stays well under 3 MB
    big = stand_in(1280).save(tmp_path / "big.pt")
    assert big.stat().st_size < 3 * 2**20


def test_explanation_round_trip_keeps_input_domain():
    from modelfixtures import random_image, tiny_model

    from deepminer.explain import explain_image
    from deepminer.explanation import Explanation

    exp = explain_image(tiny_model(0), random_image((96, 80)), max_side=96)
    assert exp.domain is None
    verdict = stand_in(exp.unit_max.shape[0]).verdict(exp.unit_max)
    exp.input = {**exp.input, "domain": verdict}
    back = Explanation.from_json(exp.to_json())
    assert back.domain == verdict and back.input["domain"]["in_domain"] is verdict["in_domain"]


@pytest.mark.slow  # one small bench run (pytorch-grad-cam's import takes seconds)
def test_bench_times_the_score_next_to_the_forward(tmp_path):
    from modelfixtures import tiny_checkpoint

    from deepminer import bench

    report = bench.run_bench([bench.ModelSpec("arch", "tiny")], cases=["patch"], repeats=2, warmup=0, device="cpu",
                             threads=1, dissect=False, progress=False, log=lambda _m: None)
    r = report["models"]["tiny"]["cases"]["patch"]
    assert r["domain_ms"] == pytest.approx(float(np.median(r["raw"]["domain_ms"])))
    assert r["domain_vs_forward"] == pytest.approx(r["domain_ms"] / r["forward_ms"])
    op, bound, _ = bench.TARGETS["domain_ms"]  # the one place the target is written
    assert op == "<=" and r["domain_source"] == "stand-in"
    assert r["check"]["domain_ms"] == ("PASS" if r["domain_ms"] <= bound else "MISS")
    assert "domain ms" in bench.format_table(report)
    # a checkpoint with its own domain.pt: that one is timed
    model = tiny_checkpoint(tmp_path, seed=2)
    from deepminer.models import load_model
    from deepminer.models.checkpoints import weights_sha256

    net = load_model(model)
    feats = np.random.default_rng(0).random((20, int(net.num_units)))
    fit_domain(feats[:15], feats[15:], components=4, weights_sha256=weights_sha256(net)).save(tmp_path / "domain.pt")
    assert bench.bench_domain(net, model).components.shape == (4, int(net.num_units))
    assert bench.bench_domain(net, None).fit["source"] == "stand-in"


# -- the command, the service, the CLI --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory) -> dict:
    """A tiny model and its domain.pt written by ``deepminer domain-fit`` over 8 small phantoms."""
    from modelfixtures import tiny_checkpoint

    from deepminer.cli import main
    from deepminer.data.phantoms import generate_dataset

    root = tmp_path_factory.mktemp("domain-fit")
    data = generate_dataset(root / "data", 8, 4, 256, splits={"train": 0.5, "val": 0.5, "test": 0, "holdout": 0})
    model = tiny_checkpoint(root / "model", seed=1)
    rc = main(["domain-fit", "--kind", "unit-max", "--model", str(model), "--data", str(data), "--components", "16",
               "--max-side", "256", "--features", str(root / "features.npz")])
    assert rc == 0
    return {"root": root, "data": data, "model": model, "domain": model.parent / "domain.pt"}


def test_domain_fit_writes_a_file_the_service_uses(tiny_fit, capsys):
    from deepminer.data.dataset import read_manifest
    from deepminer.explain.service import ExplainService
    from deepminer.models import load_model
    from deepminer.models.checkpoints import weights_sha256
    from deepminer.options import ExplainOptions

    dm = DomainModel.load(tiny_fit["domain"])
    rows = read_manifest(tiny_fit["data"])
    n_val = sum(r["split"] == "val" for r in rows)
    assert dm.weights_sha256 == weights_sha256(load_model(tiny_fit["model"]))
    assert dm.fit["train_images"] == len(rows) - n_val and dm.fit["val_images"] == n_val >= 2
    assert dm.fit["max_side"] == 256
    assert dm.fit["data_kind"] == "synthetic phantoms (deepminer phantoms)" and dm.components.shape == (16, 32)
    service = ExplainService.load(tiny_fit["model"], None)  # domain.pt beside the model: used
    assert service.domain is not None and "domain yes" in service.describe()
    opts = ExplainOptions.build(max_side=256)
    val = [Path(tiny_fit["data"]) / r["image"] for r in rows if r["split"] == "val"]
    scores = []
    for path in val:
        exp = service.explain(path.read_bytes(), opts)
        assert exp.domain is not None and exp.domain["method"] == "mahalanobis"
        assert exp.domain["score"] == pytest.approx(dm.score(exp.unit_max), abs=1e-3)
        assert exp.domain["threshold"] == pytest.approx(dm.threshold, abs=1e-3)
        assert exp.domain["in_domain"] is bool(dm.score(exp.unit_max) <= dm.threshold)
        assert "domain" in exp.timing_ms
        scores.append(exp.domain["score"])
    # the threshold is the 99th percentile of exactly these validation scores
    assert dm.threshold == pytest.approx(np.percentile(scores, 99), abs=1e-3)
    # a refit from the features cache runs no model and gives the same summary
    from deepminer.cli import main

    rc = main(["domain-fit", "--kind", "unit-max", "--model", str(tiny_fit["model"]), "--data", str(tiny_fit["data"]),
               "--components", "16",
               "--max-side", "256", "--features", str(tiny_fit["root"] / "features.npz"),
               "--out", str(tiny_fit["root"] / "again.pt"), "--percentile", "50"])
    assert rc == 0
    again = DomainModel.load(tiny_fit["root"] / "again.pt")
    assert again.threshold == pytest.approx(np.percentile(scores, 50), abs=1e-3)
    assert f"50th percentile of {n_val} val scores" in capsys.readouterr().err
    # no domain.pt: input.domain is null
    bare = ExplainService.load(tiny_fit["model"], None, domain=False)
    assert bare.explain(val[0].read_bytes(), opts).domain is None


def test_a_domain_file_for_other_weights_is_refused_not_fatal(tiny_fit, tmp_path, caplog):
    from modelfixtures import tiny_checkpoint

    from deepminer.explain.service import ExplainService

    other = tiny_checkpoint(tmp_path, seed=5)
    shutil.copy2(tiny_fit["domain"], tmp_path / "domain.pt")
    service = ExplainService.load(other, None)
    assert service.domain is None and "refit it with 'deepminer domain-fit'" in service.domain_note
    assert "out-of-domain score off" in caplog.text
    exp = service.explain(_png(np.full((128, 96), 90, np.uint8)))
    assert exp.domain is None and exp.input["domain"] is None


def test_cli_explain_prints_the_domain_line(tiny_fit, capsys):
    from deepminer.cli import main
    from deepminer.data.dataset import read_manifest

    image = Path(tiny_fit["data"]) / read_manifest(tiny_fit["data"])[0]["image"]
    assert main(["explain", str(image), "--model", str(tiny_fit["model"]), "--max-side", "256"]) == 0
    out = capsys.readouterr().out
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().startswith("domain: "))
    assert "threshold" in line and ("OUT of" in line or "in the model's training domain" in line)
    assert main(["explain", str(image), "--model", str(tiny_fit["model"]), "--max-side", "256", "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert set(summary["domain"]) == {"method", "score", "threshold", "percentile", "in_domain", "reason"}


@pytest.mark.parametrize("argv, message", [
    (["--percentile", "0"], "--percentile: must be in (0, 100]"),
    (["--components", "0"], "--components: must be at least 1"),
    (["--max-side", "10"], "--max-side: must be in"),
    (["--train-split", "holdout"], "the 'holdout' split has 0 images"),
])
def test_domain_fit_bad_input_is_one_line(tiny_fit, tmp_path, capsys, argv, message):
    from deepminer.cli import main

    rc = main(["domain-fit", "--kind", "unit-max", "--model", str(tiny_fit["model"]), "--data", str(tiny_fit["data"]),
               "--out", str(tmp_path / "x.pt"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.pt").exists()
    assert main(["domain-fit", "--model", str(tmp_path / "none.pt"), "--data", str(tiny_fit["data"])]) == 2
    assert "no such model file" in capsys.readouterr().err


# -- a real TorchServe ----------------------------------------------------------------------------

@pytest.mark.serve
@pytest.mark.slow
def test_served_answer_carries_input_domain(tiny_fit, tmp_path_factory):
    import requests
    from modelfixtures import start_tiny_server

    from deepminer.client import Client, local_explain
    from deepminer.data.dataset import read_manifest

    ts = start_tiny_server(tmp_path_factory, tiny_fit["model"], "tinyood", extra=[tiny_fit["domain"]])
    try:
        image = (Path(tiny_fit["data"]) / read_manifest(tiny_fit["data"])[0]["image"]).read_bytes()
        noise = _png(np.random.default_rng(1).integers(0, 256, (240, 180), dtype=np.uint8))
        with Client(ts.inference_url, model="tinyood", timeout=120) as c:
            served = [c.explain(image, max_side=256), c.explain(noise, max_side=256)]
        raw = requests.post(f"{ts.inference_url}/predictions/tinyood", data=image, timeout=120)
        assert raw.status_code == 200
        assert set(raw.json()["input"]["domain"]) == {"method", "score", "threshold", "percentile", "in_domain",
                                                      "reason"}
        for exp, data in zip(served, (image, noise)):
            local = local_explain(tiny_fit["model"], data, max_side=256)
            assert exp.domain is not None and set(exp.domain) == {"method", "score", "threshold", "percentile",
                                                                  "in_domain", "reason"}
            assert exp.domain["in_domain"] is local.domain["in_domain"]
            assert exp.domain["threshold"] == local.domain["threshold"]
            assert exp.domain["score"] == pytest.approx(local.domain["score"], rel=1e-3)
    finally:
        ts.stop()
