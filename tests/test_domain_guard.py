"""The frozen-trunk out-of-domain guard (:class:`deepminer.domain.DomainGuard`, docs/domain.md).

* its parts: the image statistics, the standardised Ledoit-Wolf fit and its out-of-fold threshold, the
  versioned file (a guard, the older unit-max file, an unknown kind: one line);
* the frozen layers: the three bundled models share them (one hash), a change in ``net.blocks.5`` on
  keeps the guard, a change before it is refused in one line;
* the bundled models' committed ``domain.pt`` (fitted by ``deepminer domain-fit`` on 60 fresh
  phantoms of each size 512, 768, 1024, 1536, seed 11): fresh phantoms of every size (seed 29, never fitted on)
  in domain (4 per size; ``slow``: 10 more); every kind of image in tests/domainkinds.py out of domain: photographs shipped in
  scikit-image, noise, phantoms of another texture model, DICOMs of other body parts (decoded by
  :func:`deepminer.data.io.load_image`, the server's path);
* the service answers ``input.domain`` from the guard; ``deepminer domain-fit`` writes one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import domainkinds
from deepminer.domain import (GUARD_METHOD, STAT_NAMES, DomainGuard, DomainModel, fit_domain, fit_guard,
                              image_statistics, load_domain)
from deepminer.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "model_store"
FRESH_SEED = 29  # never used for fitting (domain-fit uses 11; scripts/measure_domain.py 23)
REFIT = "refit: deepminer domain-fit --model model_store/{0}/model.pt --features /tmp/guard-features.npz (docs/domain.md)"


# -- the parts ------------------------------------------------------------------------------------

def _breast(h: int = 200, w: int = 120) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    region = (xx / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 < 1
    pixels = np.where(region, 0.5 + 0.05 * np.sin(xx / 3.0), 0.0).astype(np.float32)
    return pixels, region


def test_image_statistics_describe_the_breast_and_its_borders():
    pixels, region = _breast()
    stats = dict(zip(STAT_NAMES, image_statistics(pixels, region)))
    assert len(stats) == len(STAT_NAMES)
    assert stats["tissue_fraction"] == pytest.approx(region.mean())
    assert stats["breast_mean"] == pytest.approx(pixels[region].mean(), rel=1e-6)
    assert stats["background_mean"] == 0 and stats["background_std"] == 0
    # the breast lies against one edge (the chest wall): one border mostly covered, the others not
    assert stats["border_max"] > 0.8 and stats["border_min"] == 0 and stats["border_low"] == 0
    assert stats["breast_saturated"] == 0 and 0 <= stats["edge_density"] <= 1
    # more high-frequency content: a higher noise level
    noisy = pixels + np.where(region, 0.05 * np.random.default_rng(0).standard_normal(pixels.shape), 0)
    assert dict(zip(STAT_NAMES, image_statistics(noisy, region)))["noise_level"] > stats["noise_level"]


def _rows(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) * np.linspace(1, 100, k) + 50


def test_fit_guard_standardises_fits_all_and_thresholds_out_of_fold():
    x = _rows(180, 6, 0)
    g = fit_guard(x, percentile=90, folds=3, groups=["a", "b", "c"] * 60, names=[f"f{i}" for i in range(6)])
    center, spread = x.mean(0), x.std(0)
    ref = fit_domain((x - center) / spread, (x - center) / spread, components=6)
    assert np.asarray(g.score(x)) == pytest.approx(np.asarray(ref.score((x - center) / spread)), rel=1e-9)
    # the threshold: the 90th percentile of the scores of each row by the guard fitted without its fold
    oof = np.zeros(len(x))
    for f in range(3):
        part = x[np.arange(len(x)) % 3 != f]
        c, s = part.mean(0), part.std(0)
        held = fit_domain((part - c) / s, (part - c) / s, components=6)
        oof[f::3] = np.asarray(held.score((x[f::3] - c) / s))
    assert g.threshold == pytest.approx(np.percentile(oof, 90))
    assert g.fit["rows"] == 180 and g.fit["folds"] == 3 and set(g.fit["heldout_in_domain"]) == {"a", "b", "c"}
    assert sum(int(v.split("/")[0]) for v in g.fit["heldout_in_domain"].values()) == (oof <= g.threshold).sum()
    far = center + 40 * spread * np.eye(6)[2]
    verdict = g.verdict(far, 0.5, side=512)
    assert set(verdict) == {"method", "score", "threshold", "percentile", "in_domain", "reason", "side"}
    assert not verdict["in_domain"] and verdict["method"] == GUARD_METHOD and verdict["side"] == 512
    assert "most unusual: f2 z=+40" in verdict["reason"]
    assert g.verdict(center, 0.5)["in_domain"]
    assert g.verdict(center, 0.001)["reason"].startswith("no breast tissue found")
    with pytest.raises(InputError, match="5 features for a guard of 6"):
        g.score(np.zeros(5))
    with pytest.raises(InputError, match="need at least 6 feature rows"):
        fit_guard(x[:5])


def test_the_file_is_versioned_and_old_files_still_load(tmp_path):
    import torch

    x, v = _rows(40, 5, 2), _rows(20, 5, 3)
    g = fit_guard(x, trunk_hash="t" * 64, weights_sha256="w" * 64, fit={"sizes": [512]})
    g.save(tmp_path / "guard.pt")
    raw = torch.load(tmp_path / "guard.pt", weights_only=True)
    assert raw["kind"] == "frozen-trunk" and raw["format"] == 2 and raw["trunk_sha256"] == "t" * 64
    back = load_domain(tmp_path / "guard.pt")
    assert isinstance(back, DomainGuard) and back.threshold == pytest.approx(g.threshold)
    assert np.asarray(back.score(v)) == pytest.approx(np.asarray(g.score(v)))
    # the unit-max summary of format 1 loads as before, through the same door
    old = fit_domain(np.abs(x), np.abs(v), components=3, weights_sha256="a" * 64)
    old.save(tmp_path / "old.pt")
    loaded = load_domain(tmp_path / "old.pt", weights_sha256="a" * 64)
    assert isinstance(loaded, DomainModel)
    assert loaded.judge(unit_max=np.abs(v[0]), tissue_fraction=0.4) == old.verdict(np.abs(v[0]), 0.4)
    # one line for what is not readable
    raw["kind"] = "sparkles"
    torch.save(raw, tmp_path / "odd.pt")
    with pytest.raises(InputError, match="unknown kind 'sparkles'") as err:
        load_domain(tmp_path / "odd.pt")
    assert "\n" not in str(err.value)
    raw["kind"], raw["format"] = "frozen-trunk", 3
    torch.save(raw, tmp_path / "newer.pt")
    with pytest.raises(InputError, match="format 3"):
        load_domain(tmp_path / "newer.pt")
    with pytest.raises(InputError, match="load_domain"):
        DomainModel.load(tmp_path / "guard.pt")


# -- the bundled models ---------------------------------------------------------------------------

def _bundled(name: str):
    from deepminer.models import load_model

    if not (STORE / name / "model.pt").is_file():
        pytest.skip(f"model_store/{name}/model.pt is not there")
    return load_model(STORE / name / "model.pt").eval()


@pytest.fixture(scope="module")
def demo():
    """The demo model and its committed guard (``model_store/demo/domain.pt``)."""
    model = _bundled("demo")
    guard = load_domain(STORE / "demo" / "domain.pt", model=model)
    assert isinstance(guard, DomainGuard), REFIT.format("demo")
    return model, guard


def _judge(model, guard: DomainGuard, data: bytes) -> dict:
    """The server's path: decode, tissue mask, the guard at the model's own scale (the file's pixel
    spacing when it has one, else the breast's extent)."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_region

    loaded = load_image(data)
    _, fraction, region = tissue_region(loaded.pixels)
    return guard.judge(model=model, pixels=loaded.pixels, region=region, tissue_fraction=fraction,
                       spacing_mm=loaded.spacing_mm)


def _side(model, data: bytes) -> int:
    """The long side the model's own scale gives this file (deepminer.model_scale.input_side)."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_region
    from deepminer.model_scale import input_side

    loaded = load_image(data)
    _, _, region = tissue_region(loaded.pixels)
    return input_side(model, *loaded.pixels.shape, spacing_mm=loaded.spacing_mm, tissue=region)[0]


def test_the_bundled_models_share_their_frozen_layers_and_guards():
    import torch

    from deepminer.domain import GUARD_LAYERS, trunk_sha256

    models = {name: _bundled(name) for name in ("demo", "wildcat", "probe")}
    hashes = {name: trunk_sha256(m) for name, m in models.items()}
    assert len(set(hashes.values())) == 1, hashes
    for name, m in models.items():
        guard = load_domain(STORE / name / "domain.pt", model=m)
        assert isinstance(guard, DomainGuard), REFIT.format(name)
        assert guard.trunk_sha256 == hashes[name] and guard.layers == GUARD_LAYERS
        assert sorted(guard.fit["sizes"]) == [512, 768, 1024, 1536]
    # retraining net.blocks.5 on keeps the guard; a change before it is refused, in one line
    m = models["wildcat"]
    with torch.no_grad():
        m.features.net.blocks[5][0].conv_pw.weight.mul_(1.5)
        guard = load_domain(STORE / "wildcat" / "domain.pt", model=m)
        m.features.net.blocks[2][0].conv_pw.weight.add_(0.01)
    with pytest.raises(InputError, match="fitted for frozen layers") as err:
        guard.check_model(model=m)
    assert "\n" not in str(err.value) and "refit it with 'deepminer domain-fit'" in str(err.value)


@pytest.mark.parametrize("size", [512, 768, 1024, 1536])
def test_fresh_phantoms_of_every_size_are_in_domain(demo, size):
    """4 fresh phantoms per size here (all in); the slow test below 10 more per size (>= 95%, so all),
    scripts/measure_domain.py 50 per size (docs/domain.md)."""
    from deepminer.commands.domain_fit import phantom_image

    model, guard = demo
    files = [phantom_image(FRESH_SEED, 1000 + i, size) for i in range(4)]
    verdicts = [_judge(model, guard, data) for data in files]
    assert all(v["in_domain"] for v in verdicts), verdicts
    # judged at the model's own scale (its recorded 1024 px long side), whatever the generator's size
    assert [v["side"] for v in verdicts] == [_side(model, data) for data in files]
    assert all(0.75 * 1024 <= v["side"] <= 1.25 * 1024 for v in verdicts), verdicts


@pytest.mark.slow
@pytest.mark.parametrize("size", [512, 768, 1024, 1536])
def test_at_least_95_percent_of_fresh_phantoms_of_every_size_are_in_domain(demo, size):
    from deepminer.commands.domain_fit import phantom_image

    model, guard = demo
    verdicts = [_judge(model, guard, phantom_image(FRESH_SEED, 2000 + i, size)) for i in range(10)]
    inside = sum(v["in_domain"] for v in verdicts)
    assert inside >= 0.95 * len(verdicts), sorted(v["score"] for v in verdicts)


@pytest.mark.parametrize("kind", sorted(domainkinds.kinds()))
def test_images_of_other_kinds_are_out_of_domain(demo, kind):
    model, guard = demo
    verdict = _judge(model, guard, domainkinds.kinds()[kind]())
    assert not verdict["in_domain"], verdict
    assert verdict["reason"].startswith(("score above the threshold", "no breast tissue found"))
    # the score alone says it too (also where the tissue rule spoke first: white noise, the Hubble field)
    assert verdict["score"] > (1.5 if kind.startswith(("texture/", "dicom/")) else 1.0) * verdict["threshold"], verdict


def test_the_service_answers_the_guards_verdict(demo):
    from deepminer.commands.domain_fit import phantom_image
    from deepminer.explain.service import ExplainService
    from deepminer.options import ExplainOptions

    model, guard = demo
    service = ExplainService.load(STORE / "demo" / "model.pt", None)
    assert isinstance(service.domain, DomainGuard), service.domain_note
    opts = ExplainOptions.build(unit_maps="none", max_side=256)  # the guard ignores the explanation's size
    phantom = service.explain(phantom_image(FRESH_SEED, 3000, 768), opts)
    assert phantom.domain["in_domain"] and phantom.domain["method"] == GUARD_METHOD
    assert phantom.domain["side"] == _side(model, phantom_image(FRESH_SEED, 3000, 768))  # the model's scale
    assert phantom.domain == _judge(model, guard, phantom_image(FRESH_SEED, 3000, 768))
    chest = service.explain(domainkinds.body_part("chest"), opts)
    assert not chest.domain["in_domain"] and "domain" in chest.timing_ms


# -- the command ----------------------------------------------------------------------------------

def test_domain_fit_writes_a_guard_and_reuses_its_features(tmp_path, capsys):
    from deepminer.cli import main

    if not (STORE / "probe" / "model.pt").is_file():
        pytest.skip("model_store/probe/model.pt is not there")
    argv = ["domain-fit", "--model", str(STORE / "probe" / "model.pt"), "--sizes", "128,160", "--count", "3",
            "--seed", "5", "--features", str(tmp_path / "f.npz")]
    assert main([*argv, "--out", str(tmp_path / "a.pt")]) == 0
    err = capsys.readouterr().err
    assert "fitted on 6 fresh phantoms of sizes 128,160" in err and "99.5th percentile of their 3-fold" in err
    a = load_domain(tmp_path / "a.pt")
    assert isinstance(a, DomainGuard) and a.fit["sizes"] == [128, 160] and set(a.fit["sides"]) == {"128", "160"}
    # the phantoms judged at the model's scale (long side 1024 by the breast's extent), not at their 128/160 px
    assert all(0.75 * 1024 <= lo <= hi <= 1.25 * 1024 for lo, hi in a.fit["sides"].values()), a.fit["sides"]
    assert not a.fit["features_cached"]
    # a second model with the same frozen layers: the cached features, no forward pass
    assert main([*argv, "--model", str(STORE / "demo" / "model.pt"), "--out", str(tmp_path / "b.pt")]) == 0
    b = load_domain(tmp_path / "b.pt")
    capsys.readouterr()
    assert b.threshold == a.threshold and b.trunk_sha256 == a.trunk_sha256 and b.fit["features_cached"]
    for bad, message in ((["--sizes", "12"], "--sizes: each in"), (["--count", "2"], "--count: must be at least 3"),
                         (["--kind", "unit-max"], "--data: the unit-max kind needs")):
        assert main([*argv, "--out", str(tmp_path / "x.pt"), *bad]) == 2
        line = capsys.readouterr().err.strip()
        assert message in line and len(line.splitlines()) == 1, line


def test_a_model_with_a_recorded_scale_is_judged_at_that_scale(demo):
    """A whole-image model records ``meta["scale"]``: the guard judges at ``input_side``'s answer
    (here the breast's extent against the model's), not at the default long side <= 1024."""
    import copy

    from deepminer.commands.domain_fit import guard_row, phantom_image
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_region
    from deepminer.domain import guard_side
    from deepminer.model_scale import input_side

    model, _ = demo
    scaled = copy.copy(model)
    scaled.meta = {**model.meta, "scale": {"long_side": 512, "mm_per_px": 0.46875, "breast_extent_px": 250.0}}
    data = phantom_image(FRESH_SEED, 4000, 1024)
    loaded = load_image(data)
    _, _, region = tissue_region(loaded.pixels)
    side, how = guard_side(scaled, loaded.height, loaded.width, tissue=region)
    assert (side, how) == input_side(scaled, loaded.height, loaded.width, tissue=region) and how == "breast extent"
    assert side < 1024 and guard_row(scaled, data)[1] == side


@pytest.mark.serve
@pytest.mark.slow
def test_a_real_torchserve_answers_the_guards_verdict(demo, tmp_path_factory):
    """The .mar ships the library and domain.pt: TorchServe answers the guard's verdict, as the
    library judges the same bytes."""
    from modelfixtures import start_tiny_server

    from deepminer.client import Client
    from deepminer.commands.domain_fit import phantom_image

    model, guard = demo
    ts = start_tiny_server(tmp_path_factory, STORE / "demo" / "model.pt", "guarded", extra=[STORE / "demo" / "domain.pt"])
    try:
        files = [phantom_image(FRESH_SEED, 6000, 768), domainkinds.body_part("hand")]
        with Client(ts.inference_url, model="guarded", timeout=300) as c:
            served = [c.explain(data, max_side=256) for data in files]
    finally:
        ts.stop()
    for exp, data, inside in zip(served, files, (True, False)):
        assert exp.domain["method"] == GUARD_METHOD and exp.domain["in_domain"] is inside, exp.domain
        assert exp.domain["score"] == pytest.approx(_judge(model, guard, data)["score"], rel=1e-3)
