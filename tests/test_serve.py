"""A real TorchServe serving a tiny-model .mar from a Python environment WITHOUT this project
(torch, torchserve and the other libraries, but no ``deepminer``): the archive must carry the library.
Lab profile (token authorization on; the client reads the key file). One server for the module.

Covers: every input format, options, sketch + atlas thresholds, agreement with the in-process engine,
batches of mixed sizes, bad input (4xx JSON, same worker keeps serving), 8 clients x 25 requests
(no 5xx, no restart, flat worker memory), the request-size limit, metrics, token auth, model API off,
and the HTTP round-trip overhead.
"""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image

from deepminer.models import build_model, save_model
from serve.archive import build_mar
from deepminer.client import Client, ServeError, local_explain
from deepminer.explanation import Explanation
from serve.launch import TorchServe

pytestmark = [pytest.mark.serve, pytest.mark.slow]
MODEL = "tiny"


# -- images ---------------------------------------------------------------------------------------

def breast(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A bright textured half-ellipse on black, float [0, 1] (enough for the tissue mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.8 * w)) ** 2 < 1
    tex = 0.55 + 0.25 * rng.random((h, w))
    blob = np.exp(-(((yy - h * 0.4) ** 2 + (xx - w * 0.35) ** 2) / (2 * (0.06 * min(h, w)) ** 2)))
    return np.clip(inside * (tex + 0.3 * blob), 0, 1).astype(np.float32)


