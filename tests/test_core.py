"""The shared pieces: torchvision compatibility, array encoding, dataset contract, CLI errors."""
import base64
import subprocess
import sys

import numpy as np
import pytest

import deepminer
from deepminer.atomic import atomic_file, atomic_path, staged_output
from deepminer.data.dataset import read_manifest, write_manifest
from deepminer.encoding import decode_array, encode_array
from deepminer.errors import DeepMinerError, InputError


def test_torchvision_imports_and_builds_a_model():
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8", "uint16", "int64", "bool"])
def test_encoding_roundtrip_is_little_endian(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    obj = encode_array(a)
    assert obj["shape"] == [2, 3, 4] and obj["dtype"] == dtype
    raw = base64.b64decode(obj["data"])
    assert raw == a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert np.array_equal(decode_array(obj), a)


def test_encoding_hand_example():
    # 1.0 as little-endian float16 is 0x3C00 -> bytes 00 3C
    obj = encode_array(np.array([1.0]), dtype="float16")
    assert base64.b64decode(obj["data"]) == b"\x00\x3c"


def test_decode_rejects_malformed():
    with pytest.raises(InputError, match="3 values for shape"):
        decode_array({"shape": [2, 2], "dtype": "uint8", "data": base64.b64encode(b"abc").decode()})
    with pytest.raises(InputError):
        decode_array({"shape": [1], "dtype": "object", "data": ""})


def test_error_message_is_one_line():
    assert "\n" not in str(DeepMinerError("a\nb   c"))


def test_manifest_roundtrip_and_missing_columns(tmp_path):
    rows = [{"image_id": "a", "patient_id": "p", "view": "CC", "split": "train", "label": "benign",
             "image": "images/a.png", "lesion_mask": "", "report": "LESION_TYPE MASS"}]
    write_manifest(tmp_path, rows)
    assert read_manifest(tmp_path)[0]["label"] == "benign"
    (tmp_path / "manifest.csv").write_text("image_id,label\na,benign\n")
    with pytest.raises(InputError, match="missing columns patient_id"):
        read_manifest(tmp_path)


def test_staged_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_output(out) as stage:
        (stage / "ok.txt").write_text("x")
    assert (out / "ok.txt").exists() and len(list(tmp_path.iterdir())) == 1


def test_cli_help_and_module_entry():
    r = subprocess.run([sys.executable, "-m", "deepminer", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: deepminer" in r.stdout
    assert deepminer.CLASSES == ("normal", "benign", "malignant")


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]
    with atomic_file(target, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_atomic_path_hands_a_dot_file_beside_the_target_and_applies_perms(tmp_path):
    import os
    import stat

    target = tmp_path / "sub" / "out.csv"
    with atomic_path(target, suffix=".partial") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.csv.") and tmp.suffix == ".partial"
        assert tmp.is_file() and not target.exists()
        tmp.write_text("a,b\n")
    assert target.read_text() == "a,b\n" and [p.name for p in target.parent.iterdir()] == ["out.csv"]
    with atomic_file(tmp_path / "secret", "w", perms=0o600) as fh:
        fh.write("x")
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_file(tmp_path / "plain") as fh:
        fh.write(b"x")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask
