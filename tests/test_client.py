"""``deepminer.client`` against a real TorchServe started from the local demo profile (token
authorization off) in this project's environment, plus its offline behaviour (no server, key files,
environment). One server for the module."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepminer.cli import main
from deepminer.client import Client, ServeError, ServeUnavailable, bearer, local_explain, read_key_file
from deepminer.errors import InputError
from deepminer.explanation import Explanation
from deepminer.options import ExplainOptions, mask_to_png
from modelfixtures import TINY_MODEL

from serve.launch import free_port

MODEL = TINY_MODEL


def picture(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.8 * w)) ** 2 < 1
    img = (inside * (0.5 + 0.4 * rng.random((h, w))) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_path(tiny_model_path) -> Path:
    return tiny_model_path


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's tiny TorchServe (conftest.py), serving ``model_path`` as ``MODEL``."""
    return tiny_server


# -- against the server -----------------------------------------------------------------------------

@pytest.mark.serve
def test_demo_profile_needs_no_token_and_results_are_typed(server):
    with Client(server.inference_url, model=MODEL) as c:
        assert c.ping()
        res = c.explain(picture(240, 180), top_units=4)
    assert isinstance(res, Explanation)
    classes = ("normal", "benign", "malignant")
    assert res.classes == classes and tuple(res.model["classes"]) == classes
    assert sum(res.probabilities.values()) == pytest.approx(1, abs=1e-3)
    assert res.prediction == max(res.probabilities, key=res.probabilities.get)
    assert res.class_maps.dtype == np.float32 and res.class_maps.ndim == 3 and res.class_maps.shape[0] == 3
    assert res.cam.shape == res.class_maps.shape
    assert res.unit_max.shape == (32,) and res.influence.shape == (3, 32)
    assert all(len(v) == 4 and all(isinstance(u, int) for u in v) for v in res.top_units.values())
    # "top" maps: the maps of the listed units, keyed by int
    assert set(res.unit_maps) == {u for v in res.top_units.values() for u in v}
    assert all(m.shape == res.cam.shape[1:] for m in res.unit_maps.values())
    assert res.sketch_iou is None and res.timing_ms and res.input["height"] == 240
    assert res.server["pid"] > 0 and len(res.model["weights_sha256"]) == 64
    # influence = max activation x FC weight, ranked: the top lists follow the influence arrays
    for c, ids in res.top_units.items():
        infl = res.influence_of(c)
        tol = 1e-2 * max(1.0, float(np.abs(infl).max()))  # float16 on the wire
        assert infl[ids].min() >= np.delete(infl, ids).max() - tol
        assert all(infl[a] >= infl[b] - tol for a, b in zip(ids, ids[1:]))  # best first


@pytest.mark.serve
def test_keep_alive_uses_one_connection(server):
    import re
    import time

    log = server.workdir / "logs" / "access_log.log"
    before = log.read_text().count("POST /predictions/") if log.exists() else 0
    with Client(server.inference_url, model=MODEL) as c:
        for i in range(4):
            c.explain(picture(128, 96, i), unit_maps="none")
    for _ in range(50):  # the access log is written asynchronously
        lines = [ln for ln in log.read_text().splitlines() if "POST /predictions/" in ln][before:]
        if len(lines) == 4:
            break
        time.sleep(0.1)
    ports = {re.search(r"/127\.0\.0\.1:(\d+)", ln).group(1) for ln in lines}
    assert len(lines) == 4 and len(ports) == 1, lines  # four requests, one client port: one connection


@pytest.mark.serve
def test_management_helpers(server):
    """The management API through the client: the hosted models, a model's description, readiness."""
    from deepminer.client import describe_model

    with Client(server.inference_url, model=MODEL, management_url=server.management_url) as c:
        assert c.models() == [MODEL] and c.model_ready() and not c.model_ready("nope")
    info = describe_model(server.management_url, MODEL)
    assert info["modelName"] == MODEL and any(w.get("status") == "READY" for w in info["workers"])
    with pytest.raises(ServeError) as err:
        describe_model(server.management_url, "nope")
    assert err.value.status == 404


