"""Several models: unit mask sizes in the atlas (cross-checked against a dense recomputation), the
Compare page's numbers (ui/compare.py), and one real TorchServe serving two models at once (a model
it does not host answers 404 in one line, the others keep serving)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F

from deepminer.atlas import Atlas
from deepminer.defaults import MIN_LABEL_IOU
from deepminer.models import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_atlases(two_models) -> dict:
    """Two tiny models with atlases over the same phantoms (the session's ``two_models``, conftest.py)."""
    return two_models


# -- unit mask sizes (deepminer dissect) --------------------------------------------------------------

def _dense_maps(model_dir: Path, data: Path, atlas: Atlas) -> torch.Tensor:
    """Every reference patch's unit maps, computed directly (all in memory; a small set)."""
    from deepminer.data.patches import PatchDataset

    net = load_model(model_dir / "model.pt").eval()
    ds = PatchDataset(data, atlas.references, size=int(atlas.meta["data"]["patch_size"]))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        return net.forward_features(x)


def test_mask_sizes_equal_dense_computation(two_atlases):
    """``mask_fraction`` (mean share of every reference patch inside the unit's mask) and ``roi_fraction``
    (the same over the unit's top-k gallery patches) equal a dense computation over every patch and
    unit; the atlas without the stored array recomputes the same ROI sizes from its gallery maps."""
    for side in ("a", "b"):
        folder = two_atlases[side]
        atlas = Atlas.load(folder / "atlas")
        feats = _dense_maps(folder, two_atlases["data"], atlas)                    # (N, K, h, w)
        s = int(atlas.meta["iou"]["grid"])
        t = torch.from_numpy(atlas.thresholds.astype(np.float64))[None, :, None, None]
        masks = F.interpolate(feats.double(), size=(s, s), mode="bilinear", align_corners=False) > t
        want = masks.double().mean(dim=(0, 2, 3)).numpy()
        assert atlas.arrays["iou_complete"].all()
        # a handful of grid cells sit on the threshold (batched vs one-batch float sums): 1e-3 of a patch
        np.testing.assert_allclose(atlas.mask_fraction, want, atol=1e-3)
        assert np.abs(atlas.mask_fraction - want).mean() < 1e-4
        top = atlas.arrays["topk_index"]                                           # (K, k)
        roi = np.array([masks[top[u], u].double().mean().item() for u in range(atlas.num_units)])
        np.testing.assert_allclose(atlas.roi_fraction, roi, rtol=1e-3, atol=2e-3)  # gallery maps stored as float16
        assert 0 < want.max() <= 1 and roi.mean() > want.mean()  # a unit's top patches are where it fires
        meta_units = atlas.meta["units"]
        assert meta_units[0]["mask_fraction"] == pytest.approx(float(atlas.mask_fraction[0]), abs=1e-6)
        assert atlas.meta["mask_size"]["roi_fraction_median"] == pytest.approx(float(np.median(atlas.roi_fraction)),
                                                                               abs=1e-6)
        old = Atlas.load(folder / "atlas")
        stored = old.arrays.pop("roi_fraction")
        old.arrays.pop("mask_fraction")
        assert old.mask_fraction is None
        np.testing.assert_allclose(old.roi_fraction, stored, atol=1e-3)  # from the float16 gallery maps


# -- the Compare page's numbers ---------------------------------------------------------------------

def test_pair_problem_one_line():
    from ui.compare import pair_problem

    served = ["demo", "probe", "wildcat"]
    assert pair_problem("demo", "wildcat", served) is None
    for a, b in (("demo", "demo"), ("demo", "nosuch"), (None, "demo")):
        msg = pair_problem(a, b, served)
        assert msg and "\n" not in msg
    assert "itself" in pair_problem("demo", "demo", served)
    assert "does not host model 'nosuch'" in pair_problem("demo", "nosuch", served)


def test_concept_rows_sizes_and_coverage(two_atlases):
    from ui.compare import concept_rows, coverage_rows, detector_units, same_references, size_rows, size_verdict

    a, b = Atlas.load(two_atlases["a"] / "atlas"), Atlas.load(two_atlases["b"] / "atlas")
    assert same_references(a, b)
    rows = concept_rows(a, b)
    assert [r["concept"] for r in rows] == a.concepts and a.concepts
    for r in rows:
        for side, atl in (("a", a), ("b", b)):
            col = np.asarray(atl.iou)[:, atl.concepts.index(r["concept"])]
            assert r[f"{side}_iou"] == pytest.approx(float(col.max()))
            assert col[r[f"{side}_unit"]] == col.max()
            assert r[f"{side}_units"] == sum(1 for v in col.tolist() if v >= MIN_LABEL_IOU)
    # a concept only one atlas knows: None on the other side
    b.meta["data"]["concepts"] = b.concepts + ["made_up"]
    b.arrays["iou"] = np.concatenate([b.iou, np.full((b.num_units, 1), 0.5, np.float32)], axis=1)
    extra = concept_rows(a, b)[-1]
    assert extra["concept"] == "made_up" and extra["a_iou"] is None and extra["b_units"] == b.num_units
    sizes = {(r["measure"], r["units"]): r for r in size_rows(a, "alpha")}
    assert sizes[("roi_fraction", "all")]["median"] == pytest.approx(float(np.median(a.roi_fraction)))
    det = detector_units(a)
    assert sizes[("mask_fraction", f"detectors (IoU >= {MIN_LABEL_IOU:g})")]["n"] == len(det)
    from scipy.stats import mannwhitneyu

    verdict = size_verdict(a, b, "alpha", "beta")
    ra, rb = a.roi_fraction.astype(np.float64), b.roi_fraction.astype(np.float64)
    smaller, vs, vb = ("alpha", ra, rb) if np.median(ra) < np.median(rb) else ("beta", rb, ra)
    p = mannwhitneyu(vs, vb, alternative="less").pvalue
    assert f"{smaller}'s" in verdict and f"p = {p:.2g}" in verdict and "\n" not in verdict
    assert verdict.startswith(f"{smaller}'s units cover smaller regions" if p < 0.05 else "No clear difference")
    # a clearly smaller model: its units' ROIs halved
    half = Atlas.load(two_atlases["b"] / "atlas")
    half.arrays["roi_fraction"] = a.roi_fraction / 2
    assert size_verdict(a, half, "alpha", "half").startswith("half's units cover smaller regions: median ROI")
    cov = {r["class"]: r for r in coverage_rows(a, b)}
    for c in a.classes:
        assert cov[c]["a_coverage"] == a.coverage(c) and cov[c]["b_coverage"] == b.coverage(c)


def test_model_column_from_local_explanations(two_atlases):
    """Both sides for one image: the CAM of the same class, the top units for it with their labels, the
    sentence naming a labelled unit."""
    from PIL import Image

    from deepminer.client import local_explain
    from ui.compare import model_column

    img = np.asarray(Image.open(two_atlases["data"] / "images" / sorted(
        p.name for p in (two_atlases["data"] / "images").iterdir())[0]))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    ra = local_explain(two_atlases["a"] / "model.pt", buf.getvalue(), max_side=256)
    rb = local_explain(two_atlases["b"] / "model.pt", buf.getvalue(), max_side=256)
    assert ra.model["weights_sha256"] != rb.model["weights_sha256"]
    cls = ra.prediction
    top_b = rb.top_units[cls][0]
    col_b = model_column(rb, {top_b: "spicules"}, cls)
    np.testing.assert_allclose(col_b["cam"], rb.cam_normalized(cls))
    assert [r["unit"] for r in col_b["units"]] == rb.top_units[cls][:8]
    assert col_b["units"][0]["label"] == "spicules"
    if rb.prediction == cls and top_b in rb.ranked_units(cls, 8):
        assert "spicules" in col_b["sentence"]
    assert model_column(ra, {}, cls)["prediction"] == ra.prediction


# -- one TorchServe, several models -----------------------------------------------------------------

@pytest.mark.serve
@pytest.mark.slow
def test_one_server_serves_several_models(two_atlases, two_model_server):
    """Two models archived like scripts/model_store.sh does (atlas + the other files of the folder) in
    one TorchServe: both answer with their own weights; a model the server does not host answers 404
    in one line and both keep serving; the management API lists both (what the workbench's picker
    reads); each worker runs cores / models torch threads."""
    from deepminer.client import Client, ServeError
    from serve.archive import mar_contents
    from serve.launch import served_models, worker_threads

    ts = two_model_server  # conftest.py: both archived as scripts/model_store.sh does
    for name in ("alpha", "beta"):
        assert "MODEL_CARD.md" in mar_contents(ts.model_store / f"{name}.mar")["files"]
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((256, 256)) * 65535).astype(np.uint16)).save(png, "PNG")
    data = png.getvalue()
    want = {n: load_model(two_atlases["a" if n == "alpha" else "b"] / "model.pt") for n in ("alpha", "beta")}
    from deepminer.models.checkpoints import weights_sha256

    bodies = {}
    for name in ("alpha", "beta"):
        exp = Client(ts.inference_url, model=name).explain(data)
        assert exp.model["weights_sha256"] == weights_sha256(want[name])
        assert exp.model["name"] == name
        assert exp.server["threads"] == worker_threads(2)
        bodies[name] = exp
    assert not np.allclose(bodies["alpha"].cam, bodies["beta"].cam)
    r = requests.post(f"{ts.inference_url}/predictions/nosuch", data=data, timeout=30)
    assert r.status_code == 404
    msg = r.json().get("message", "")
    assert msg and "\n" not in msg.strip()
    with pytest.raises(ServeError) as err:
        Client(ts.inference_url, model="nosuch").explain(data)
    assert err.value.status == 404
    for name in ("alpha", "beta"):  # still serving
        assert Client(ts.inference_url, model=name).explain(data).model["name"] == name
    assert served_models(ts.management_url) == ["alpha", "beta"]
    listing = requests.get(f"{ts.management_url}/models", timeout=5).json()
    assert {m["modelName"] for m in listing["models"]} == {"alpha", "beta"}
    assert json.loads(json.dumps(ts.describe("beta")))["minWorkers"] == 1


