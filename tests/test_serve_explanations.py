"""``POST /explanations/<model>`` on a real TorchServe (demo profile, this environment; one server
for the module, started like tests/test_client.py's): peer saliency maps on the CAM grid for the
target, served == in-process, one-line 400s that leave the worker serving, and a flat worker RSS
over 100 consecutive gradient requests (no autograd graph or gradients kept between requests)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepminer.client import Client, ServeError, local_explain
from modelfixtures import TINY_MODEL, breast_png

pytestmark = pytest.mark.serve
MODEL = TINY_MODEL


@pytest.fixture(scope="module")
def model_path(tiny_model_path) -> Path:
    return tiny_model_path


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's tiny TorchServe (conftest.py): the shipped model-config.yaml (max_gradient_methods
    3), one intra-op thread in the worker."""
    return tiny_server


@pytest.fixture(scope="module")
def client(server):
    with Client(server.inference_url, model=MODEL, timeout=120) as c:
        yield c


@pytest.fixture()
def one_thread():
    """This process at one intra-op thread too (see ``server``), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_maps_on_the_cam_grid_for_the_target_and_served_equals_local(server, client, model_path, one_thread):
    image = breast_png(256, 192, seed=11)
    methods = ["cam", "class_map", "gradcam", "gradcam++", "smoothgrad"]  # 3 gradient methods: the limit
    first = client.explain_methods(image, methods, options=None)
    assert first.target == first.prediction
    target = next(c for c in first.classes if c != first.prediction)
    served = client.explain_methods(image, methods, target=target)
    assert served.target == target and list(served.method_maps) == methods and served.cache_hit
    grid = (served.input["map_height"], served.input["map_width"])
    t = served.classes.index(target)
    for m in methods:
        assert served.method_maps[m].shape == grid == served.map_size, m
    assert set(served.method_ms) == set(methods)  # every method timed, no other
    np.testing.assert_array_equal(served.method_maps["cam"], served.cam[t])
    np.testing.assert_array_equal(served.method_maps["class_map"], served.class_maps[t])
    assert not np.array_equal(served.method_maps["cam"], first.method_maps["cam"])  # the target is honoured
    local = local_explain(model_path, image, methods=methods, target=target)
    assert local.target == target and list(local.method_maps) == methods
    for m in methods:  # the same path, both sides float16 on the wire
        np.testing.assert_allclose(served.method_maps[m], local.method_maps[m], rtol=2e-3, atol=2e-3, err_msg=m)
    print("\nper-method ms (tiny, 256x192):", {m: served.method_ms[m] for m in methods})


def test_bad_requests_are_one_line_400s_and_the_worker_keeps_serving(server, client):
    pids = server.worker_pids(MODEL)
    image = breast_png(128, 96, seed=2)
    cases = [
        ({"methods": ["cam", "lime"]}, True, "options.methods: must be one of cam/class_map/gradcam/gradcam++/"
                                             "guided_backprop/integrated_gradients/smoothgrad, got 'lime'"),
        ({"methods": ["gradcam", "gradcam++", "guided_backprop", "smoothgrad"]}, True,
         "options.methods: at most 3 gradient methods per request"),
        ({"methods": ["cam"], "target": "cancer"}, True, "options.target: 'cancer' is not a class of the model"),
        ({"methods": ["gradcam"]}, False, "options.methods: only for POST /explanations/<model>"),
        ({"target": "benign"}, False, "options.target: only for POST /explanations/<model>"),
    ]
    for options, explanations, message in cases:
        with pytest.raises(ServeError) as err:
            client.explain_raw(image, options, explanations=explanations)
        e = err.value
        assert (e.status, e.type) == (400, "InputError") and e.message.startswith(message), e
        assert "\n" not in e.message
        ok = client.explain_methods(image, ["gradcam"], options=None)  # the same worker answers the next one
        assert ok.method_maps["gradcam"].shape == ok.map_size
    plain = client.explain(image)
    assert plain.method_maps == {} and plain.target is None
    assert server.worker_pids(MODEL) == pids


def test_worker_rss_is_flat_over_100_explain_requests(server, client):
    """Tolerance: growth < 40 MB, absolute (a percentage of a ~600 MB worker, mostly torch's
    libraries, would say little about the request path). One kept autograd graph of a 256 x 192
    request on the tiny model holds 4.4 MB of saved activations, so keeping the graph of every
    request would add ~440 MB over the 100; 40 MB still catches a leak of 0.4 MB per request and
    leaves room for allocator noise and Python's lazily grown pools (measured: +0.1 MB)."""
    [pid] = server.worker_pids(MODEL)
    images = [breast_png(256, 192, seed=s) for s in range(5)]  # a few images, so not only cache hits

    def one(i: int) -> None:
        exp = client.explain_methods(images[i % len(images)], ["gradcam", "cam"], options=None)
        assert exp.method_maps["gradcam"].shape == exp.map_size

    for i in range(10):
        one(i)
    before = vm_rss_mb(pid)
    t0 = time.perf_counter()
    for i in range(100):
        one(i)
    took = time.perf_counter() - t0
    after = vm_rss_mb(pid)
    print(f"\nworker {pid} VmRSS {before:.1f} MB -> {after:.1f} MB ({after - before:+.1f} MB) "
          f"over 100 requests in {took:.1f} s")
    assert server.worker_pids(MODEL) == [pid]
    assert after - before < 40, f"worker RSS grew {after - before:.1f} MB over 100 explain requests"