@pytest.mark.serve
def test_unknown_model_is_a_serve_error(server):
    with Client(server.inference_url, model="nope") as c:
        with pytest.raises(ServeError) as err:
            c.explain(picture(64, 64))
    assert err.value.status == 404 and "nope" in err.value.message


@pytest.mark.serve
def test_served_equals_local(server, model_path):
    img = picture(200, 160, 3)
    with Client(server.inference_url, model=MODEL) as c:
        served = c.explain(img, unit_maps="all", top_units=3)
    local = local_explain(model_path, img, unit_maps="all", top_units=3)
    assert served.prediction == local.prediction and served.top_units == local.top_units
    np.testing.assert_allclose(served.class_maps, local.class_maps, rtol=1e-2, atol=1e-2)
    assert sorted(served.unit_maps) == sorted(local.unit_maps) == list(range(32))
    assert served.model["weights_sha256"] == local.model["weights_sha256"]
    strip = {"timing_ms", "server", "model"}
    s_body, l_body = served.to_json(), local.to_json()
    assert {k for k in s_body if k not in strip} == {k for k in l_body if k not in strip}


@pytest.mark.serve
def test_tissue_mask_is_the_region_the_server_used(server, model_path):
    """``tissue_mask``: the breast mask of the decoded image (computed independently here), at its
    size, over HTTP and in process alike; absent unless asked for."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_mask

    img = picture(200, 150, 5)
    expected = tissue_mask(load_image(img).pixels)
    assert 0.2 < expected.mean() < 0.9  # a real region, neither empty nor everything
    opts = ExplainOptions.build(unit_maps="none", tissue_mask=True)
    with Client(server.inference_url, model=MODEL) as c:
        served = c.explain(img, opts)
        plain = c.explain(img)
    for res in (served, local_explain(model_path, img, opts)):
        region = res.tissue_region()
        assert region is not None and region.shape == (200, 150) and region.dtype == bool
        assert np.array_equal(region, expected)
        assert res.input["tissue_fraction"] == pytest.approx(expected.mean(), abs=1e-4)
        assert not res.unit_maps
    assert plain.tissue_region() is None and "tissue_mask" not in plain.input


@pytest.mark.serve
def test_explain_cli_against_the_server(server, tmp_path, capsys):
    img = tmp_path / "img.png"
    img.write_bytes(picture(300, 200, 4))
    out = tmp_path / "out"
    rc = main(["explain", str(img), "--url", server.inference_url, "--name", MODEL, "--json", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prediction"] in summary["probabilities"] and len(summary["top_units"]) == 8
    for cls in ("normal", "benign", "malignant"):
        with Image.open(out / f"cam_{cls}.png") as im:
            assert im.mode == "RGB" and im.size == (200, 300)
    units = sorted(out.glob("unit_*.png"))
    assert units and len(units) == len(json.loads((out / "response.json").read_text())["units"]["maps"])


# -- without a server -------------------------------------------------------------------------------

def test_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}"
    c = Client(url, timeout=3)
    assert c.ping() is False
    with pytest.raises(ServeUnavailable, match=f"TorchServe is not reachable at {url}"):
        c.explain(picture(64, 64))


def test_key_file_is_read_and_re_read(tmp_path):
    kf = tmp_path / "key_file.json"
    c = Client("http://127.0.0.1:1", key_file=kf)
    assert c.headers() == {} and c.key("management") is None  # not written yet
    kf.write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "m"}, "API": {"key": "k"}}))
    assert c.headers() == {"Authorization": "Bearer abc"} and c.headers("management") == {"Authorization": "Bearer m"}
    kf.write_text(json.dumps({"inference": {"key": "new"}, "management": {"key": "m"}, "API": {"key": "k"}}))
    assert c.headers() == {"Authorization": "Bearer new"}
    kf.write_text('{"inference": {"ke')  # being written by TorchServe: no key yet, no error
    assert c.headers() == {} and read_key_file(kf) is None
    token = Client("http://x:1", token="t")
    assert token.headers() == {"Authorization": "Bearer t"} and token.headers("management") == {}
    assert c.management_url == "http://127.0.0.1:2"  # TorchServe's layout: inference port + 1
    assert bearer("k1") == {"Authorization": "Bearer k1"} and bearer(None) == bearer("") == {}
    assert read_key_file(None) is None and read_key_file(tmp_path / "missing.json") is None


def test_connect_decides_local_or_served_in_one_place(model_path, tmp_path):
    """One factory: ``local`` runs the model folder in process (the same answers as ``local_explain``),
    ``serve`` talks HTTP; both have the client's interface."""
    from deepminer.client import LocalClient, connect

    served = connect("serve", url="http://127.0.0.1:9/", model="demo", token="t")
    assert isinstance(served, Client) and served.url == "http://127.0.0.1:9" and served.model == "demo"
    assert served.where == "Model server: http://127.0.0.1:9 · model `demo`"
    local = connect("local", model="demo", model_dir=model_path.parent)
    assert isinstance(local, LocalClient) and local.model == "demo" and local.ping()
    assert local.where == f"Model: in-process ({model_path.parent.name}/model.pt)"
    with pytest.raises(InputError, match="backend: 'gpu' is not one of serve, local"):
        connect("gpu")
    for name in ("Client", "LocalClient"):  # the same calls on either
        for method in ("explain", "explain_methods", "explain_raw", "ping", "models", "model_ready", "warm_up", "close"):
            assert callable(getattr(served if name == "Client" else local, method)), (name, method)
    img = picture(160, 120, 7)
    with local:
        local.warm_up()
        res = local.explain(img, top_units=3, unit_maps="top")
        peers = local.explain_methods(img, ["cam", "gradcam"], target="benign")
        raw = local.explain_raw(img, {"top_units": 3, "unit_maps": "top"})
    want = local_explain(model_path, img, top_units=3, unit_maps="top", name="demo")
    assert res.prediction == want.prediction and res.top_units == want.top_units
    np.testing.assert_array_equal(res.class_maps, want.class_maps)
    assert res.model["name"] == "demo" and raw["model"]["name"] == "demo" and raw["prediction"] == res.prediction
    assert set(peers.method_maps) == {"cam", "gradcam"} and peers.method_maps["gradcam"].shape == res.cam.shape[1:]
    # the models of a local store: this one and its sibling folders with weights
    store = tmp_path / "store"
    for name in ("alpha", "beta", "empty"):
        (store / name).mkdir(parents=True)
    for name in ("alpha", "beta"):
        (store / name / "model.pt").write_bytes(model_path.read_bytes())
    c = connect("local", model="demo", model_dir=store / "alpha")
    assert c.models() == ["beta", "demo"] and c.model_ready() and c.model_ready("beta") and not c.model_ready("empty")