def test_worker_threads():
    from serve.launch import worker_threads

    assert worker_threads(3, cores=2) == 1
    assert worker_threads(1, cores=2) == 2
    assert worker_threads(3, cores=16) == 5
    assert worker_threads(0, cores=4) == 4


# -- the picker and the Compare page under AppTest (in-process models: DEEPMINER_BACKEND=local) -----

@pytest.fixture
def store_env(two_atlases, tmp_path, monkeypatch):
    """Local backend over the two-model store (``served`` = its folders with a model.pt), caches cleared."""
    import streamlit as st

    env = {"DEEPMINER_BACKEND": "local", "DEEPMINER_MODEL_DIR": str(two_atlases["a"]),
           "DEEPMINER_SAMPLES": str(two_atlases["data"]), "DEEPMINER_LABELS_URL": f"sqlite:///{tmp_path / 'l.db'}",
           "DEEPMINER_MODEL": "alpha", "DEEPMINER_MAX_SIDE": "256", "DEEPMINER_DATA_ROOT": str(two_atlases["data"])}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield {**two_atlases, "url": env["DEEPMINER_LABELS_URL"]}
    st.cache_resource.clear()
    st.cache_data.clear()


def _run(at):
    at.run()
    assert not at.exception, at.exception
    return at


def _all_text(at) -> str:
    parts = [e.value for e in at.markdown] + [e.value for e in at.text] + [e.value for e in at.caption]
    parts += [e.value for e in at.subheader] + [e.value for e in at.header] + [e.value for e in at.error]
    parts += [e.value for e in at.warning] + [e.value for e in at.info]
    return "\n".join(str(p) for p in parts)


