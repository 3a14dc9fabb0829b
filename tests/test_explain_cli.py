"""``deepminer explain``: the in-process path (``--model``), its outputs and its one-line errors.
The ``--url`` success path runs against a real server in tests/test_client.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepminer.cli import main
from deepminer.encoding import decode_array
from deepminer.models import build_model, save_model
from serve.launch import free_port


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    return save_model(build_model("tiny", pretrained=False), tmp_path_factory.mktemp("m") / "model.pt")


@pytest.fixture
def image(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    h, w = 280, 200
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.8 * w)) ** 2 < 1
    img = (inside * (0.5 + 0.4 * rng.random((h, w))) * 65535).astype(np.uint16)
    path = tmp_path / "mammo.png"
    Image.fromarray(img).save(path)
    return path


def test_local_text_output(model_path, image, capsys):
    assert main(["explain", str(image), "--model", str(model_path), "--top-units", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{image}: ") and any(c in out[0] for c in ("normal", "benign", "malignant"))
    assert out[1].split()[0] == "probabilities" and len(out[1].split()) == 7
    assert out[2].split()[:3] == ["model", "trained", "on"] and "not recorded" in out[2]  # says what it knows
    assert out[3].strip().startswith("top units for") and out[3].count("(") == 1 + 3  # "(influence)" + 3 units
    # the scale it was explained at, and how (issue 21): a model without a recorded scale keeps the old default
    assert out[5].strip() == "explained at 280 x 200 px (default: long side at most 1024 px (the model records no scale))"


def test_local_json_and_overlays(model_path, image, tmp_path, capsys):
    out = tmp_path / "out"
    sketch = tmp_path / "sketch.png"
    mask = np.zeros((70, 50), np.uint8)  # any size: resized to the image
    mask[20:40, 10:30] = 255
    Image.fromarray(mask).save(sketch)
    rc = main(["explain", str(image), "--model", str(model_path), "--json", "--out", str(out), "--unit-maps", "all",
               "--sketch", str(sketch)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scale"]["scale_source"].startswith("default") and summary["scale"]["model_scale"] is None
    probs = summary["probabilities"]
    assert summary["prediction"] == max(probs, key=probs.get) and sum(probs.values()) == pytest.approx(1, abs=2e-3)
    assert len(summary["top_units"]) == 8 and "sketch_matches" in summary
    assert summary["model"]["arch"] == "tiny" and summary["model"]["units"] == 32
    response = json.loads((out / "response.json").read_text())
    assert set(response["units"]["maps"]) == {str(u) for u in range(32)}
    assert len(list(out.glob("unit_*.png"))) == 32 and len(list(out.glob("cam_*.png"))) == 3
    with Image.open(out / f"cam_{summary['prediction']}.png") as im:
        cam = np.asarray(im)
    assert cam.shape == (280, 200, 3) and cam.std() > 0
    assert not list(tmp_path.glob(".out.partial-*"))


def test_local_matches_a_plain_forward_pass(model_path, tmp_path, capsys):
    """Cross-check the probabilities with the model's own forward() on the same pixels, background
    zeroed by the tissue mask (an image no larger than one training patch: the classifier's output
    is the image's)."""
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_mask
    from deepminer.models import load_model

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:200, 0:160]
    breast = ((yy - 100) / 90.0) ** 2 + (xx / 130.0) ** 2 < 1
    pixels = (breast * (0.4 + 0.5 * rng.random((200, 160))) + (~breast) * 0.08 * rng.random((200, 160)))
    pixels[4:24, 128:156] = 1.0  # a burned-in label in the background
    image = tmp_path / "small.png"
    Image.fromarray((pixels * 255).astype(np.uint8)).save(image)
    assert main(["explain", str(image), "--model", str(model_path), "--json", "--unit-maps", "none",
                 "--out", str(tmp_path / "o")]) == 0
    probs = json.loads(capsys.readouterr().out)["probabilities"]
    px = load_image(image).pixels
    mask = tissue_mask(px)
    assert 0.3 < mask.mean() < 0.9 and not mask[4:24, 128:156].any()  # background and label cut away
    model = load_model(model_path)
    masked = torch.from_numpy(np.where(mask, px, 0))[None, None]
    with torch.no_grad():
        ref = torch.softmax(model(masked), 1)[0].numpy()
        unit_max = model.forward_features(masked)[0].flatten(1).amax(1).numpy()
        raw_max = model.forward_features(torch.from_numpy(px)[None, None])[0].flatten(1).amax(1).numpy()
    assert np.allclose([probs[c] for c in model.classes], ref, atol=2e-3)
    response = json.loads((tmp_path / "o" / "response.json").read_text())
    assert response["input"]["tissue_fraction"] == pytest.approx(mask.mean(), abs=1e-3)
    served_max = decode_array(response["units"]["max_activation"]).astype(np.float32)
    np.testing.assert_allclose(served_max, unit_max, rtol=5e-3, atol=5e-3)
    assert not np.allclose(served_max, raw_max, rtol=5e-3, atol=5e-3)  # the label would have fired units


@pytest.mark.parametrize("case", ["missing image", "not an image", "server down", "bad top units", "bad max side",
                                  "missing model"])
def test_errors_are_one_line_exit_2(case, model_path, image, tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a picture" * 5)
    args = {"missing image": [str(tmp_path / "nope.png"), "--model", str(model_path)],
            "not an image": [str(junk), "--model", str(model_path)],
            "server down": [str(image), "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "3"],
            "bad top units": [str(image), "--model", str(model_path), "--top-units", "0"],
            "bad max side": [str(image), "--model", str(model_path), "--max-side", "8"],
            "missing model": [str(image), "--model", str(tmp_path / "none.pt")]}[case]
    rc = main(["explain", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("deepminer explain: error:"), err
    if case == "server down":
        assert "TorchServe is not reachable at http://127.0.0.1:" in err[0]
    if case == "not an image":
        assert "junk.png: not an image" in err[0]
    if case == "bad top units":  # the server's own option check, naming the flag
        assert err[0].endswith("--top-units: 0 is less than the minimum of 1")
    if case == "bad max side":
        assert err[0].endswith("--max-side: 8 is less than the minimum of 64")


def test_url_and_model_are_exclusive(model_path, image):
    with pytest.raises(SystemExit) as exit_:
        main(["explain", str(image), "--model", str(model_path), "--url", "http://127.0.0.1:1"])
    assert exit_.value.code == 2