def test_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPMINER_SERVE_URL", "http://127.0.0.1:9999/")
    monkeypatch.setenv("DEEPMINER_MODEL", "other")
    monkeypatch.setenv("DEEPMINER_KEY_FILE", str(tmp_path / "k.json"))
    c = Client.from_env()
    assert (c.url, c.model, c.key_file) == ("http://127.0.0.1:9999", "other", tmp_path / "k.json")
    assert Client.from_env(model="x", url=None).model == "x"


def test_sketch_travels_as_a_png_mask():
    mask = np.zeros((40, 30), bool)
    mask[5:20, 3:9] = True
    opts = ExplainOptions.build(top_units=3, unit_maps="none", sketch=mask, max_side=256).to_json()
    assert opts["top_units"] == 3 and opts["unit_maps"] == "none" and opts["max_side"] == 256
    import base64

    with Image.open(io.BytesIO(base64.b64decode(opts["sketch"]))) as im:
        back = np.asarray(im) > 127
    assert np.array_equal(back, mask)
    assert np.array_equal(ExplainOptions.parse(opts).sketch_mask((40, 30)), mask)  # what the server decodes
    with pytest.raises(InputError, match="sketch: expected a 2-D mask"):
        mask_to_png(np.zeros((2, 3, 4)))


def test_list_models_names_why_the_list_is_unknown():
    """Nothing listening: ServeUnavailable naming the management URL, the requests error chained."""
    import requests

    from deepminer.client import list_models

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServeUnavailable, match=f"the management API at {url} is not reachable") as info:
        list_models(url, timeout=2)
    assert isinstance(info.value.__cause__, requests.RequestException)
