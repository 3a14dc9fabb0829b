"""``deepminer archive`` / :func:`serve.archive.build_mar`, the server profiles and the KServe files.
No server here (tests/test_serve.py serves a .mar for real)."""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deepminer.cli import main
from deepminer.models import build_model, save_model
from serve.archive import build_mar, mar_contents, runtime_requirements
from serve.launch import read_properties

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_model(build_model("tiny", pretrained=False), d / "model.pt")
    atlas = d / "atlas"
    atlas.mkdir()
    (atlas / "atlas.json").write_text(json.dumps({"format": "deepminer-atlas/1", "classes": ["normal", "benign", "malignant"],
                                                  "quantile": 0.99, "data": {"concepts": []}, "per_class": {}}))
    np.savez(atlas / "atlas.npz", thresholds=np.linspace(0.1, 1.0, 32, dtype=np.float32))
    (atlas / "references.csv").write_text("image_id,image\n")
    return d


def test_cli_builds_a_self_contained_mar(model_dir, tmp_path, capsys):
    out = tmp_path / "store"
    rc = main(["archive", "--model", str(model_dir / "model.pt"), "--atlas", str(model_dir / "atlas"), "--name", "tiny",
               "--out", str(out), "--workers", "2", "--batch-size", "3", "--max-batch-delay", "7", "--device", "cpu",
               "--version", "2.5"])
    assert rc == 0
    mar = out / "tiny.mar"
    info = mar_contents(mar)
    files = set(info["files"])
    # weights, handler, library, atlas, per-model config, requirements
    for name in ("model.pt", "deepminer_handler.py", "deepminer/__init__.py", "deepminer/explain/__init__.py",
                 "deepminer/data/io.py", "deepminer/encoding.py", "atlas/atlas.json", "atlas/atlas.npz",
                 "model-config.yaml", "requirements.txt", "MAR-INF/MANIFEST.json"):
        assert name in files, name
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert not any(f.startswith(("serve/", "ui/", "tests/")) for f in files)
    model = info["manifest"]["model"]
    assert (model["modelName"], model["modelVersion"], model["handler"]) == ("tiny", "2.5", "deepminer_handler.py")
    cfg = info["config"]
    assert (cfg["minWorkers"], cfg["maxWorkers"], cfg["batchSize"], cfg["maxBatchDelay"], cfg["deviceType"]) == (2, 2, 3, 7, "cpu")
    assert cfg["handler"]["atlas"] == "atlas" and cfg["handler"]["model_file"] == "model.pt"
    with zipfile.ZipFile(mar) as z:
        assert z.read("model.pt") == (model_dir / "model.pt").read_bytes()
        reqs = z.read("requirements.txt").decode().split()
    names = {r.split("==")[0].lower() for r in reqs}
    assert {"numpy", "pillow", "pydicom"} <= names and not names & {"torch", "torchvision"}
    assert all("==" in r for r in reqs)
    assert "MiB" in capsys.readouterr().err


def test_defaults_leave_the_device_to_torchserve(model_dir, tmp_path):
    mar = build_mar(model_dir / "model.pt", tmp_path, name="m")
    cfg = mar_contents(mar)["config"]
    assert "deviceType" not in cfg and cfg["batchSize"] >= 2 and cfg["minWorkers"] == 1
    assert 1 <= cfg["maxBatchDelay"] <= 5  # a lone request barely waits for company
    assert "atlas" not in cfg["handler"]  # no atlas given: none packed
    assert not any(f.startswith("atlas/") for f in mar_contents(mar)["files"])


@pytest.mark.parametrize("case", ["missing model", "not a checkpoint", "atlas units", "bad name", "bad workers",
                                  "zero delay"])