def png(pixels: np.ndarray, bits: int = 8) -> bytes:
    buf = io.BytesIO()
    if bits == 8:
        Image.fromarray((pixels * 255).astype(np.uint8)).save(buf, format="PNG")
    else:
        Image.fromarray((pixels * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 8-bit grey with one tiny compressed row: a
    decompression bomb by its dimensions."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b"")


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model (fixed seed) and an atlas whose thresholds are the 0.9 quantile of its units."""
    d = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False).eval()
    save_model(model, d / "model.pt")
    with torch.no_grad():
        x = torch.from_numpy(np.stack([breast(256, 192, s) for s in range(3)]))[:, None]
        feats = model.forward_features(x)
    thresholds = torch.quantile(feats.permute(1, 0, 2, 3).reshape(feats.shape[1], -1), 0.9, dim=1).numpy()
    atlas = d / "atlas"
    atlas.mkdir()
    (atlas / "atlas.json").write_text(json.dumps({"format": "deepminer-atlas/1", "classes": list(model.classes),
                                                  "quantile": 0.9, "data": {"concepts": []}, "per_class": {}}))
    np.savez(atlas / "atlas.npz", thresholds=thresholds.astype(np.float32))
    (atlas / "references.csv").write_text("image_id,image\n")
    return d


def bare_env() -> dict[str, str]:
    """This environment without PYTHONPATH (which could point at the project)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A venv that sees this environment's third-party packages but not the project."""
    venv = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # a plain path line: the packages are importable, but the .pth files there (the editable
    # install of deepminer) are not processed
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import importlib.util as u, torch, ts; print(u.find_spec('deepminer'))"],
                           cwd=venv, capture_output=True, text=True, env=bare_env())
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "None", "the bare venv must not see the project"
    return py


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, bare_python):
    store = tmp_path_factory.mktemp("store")
    build_mar(model_dir / "model.pt", store, name=MODEL, atlas=model_dir / "atlas")  # shipped defaults
    ts = TorchServe(store, {MODEL: f"{MODEL}.mar"}, tmp_path_factory.mktemp("ts"), profile="lab", python=bare_python,
                    env=bare_env())
    ts.start(timeout=300)
    print(f"\nTorchServe (lab profile, bare venv) ready in {ts.started_s:.1f} s")
    yield ts
    group = [pr.pid for pr in psutil.process_iter() if _pgid(pr.pid) == ts.proc.pid]  # launcher, Java, workers
    assert len(group) >= 3
    ts.stop()
    assert ts.proc is None
    alive = [pid for pid in group if _alive(pid)]
    assert not alive, f"TorchServe processes left behind: {alive}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def client(server):
    with Client(server.inference_url, model=MODEL, key_file=server.key_file,
                management_url=server.management_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def good() -> bytes:
    return png(breast(300, 220, 1))


# -- tests ----------------------------------------------------------------------------------------

def test_worker_runs_in_the_projectless_venv(server, client, good, bare_python):
    body = client.explain_raw(good)
    pid = body["server"]["pid"]
    assert pid in server.worker_pids(MODEL)
    assert Path(psutil.Process(pid).cmdline()[0]).parent == Path(bare_python).parent
    assert body["server"]["device"] == "cpu"
    assert body["model"]["name"] == MODEL and body["model"]["units"] == 32


def test_answer_matches_the_in_process_engine(client, model_dir):
    img = breast(400, 300, 2)
    sketch = np.zeros(img.shape, bool)
    sketch[120:200, 60:150] = True
    served = client.explain(png(img), top_units=5, unit_maps="top", sketch=sketch)
    local = local_explain(model_dir / "model.pt", png(img), top_units=5, unit_maps="top", sketch=sketch,
                          atlas=model_dir / "atlas")
    assert served.prediction == local.prediction
    for c in served.classes:
        assert served.probabilities[c] == pytest.approx(local.probabilities[c], abs=2e-3)
        np.testing.assert_allclose(served.influence_of(c), local.influence_of(c), rtol=2e-2, atol=2e-3)
    assert served.top_units == local.top_units and all(len(v) == 5 for v in served.top_units.values())
    assert sorted(served.unit_maps) == sorted(local.unit_maps)
    np.testing.assert_allclose(served.cam, local.cam, rtol=2e-2, atol=2e-3)
    assert served.sketch_iou is not None and served.sketch_iou.shape == (32,)
    np.testing.assert_allclose(served.sketch_iou, local.sketch_iou, atol=1e-3)
    assert served.sketch_iou.max() > 0  # thresholds from the packed atlas make real masks
    assert sum(served.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    # the weights' identity (what atlases and the workbench's labels are keyed by), as dissect computes it
    from deepminer.models import weights_sha256
    from deepminer.models import load_model

    digest = weights_sha256(load_model(model_dir / "model.pt"))
    assert served.model["weights_sha256"] == local.model["weights_sha256"] == digest and len(digest) == 64


def test_a_new_sketch_on_the_same_image_skips_the_forward_pass(client):
    img = png(breast(360, 280, 9))
    first = client.explain_raw(img)
    a, b = np.zeros((360, 280), bool), np.zeros((40, 30), bool)
    a[100:200, 50:150] = True
    b[:10, :10] = True  # another sketch, another size
    second = client.explain(img, sketch=a)
    third = client.explain(img, sketch=b)
    assert not first["server"]["cache_hit"]
    for res in (second, third):
        assert res.server["cache_hit"] and res.cache_hit and res.timing_ms["forward"] == 0
    assert not np.allclose(second.sketch_iou, third.sketch_iou)
    np.testing.assert_allclose(second.cam, Explanation.from_json(first).cam, atol=1e-3)
    changed = breast(360, 280, 9)
    changed[180, 140] = 1.0 - changed[180, 140]  # one pixel inside the breast: another image
    assert not client.explain_raw(png(changed))["server"]["cache_hit"]


def test_ablation_is_served_from_the_cached_features(client, model_dir):
    """A new unit set on an image the server has seen: no forward pass, and the same numbers as the
    in-process path (which tests/test_ablation.py checks against a full forward with the units zeroed)."""
    img = png(breast(320, 256, 11))
    first = client.explain(img)
    silenced = client.explain(img, ablate=[0, 5, 17])
    again = client.explain(img, ablate=[2])
    assert not first.cache_hit and first.ablation is None
    for res in (silenced, again):
        assert res.cache_hit and res.timing_ms["forward"] == 0 and res.ablation is not None
    local = local_explain(model_dir / "model.pt", img, ablate=[0, 5, 17], atlas=model_dir / "atlas")
    assert silenced.ablation.units == (0, 5, 17) and silenced.ablation.prediction == local.ablation.prediction
    for c in silenced.classes:
        assert silenced.ablation.probabilities[c] == pytest.approx(local.ablation.probabilities[c], abs=2e-3)
        assert silenced.ablation.delta[c] == pytest.approx(
            silenced.ablation.probabilities[c] - first.probabilities[c], abs=2e-3)
    np.testing.assert_allclose(silenced.ablation.class_maps, local.ablation.class_maps, atol=2e-3)


def test_unit_maps_options(client, good):
    none = client.explain(good, unit_maps="none")
    assert none.unit_maps == {} and none.sketch_iou is None
    every = client.explain(good, unit_maps="all", top_units=3)
    assert sorted(every.unit_maps) == list(range(32))
    assert all(len(v) == 3 for v in every.top_units.values())
    small = client.explain(good, max_side=64)
    large = client.explain(good, max_side=512)
    assert small.cam.shape[1] * small.cam.shape[2] < large.cam.shape[1] * large.cam.shape[2]
    raw = client.explain_raw(good, {"unit_maps": "all", "top_units": 3})["units"]["maps"]["0"]
    assert raw["dtype"] == "float16"  # arrays travel compactly


def test_every_input_format(client, tmp_path):
    import tifffile
    from dicomfixtures import write_dicom

    img = breast(260, 200, 3)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    tif = io.BytesIO()
    tifffile.imwrite(tif, (img * 4095).astype(np.uint16))
    dcm = write_dicom(tmp_path / "x.dcm", (img * 4095).astype(np.uint16), bits_stored=12)
    cases = {"png": png(img), "png16": png(img, 16), "jpeg": buf.getvalue(), "tiff": tif.getvalue(),
             "dicom": dcm.read_bytes()}
    probs = {}
    for name, data in cases.items():
        res = client.explain(data)
        assert (res.input["height"], res.input["width"]) == (260, 200), name
        probs[name] = np.array(list(res.probabilities.values()))
    assert {client.explain(cases[k]).input["format"] for k in cases} == {"png", "jpeg", "tiff", "dicom"}
    # the same picture in every format gives (nearly) the same answer
    for name in cases:
        np.testing.assert_allclose(probs[name], probs["png"], atol=0.05, err_msg=name)


def test_raw_body_and_kserve_style_base64(server, client, good):
    headers = client.headers()
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=good,
                      headers={**headers, "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["input"]["height"] == 300


BAD = {
    "not an image": (b"hello, this is not an image at all" * 4, None, 400, ""),
    "truncated png": ("truncated", None, 400, ""),
    "decompression bomb": (png_header_only(30000, 30000), None, 413, ""),
    "1x1 image": ("1x1", None, 400, ""),
    "pixel-less dicom": ("dicom", None, 400, ""),
    "malformed options": ("good", '{"top_units": 3', 400, "options"),
    "options not an object": ("good", "[1, 2]", 400, "options"),
    "unknown option": ("good", '{"colour": "red"}', 400, "colour"),
    "top_units 0": ("good", '{"top_units": 0}', 400, "top_units"),
    "unit_maps bad": ("good", '{"unit_maps": "some"}', 400, "unit_maps"),
    "max_side too small": ("good", '{"max_side": 10}', 400, "max_side"),
    "sketch not a png": ("good", json.dumps({"sketch": base64.b64encode(b"GIF89a" + bytes(40)).decode()}), 400, "sketch"),
    "sketch not base64": ("good", '{"sketch": "***"}', 400, "sketch"),
    "ablate out of range": ("good", '{"ablate": [3, 32]}', 400, "options.ablate: unit 32 out of range 0..31"),
    "ablate duplicates": ("good", '{"ablate": [3, 3]}', 400, "options.ablate: duplicate ids 3"),
    "ablate too many": ("good", json.dumps({"ablate": list(range(257))}), 400, "options.ablate: at most 256 items"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_json_and_the_worker_keeps_serving(case, server, client, good, tmp_path):
    from dicomfixtures import write_dicom

    data, options, status, word = BAD[case]
    if data == "truncated":
        data = good[: len(good) // 2]
    elif data == "1x1":
        data = png(np.ones((1, 1), np.float32))
    elif data == "dicom":
        data = write_dicom(tmp_path / "empty.dcm", None, rows_cols=(512, 512)).read_bytes()
    elif data == "good":
        data = good
    pids = server.worker_pids(MODEL)
    files = {"data": ("image", data, "application/octet-stream")}
    if options is not None:
        files["options"] = (None, options, "application/json")
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", files=files, headers=client.headers(), timeout=60)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "type", "message"} and body["code"] == status
    assert body["message"] and "\n" not in body["message"] and word in body["message"]
    assert body["type"] in ("InputError", "TooLargeError")
    ok = client.explain_raw(good)  # the next good request succeeds on the same worker
    assert ok["prediction"] in ("normal", "benign", "malignant")
    assert server.worker_pids(MODEL) == pids and ok["server"]["pid"] in pids


def test_client_raises_serve_error(client):
    with pytest.raises(ServeError) as err:
        client.explain(b"not an image" * 10)
    assert err.value.status == 400 and err.value.type == "InputError"


def test_a_form_body_is_refused_with_a_hint(server, client):
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=b"abc",
                      headers={**client.headers(), "Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 400 and "multipart part 'data'" in r.json()["message"]


def test_batches_of_mixed_sizes(client, server):
    sizes = [(240, 180), (320, 260), (200, 300), (400, 280)] * 2
    images = [png(breast(h, w, i)) for i, (h, w) in enumerate(sizes)]
    alone = [client.explain(b, unit_maps="none") for b in images[:4]]
    results: list = [None] * len(images)

    def call(i: int) -> None:
        with Client(server.inference_url, model=MODEL, key_file=server.key_file, timeout=120) as c:
            results[i] = c.explain_raw(images[i], {"unit_maps": "none"})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    assert max(r["server"]["batch"] for r in results) > 1, "no batch was formed"
    for i, r in enumerate(results):
        assert (r["input"]["height"], r["input"]["width"]) == sizes[i]
        ref = alone[i % 4].probabilities
        for c, p in r["probabilities"].items():
            assert p == pytest.approx(ref[c], abs=2e-3)


def test_request_limit_fits_a_16bit_image_over_the_default_6_5_mb(client):
    rng = np.random.default_rng(5)
    noisy = (rng.integers(0, 65535, (1800, 2000))).astype(np.uint16)  # incompressible: ~7.2 MB
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG", compress_level=1)
    assert len(buf.getvalue()) > 6_553_500
    res = client.explain(buf.getvalue(), unit_maps="none", max_side=256)
    assert (res.input["height"], res.input["width"]) == (1800, 2000)


def test_load_8_clients_x_25_requests(server):
    pid = server.worker_pids(MODEL)[0]
    images = [png(breast(96 + 8 * i, 80 + 8 * i, 10 + i)) for i in range(8)]  # small: this is about serving
    sketch = np.zeros((64, 64), bool)
    sketch[10:30, 20:40] = True
    with Client(server.inference_url, model=MODEL, key_file=server.key_file) as c:
        for b in images:  # warm-up: every image once (fills the feature cache)
            c.explain_raw(b)
    rss_before = psutil.Process(pid).memory_info().rss
    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with Client(server.inference_url, model=MODEL, key_file=server.key_file, timeout=120) as c:
            for j in range(25):
                try:
                    body = (c.explain(images[(i + j) % 8], sketch=sketch if j % 3 == 0 else None,
                                      unit_maps=("none", "top", "all")[j % 3]))
                    code = 200 if body.prediction else 0
                except ServeError as err:
                    code = err.status
                    errors.append(str(err))
                except Exception as err:  # noqa: BLE001 - any other failure is counted as a lost request
                    code = -1
                    errors.append(repr(err))
                with lock:
                    statuses.append(code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - t0
    rss_after = psutil.Process(pid).memory_info().rss
    print(f"\n8x25 requests in {elapsed:.1f} s ({200 / elapsed:.1f} req/s); worker RSS "
          f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert len(statuses) == 200 and statuses.count(200) == 200, (statuses, errors[:3])
    assert server.worker_pids(MODEL) == [pid], "the worker restarted"
    assert rss_after - rss_before < 100 * 2**20


def test_token_authorization_and_locked_down_apis(server, client):
    r = requests.get(f"{server.inference_url}/ping", timeout=10)
    assert r.status_code in (400, 401)  # no token, no answer
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=b"x",
                      headers={"Authorization": "Bearer wrong", "Content-Type": "image/png"}, timeout=10)
    assert r.status_code in (400, 401)
    assert client.ping()
    mgmt = {"Authorization": f"Bearer {json.loads(server.key_file.read_text())['management']['key']}"}
    r = requests.post(f"{server.management_url}/models", params={"url": "x.mar"}, headers=mgmt, timeout=10)
    assert r.status_code == 405  # the model register API is off
    metrics = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text


def test_token_refresh_with_the_api_key(server):
    c = Client(server.inference_url, model=MODEL, key_file=server.key_file, management_url=server.management_url)
    before = json.loads(server.key_file.read_text())["inference"]["key"]
    assert c.refresh_token()
    assert json.loads(server.key_file.read_text())["inference"]["key"] != before
    assert c.ping()


def test_bench_serve_against_the_real_server(server, model_dir, capsys):
    """`deepminer bench --serve` end to end (lab profile: token from the key file): the local forward
    runs on the worker's threads, and every timed request reports the worker's own forward."""
    from deepminer.cli import main

    rc = main(["bench", "--model", str(model_dir / "model.pt"), "--cases", "patch", "--no-dissect",
               "--repeats", "3", "--warmup", "0", "--serve", server.inference_url, "--serve-model", MODEL,
               "--key-file", str(server.key_file), "--serve-warmup", "4", "--no-eval", "--no-startup", "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)["serve"]
    assert s["server_device"] == "cpu" and s["server_threads"] == s["forward_threads"] >= 1
    assert s["jit_warmup"] == 4 and len(s["raw"]["serve_ms"]) == 3
    assert all(f > 0 for f in s["raw"]["server_forward_ms"])  # no timed request was a cache hit
    assert 0 < s["serve_overhead_ms"] < s["serve_p50_ms"]
    assert s["serve_vs_forward_ms"] == pytest.approx(s["serve_p50_ms"] - s["forward_ms"], abs=1e-3)  # JSON rounds
