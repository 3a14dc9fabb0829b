"""Peer saliency maps of ``POST /explanations/<model>``, in process: the ``methods``/``target``
options, the Explanation fields that carry the maps (and their JSON round trip), the service's
explain path (maps on the CAM grid, target, limit, cache, the model left as found) and the client's
side (``local_explain(methods=...)``, ``Client.explain_methods`` posting to ``/explanations``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from deepminer.client import Client, local_explain
from deepminer.errors import InputError
from deepminer.explain.peers import METHODS, saliency
from deepminer.explain.service import SETTINGS, ExplainService
from deepminer.explanation import Explanation, UnitMaps
from deepminer.models import save_model
from deepminer.options import EXPLAIN_METHODS, FREE_METHODS, GRADIENT_METHODS, ExplainOptions
from modelfixtures import breast_png, tiny_model


@pytest.fixture(scope="module")
def service() -> ExplainService:
    return ExplainService(tiny_model(0), settings={"max_gradient_methods": 5, "keep_freed_memory": False},
                          name="tiny")


# -- the options --------------------------------------------------------------------------------

def test_method_names_are_the_peers_plus_the_explanation_pass():
    assert set(GRADIENT_METHODS) == set(METHODS) - {"cam"}
    assert EXPLAIN_METHODS == FREE_METHODS + GRADIENT_METHODS and FREE_METHODS == ("cam", "class_map")
    assert SETTINGS["max_gradient_methods"] == 3


def test_methods_and_target_options():
    opts = ExplainOptions.parse({"methods": ["cam", "gradcam"], "target": "benign"})
    assert (opts.methods, opts.target, opts.gradient_methods) == (("cam", "gradcam"), "benign", ("gradcam",))
    assert ExplainOptions.parse(opts.to_json()) == opts
    assert ExplainOptions.build(methods=["smoothgrad"], target="normal").to_json() == {
        "top_units": 8, "unit_maps": "top", "methods": ["smoothgrad"], "target": "normal"}
    assert "methods" not in ExplainOptions().to_json() and ExplainOptions.parse({"methods": []}).is_default
    opts.check_endpoint(explain=True)
    for raw, option in (({"methods": ["cam"]}, "methods"), ({"target": "benign"}, "target")):
        with pytest.raises(InputError, match=rf"^options\.{option}: only for POST /explanations/<model>$"):
            ExplainOptions.parse(raw).check_endpoint(explain=False)


def test_an_unknown_method_is_one_line_listing_the_known_ones():
    with pytest.raises(InputError) as err:
        ExplainOptions.parse({"methods": ["cam", "lime"]})
    msg = str(err.value)
    assert msg == ("options.methods: must be one of cam/class_map/gradcam/gradcam++/guided_backprop/"
                   "integrated_gradients/smoothgrad, got 'lime'")
    with pytest.raises(InputError, match=r"^options\.methods: .*non-unique"):
        ExplainOptions.parse({"methods": ["cam", "cam"]})
    with pytest.raises(InputError, match=r"^options\.methods: 'cam' is not of type 'array'$"):
        ExplainOptions.parse({"methods": "cam"})


# -- the type -----------------------------------------------------------------------------------

def _explanation(**kw) -> Explanation:
    rng = np.random.default_rng(0)
    classes = ("normal", "benign", "malignant")
    return Explanation(classes=classes, probabilities={"normal": 0.2, "benign": 0.3, "malignant": 0.5},
                       prediction="malignant", class_maps=rng.random((3, 4, 3)).astype(np.float32),
                       cam=rng.normal(size=(3, 4, 3)).astype(np.float32), unit_max=rng.random(5).astype(np.float32),
                       influence=rng.normal(size=(3, 5)).astype(np.float32), top_units={c: [0, 1] for c in classes},
                       unit_maps=UnitMaps.empty((4, 3)), input={"height": 40, "width": 30}, **kw)


def test_method_maps_round_trip_and_are_absent_when_not_asked():
    plain = _explanation().to_json()
    assert "methods" not in plain and "target" not in plain
    back = Explanation.from_json(json.loads(json.dumps(plain)))
    assert back.target is None and back.method_maps == {} and back.method_ms == {}

    rng = np.random.default_rng(1)
    maps = {"cam": rng.normal(size=(4, 3)).astype(np.float32), "gradcam": rng.random((4, 3)).astype(np.float32)}
    exp = _explanation(target="benign", method_maps=maps, method_ms={"cam": 0.01, "gradcam": 12.5})
    body = json.loads(json.dumps(exp.to_json()))
    assert body["target"] == "benign" and set(body["methods"]) == {"cam", "gradcam"}
    assert body["methods"]["gradcam"]["map"]["dtype"] == "float16" and body["methods"]["gradcam"]["ms"] == 12.5
    back = Explanation.from_json(body)
    assert back.target == "benign" and back.method_ms == {"cam": 0.01, "gradcam": 12.5}
    assert list(back.method_maps) == ["cam", "gradcam"]
    for m, a in maps.items():
        assert back.method_maps[m].dtype == np.float32
        np.testing.assert_array_equal(back.method_maps[m], a.astype(np.float16).astype(np.float32))
    assert Explanation.from_json(back.to_json()).to_json() == back.to_json()


def test_a_malformed_methods_block_is_one_line():
    body = _explanation(target="benign", method_maps={"cam": np.zeros((4, 3), np.float32)}).to_json()
    body["methods"]["cam"] = {"ms": 1.0}
    with pytest.raises(InputError, match=r"^malformed explanation body: KeyError"):
        Explanation.from_json(body)


# -- the service --------------------------------------------------------------------------------

def test_every_method_on_the_cam_grid_for_the_target(service):
    image = breast_png()
    exp = service.explain_methods(image, {"methods": list(EXPLAIN_METHODS[:6]), "max_side": 256})
    assert exp.target == exp.prediction and list(exp.method_maps) == list(EXPLAIN_METHODS[:6])
    t = exp.classes.index(exp.target)
    for m, a in exp.method_maps.items():
        assert a.shape == exp.map_size and a.dtype == np.float32 and np.isfinite(a).all(), m
    assert set(exp.method_ms) == set(exp.method_maps)  # every method timed, no other
    np.testing.assert_array_equal(exp.method_maps["cam"], exp.cam[t].astype(np.float32))
    np.testing.assert_array_equal(exp.method_maps["class_map"], exp.class_maps[t].astype(np.float32))
    assert exp.timing_ms["methods"] >= sum(exp.method_ms.values()) - 1 and exp.timing_ms["handler"] > 0

    other = next(c for c in exp.classes if c != exp.prediction)
    rest = service.explain_methods(image, {"methods": ["cam", "smoothgrad", "gradcam"], "target": other,
                                           "max_side": 256})
    assert rest.target == other and rest.cache_hit  # same image and options: no forward pass
    o = exp.classes.index(other)
    np.testing.assert_array_equal(rest.method_maps["cam"], exp.cam[o].astype(np.float32))
    # the gradient maps are peers.saliency of the tissue-masked pixels for the target
    from deepminer.data.io import load_image
    from deepminer.data.tissue import keep_tissue

    pixels, _ = keep_tissue(load_image(image).pixels)
    for m in ("gradcam", "smoothgrad"):
        np.testing.assert_allclose(rest.method_maps[m], saliency(service.model, pixels, m, o, max_side=256),
                                   atol=1e-5)
    assert not np.allclose(rest.method_maps["gradcam"], exp.method_maps["gradcam"]) or o == t
    assert exp.to_json()["methods"].keys() == exp.method_maps.keys()


def test_no_methods_means_cam_and_the_cache_stays_clean(service):
    image = breast_png(seed=3)
    exp = service.explain_methods(image, None)
    assert list(exp.method_maps) == ["cam"] and exp.target == exp.prediction
    again = service.explain(image)  # the cached core was not given the maps
    assert again.cache_hit and again.target is None and again.method_maps == {} and "methods" not in again.timing_ms


def test_limits_and_bad_requests_are_one_line_before_any_work(service):
    limited = ExplainService(service.model, name="tiny")  # the shipped default: 3
    image = breast_png()
    four = ["gradcam", "gradcam++", "guided_backprop", "smoothgrad"]
    with pytest.raises(InputError, match=r"^options\.methods: at most 3 gradient methods per request .*got 4"):
        limited.explain_methods(image, {"methods": ["cam", "class_map", *four]})
    limited.explain_methods(image, {"methods": ["cam", "class_map", *four[:3]], "max_side": 128})  # free ones don't count
    with pytest.raises(InputError, match=r"^options\.target: 'cancer' is not a class of the model \(known: normal"):
        service.explain_methods(image, {"methods": ["cam"], "target": "cancer"})
    with pytest.raises(InputError, match=r"^options\.methods: only for POST /explanations/<model>$"):
        service.explain(image, {"methods": ["gradcam"]})
    with pytest.raises(InputError, match=r"^options\.target: only for POST /explanations/<model>$"):
        service.explain(image, ExplainOptions(target="benign"))


def test_the_model_is_left_as_found(service):
    import torch

    model = service.model
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a caller's choice that must survive
    flags = [p.requires_grad for p in params]
    image = breast_png(seed=5)
    before = service.explain(image, {"max_side": 192, "unit_maps": "all"})
    service.explain_methods(image, {"methods": ["gradcam", "gradcam++", "integrated_gradients"], "max_side": 192})
    assert not model.training and [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    assert torch.is_grad_enabled()
    after = ExplainService(model, name="tiny").explain(image, {"max_side": 192, "unit_maps": "all"})
    np.testing.assert_array_equal(after.cam, before.cam)
    np.testing.assert_array_equal(after.unit_maps.stack, before.unit_maps.stack)
    params[0].requires_grad_(True)


# -- the client -----------------------------------------------------------------------------------

def test_local_explain_with_methods_equals_the_service_through_json(tmp_path):
    path = save_model(tiny_model(2), tmp_path / "model.pt")
    image = breast_png(seed=7)
    got = local_explain(path, image, methods=["cam", "gradcam"], target="benign", max_side=256)
    assert got.target == "benign" and list(got.method_maps) == ["cam", "gradcam"]
    ref = ExplainService(tiny_model(2), name="model").explain_methods(
        image, {"methods": ["cam", "gradcam"], "target": "benign", "max_side": 256})
    for m in ("cam", "gradcam"):
        np.testing.assert_array_equal(got.method_maps[m], ref.method_maps[m].astype(np.float16).astype(np.float32))
    plain = local_explain(path, image, max_side=256)
    assert plain.method_maps == {} and plain.target is None
    with pytest.raises(InputError, match=r"^options\.methods: must be one of"):
        local_explain(path, image, methods=["lime"])


class _Answer:
    status_code = 200

    def __init__(self, body: dict):
        self._body = body
        self.text = json.dumps(body)

    def json(self) -> dict:
        return self._body


def test_client_explain_methods_posts_multipart_to_explanations(monkeypatch):
    sent: dict = {}
    body = _explanation(target="normal", method_maps={"gradcam": np.ones((4, 3), np.float32)},
                        method_ms={"gradcam": 3.0}).to_json()

    urls: list[str] = []
    has_pool = {"value": True}

    probes: list[str] = []

    def fake(self, method, url, **kw):
        if url.endswith("/jobs"):  # the remote jobs API (the lab's sign-in service): not on this server
            probes.append(url)
            missing = _Answer({"code": 404, "type": "NotFound", "message": "no such route"})
            missing.status_code = 404
            return missing
        sent.update(method=method, url=url, **kw)
        urls.append(url)
        if url.endswith("-heavy") and not has_pool["value"]:
            missing = _Answer({"code": 404, "type": "ModelNotFoundException", "message": "Model not found"})
            missing.status_code = 404
            return missing
        return _Answer(body)

    monkeypatch.setattr(requests.Session, "request", fake)
    client = Client("http://127.0.0.1:9", model="tiny")
    exp = client.explain_methods(b"\x89PNG image", ["gradcam"], target="normal",
                                 options=ExplainOptions(top_units=2, max_side=256))
    # explanations go to the model's heavy-work pool (docs/serving.md)...
    assert (sent["method"], urls) == ("POST", ["http://127.0.0.1:9/explanations/tiny-heavy"])
    assert probes == ["http://127.0.0.1:9/jobs"]  # asked once whether the server keeps jobs (it does not)
    first = dict(sent)
    # ...and to the model itself on a server without pools, from then on without asking again
    has_pool["value"] = False
    urls.clear()
    bare = Client("http://127.0.0.1:9", model="tiny")
    for _ in range(2):
        bare.explain_methods(b"\x89PNG image", ["gradcam"], target="normal")
    assert urls == ["http://127.0.0.1:9/explanations/tiny-heavy", "http://127.0.0.1:9/explanations/tiny",
                    "http://127.0.0.1:9/explanations/tiny"]
    assert json.loads(first["files"]["options"][1]) == {"top_units": 2, "unit_maps": "top", "max_side": 256,
                                                       "methods": ["gradcam"], "target": "normal"}
    assert exp.target == "normal" and exp.method_maps["gradcam"].shape == (4, 3) and exp.method_ms == {"gradcam": 3.0}
    with pytest.raises(InputError, match=r"^options\.methods: must be one of"):
        client.explain_methods(b"x", ["lime"])