def test_bad_input_fails_with_one_line_and_leaves_nothing(case, model_dir, tmp_path, capsys):
    out = tmp_path / "store"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    args = {"missing model": ["--model", str(tmp_path / "nope.pt")],
            "not a checkpoint": ["--model", str(junk)],
            "atlas units": ["--model", str(model_dir / "model.pt"), "--atlas", str(model_dir / "atlas")],
            "bad name": ["--model", str(model_dir / "model.pt"), "--name", "../evil"],
            "bad workers": ["--model", str(model_dir / "model.pt"), "--workers", "0"],
            # TorchServe reads maxBatchDelay 0 as its 100 ms default: refused, not silently slow
            "zero delay": ["--model", str(model_dir / "model.pt"), "--max-batch-delay", "0"]}[case]
    if case == "atlas units":  # an atlas of another model (16 units, not 32)
        other = tmp_path / "atlas16"
        other.mkdir()
        for f in ("atlas.json", "references.csv"):
            (other / f).write_bytes((model_dir / "atlas" / f).read_bytes())
        np.savez(other / "atlas.npz", thresholds=np.ones(16, np.float32))
        args = ["--model", str(model_dir / "model.pt"), "--atlas", str(other)]
    rc = main(["archive", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("deepminer archive: error:")
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    if case == "zero delay":
        assert "100 ms" in err[0]
    if case == "atlas units":
        assert "16 unit thresholds" in err[0] and "32 units" in err[0]


def test_handler_module_has_exactly_one_class():
    from ts.utils.util import list_classes_from_module

    spec = importlib.util.spec_from_file_location("deepminer_handler", ROOT / "handlers" / "deepminer_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = list_classes_from_module(module)
    assert [c.__name__ for c in classes] == ["DeepMinerHandler"]
    assert not hasattr(module, "handle")  # TorchServe would take a module-level handle() instead


def test_the_library_never_imports_serving_or_ui_code():
    banned = {"serve", "ts", "streamlit", "ui", "handlers", "model_archiver"}
    for py in (ROOT / "deepminer").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = {node.module.split(".")[0]}
            else:
                continue
            assert not tops & banned, f"{py.relative_to(ROOT)} imports {tops & banned}"


def test_runtime_requirements_are_what_the_library_imports():
    reqs = runtime_requirements()
    assert any(r.lower().startswith("numpy==") for r in reqs)
    assert not any(r.lower().startswith(("torch==", "torchvision==", "streamlit==", "torchserve==")) for r in reqs)


# -- server profiles ------------------------------------------------------------------------------

@pytest.mark.parametrize("profile,token_off", [("config.properties", "true"), ("config.lab.properties", "false")])
def test_profiles_are_loopback_locked_down_and_sized(profile, token_off):
    p = read_properties(ROOT / "serve" / profile)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert p[key].startswith("http://127.0.0.1:"), key
    assert p["grpc_inference_address"] == p["grpc_management_address"] == "127.0.0.1"
    assert p["enable_model_api"] == "false"
    assert p["disable_token_authorization"] == token_off
    assert p["metrics_mode"] == "prometheus" and p["enable_metrics_api"] == "true"
    # a 16-bit 4500 x 3000 image, uncompressed, plus multipart overhead
    assert int(p["max_request_size"]) >= 4500 * 3000 * 2 + 1_000_000
    # every unit map of a 1280-unit model at the largest max_side, float16 in base64, at output stride 16 (the
    # finest a model can be served at: deepminer.models.unit_layer)
    h, w = math.ceil(4096 / 16), math.ceil(4096 * 3000 / 4500 / 16)
    all_maps = 1280 * h * w * 2 * 4 / 3
    assert int(p["max_response_size"]) >= 2 * all_maps


def test_the_two_profiles_differ_only_in_authorization():
    demo = read_properties(ROOT / "serve" / "config.properties")
    lab = read_properties(ROOT / "serve" / "config.lab.properties")
    diff = {k for k in demo.keys() | lab.keys() if demo.get(k) != lab.get(k)}
    # the lab profile also reads TS_* variables: `make run` sets TS_MAX_REQUEST_SIZE from the one upload limit
    assert diff == {"disable_token_authorization", "token_expiration_min", "enable_envvars_config"}


# -- KServe ---------------------------------------------------------------------------------------

def test_kserve_manifest_and_config_agree():
    isvc = yaml.safe_load((ROOT / "serve" / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    pred = isvc["spec"]["predictor"]
    runtime = pred["pytorch"]
    assert runtime["storageUri"] and runtime["protocolVersion"] == "v1"
    res = runtime["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[part])
    envs = {e["name"]: e["value"] for e in runtime.get("env", [])}
    cfg = read_properties(ROOT / "serve" / "kserve" / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address", "model_store", "model_snapshot",
                "enable_envvars_config", "service_envelope", "max_request_size", "max_response_size"):
        assert key in cfg, key
    assert cfg["inference_address"].endswith(":8085")  # KServe's wrapper forwards to 8085
    assert cfg["model_store"] == "/mnt/models/model-store" and cfg["enable_envvars_config"] == "true"
    assert cfg["service_envelope"] == envs.get("TS_SERVICE_ENVELOPE", cfg["service_envelope"]) == "kserve"
    snap = json.loads(cfg["model_snapshot"])
    assert snap["modelCount"] == len(snap["models"]) == 1
    (name, versions), = snap["models"].items()
    (version, entry), = versions.items()
    assert name == "demo" and entry["marName"] == f"{name}.mar" and entry["defaultVersion"] is True
    assert entry["minWorkers"] >= 1 and entry["batchSize"] >= 1 and entry["responseTimeout"] >= 60
    local = read_properties(ROOT / "serve" / "config.properties")
    assert int(cfg["max_response_size"]) >= int(local["max_response_size"])
    assert int(cfg["max_request_size"]) >= int(local["max_request_size"])


def test_procfile_has_serve_and_ui():
    procs = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert {"serve", "ui", "proxy"} <= set(procs)  # proxy: the lab profile's nginx (serve/proxy.py)
    assert "scripts/serve.sh" in procs["serve"]
    assert "streamlit run ui/app.py" in procs["ui"] and "--server.address 127.0.0.1" in procs["ui"]