def test_picker_unknown_model_and_labels_per_model(store_env):
    """A linked model (``?model=``) the server does not host: one line, the first served model is
    picked. Labels follow the picked model's weights hash and come back when switching back."""
    from streamlit.testing.v1 import AppTest

    from deepminer.labels import LabelStore
    from deepminer.models.checkpoints import weights_sha256

    at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=120)
    at.query_params["model"] = "nosuch"  # a link to a model the server does not host
    _run(at)
    errors = [e.value for e in at.sidebar.error]
    assert errors == ["The server does not host model `nosuch`; it serves `alpha`, `beta`."]
    assert at.sidebar.selectbox(key="model").value == "alpha"
    ha = weights_sha256(load_model(store_env["a"] / "model.pt"))
    hb = weights_sha256(load_model(store_env["b"] / "model.pt"))
    store = LabelStore(store_env["url"])
    store.set_labels("alpha", ha, [3], "mass", "alice")
    store.close()
    assert f"Labels for alpha @ {ha[:12]}" in _all_text(at)
    # AppTest draws the app's sidebar on a session's first run only: one session per pick (the real
    # switch, labels included, is driven in the browser: test_ui_browser_compare.py)
    for name, digest in (("beta", hb), ("alpha", ha)):
        at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=120)
        at.session_state["model"] = name
        _run(at)
        assert f"Labels for {name} @ {digest[:12]}" in _all_text(at) and not at.sidebar.error
        assert at.sidebar.selectbox(key="model").options == ["alpha", "beta"]
    # a page run without the app's sidebar (a first load of its URL) uses a served model, not "nosuch"
    at.switch_page("views/labels.py")
    _run(at)
    pick = at.selectbox(key="labels_model")
    assert pick.format_func(pick.value) == f"alpha @ {ha[:12]} (served now)"
    assert list(at.dataframe[0].value["label"]) == ["mass"]  # alpha's label, kept by its weights hash


def test_compare_page_apptest(store_env):
    """Both models on one image (their predictions equal the in-process engine's), the atlas tables;
    the same model twice is one line and nothing else."""
    from streamlit.testing.v1 import AppTest

    from deepminer.client import local_explain
    from ui.state import SESSION_KEY, ImageRef, Session

    from deepminer.data.dataset import read_manifest

    row = read_manifest(store_env["data"])[0]
    data = (Path(store_env["data"]) / row["image"]).read_bytes()
    at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=120)
    at.session_state[SESSION_KEY] = Session(image=ImageRef("ph.png", data))
    _run(at)
    at.switch_page("views/compare.py")
    _run(at)
    text = _all_text(at)
    for name, key in (("alpha", "a"), ("beta", "b")):
        want = local_explain(store_env[key] / "model.pt", data, max_side=256)
        assert f"{name}: {want.prediction} ({want.probabilities[want.prediction]:.2f})" in text
    for head in ("The atlases compared", "Concepts: the best unit of each model", "Unit mask sizes",
                 "Top-20 coverage per class"):
        assert head in text
    assert "median ROI fraction" in text
    at.selectbox(key="compare_b").set_value("alpha")
    _run(at)
    assert [w.value for w in at.warning] == ["'alpha' compared with itself: pick two different models."]
    assert "The atlases compared" not in _all_text(at)
