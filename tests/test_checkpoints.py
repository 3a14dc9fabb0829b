"""Checkpoints: our format round trip, the DeepMiner release format, one-line errors."""
from __future__ import annotations

import argparse
import collections

import pytest
import torch
from torch import nn

from deepminer import CLASSES  # before torchvision: makes it importable on the CPU torch
from deepminer.errors import InputError
from deepminer.models import (FORMAT, build_model, guess_arch, import_deepminer, load_any, load_model,
                              save_model)

import torchvision  # noqa: E402  (after deepminer, see above)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _save_deepminer_release(net: nn.Module, path, *, epoch: int = 7, momentum: bool = True) -> None:
    """Exactly what ddsm-visual-primitives' training script writes."""
    model = nn.DataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    if momentum:  # one step with zero gradients so the optimizer state holds momentum buffers
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save({"epoch": epoch, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)


@pytest.fixture(scope="module")
def resnet152_release(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet152(weights=None, num_classes=3).eval()
    path = tmp_path_factory.mktemp("release") / "checkpoint.pth.tar"
    _save_deepminer_release(net, path)
    return net, path


@pytest.mark.slow  # one ResNet-152 built, saved with its optimizer state (~470 MB) and imported
def test_import_deepminer_resnet152(resnet152_release):
    net, path = resnet152_release
    raw = torch.load(path, map_location="cpu", weights_only=True)  # the release format, as written
    assert set(raw) == {"epoch", "state_dict", "optimizer"}
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert raw["state_dict"]["module.fc.weight"].shape == (3, 2048)
    assert len(raw["optimizer"]["state"]) == sum(1 for _ in net.parameters())  # momentum buffers
    del raw
    model = import_deepminer(path)
    assert model.arch == "resnet152" and model.layer == "layer4" and model.num_units == 2048
    assert model.classes == CLASSES and model.head_type == "gap" and not model.training
    assert model.meta["epoch"] == 7 and model.meta["source"] == "deepminer"
    torch.testing.assert_close(model.unit_weights, net.fc.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.head.fc.bias, net.fc.bias, atol=0, rtol=0)
    torch.testing.assert_close(model.features.layer3[35].conv2.weight, net.layer3[35].conv2.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.features.layer4[2].bn3.running_var, net.layer4[2].bn3.running_var,
                               atol=0, rtol=0)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        want = net((x.expand(-1, 3, -1, -1) - IMAGENET_MEAN) / IMAGENET_STD)
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # random ResNet-152 logits are ~1e6


def test_resnet50_loaded_as_resnet152_names_the_arch(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r50.pth.tar"
    _save_deepminer_release(torchvision.models.resnet50(weights=None, num_classes=3), path, momentum=False)
    with pytest.raises(InputError) as err:
        import_deepminer(path, arch="resnet152")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "does not fit resnet152" in msg and "looks like resnet50 (fc 2048->3)" in msg
    # resnet152 has blocks layer2.4-7 and layer3.6-35 more: 34 bottlenecks x (3 convs + 3 BNs x 5) = 612 keys
    assert "missing keys 612 (layer2.4.conv1.weight, layer2.4.bn1.weight, layer2.4.bn1.bias, ...)" in msg
    assert "unexpected keys 0" in msg
    model = load_any(path)  # no 'format' field: the release format, arch as guessed
    assert model.arch == "resnet50" and model.num_units == 2048 and model.meta["epoch"] == 7
    with pytest.raises(InputError, match="fc has 3 outputs but 2 classes"):
        import_deepminer(path, classes=("benign", "malignant"), arch="resnet50")
    with pytest.raises(InputError, match="not a deepminer-fcn/1 checkpoint.*import_deepminer"):
        load_model(path)


def test_guess_arch_descriptions():
    tiny = build_model("tiny")
    assert guess_arch(tiny.state_dict()) == ("tiny", "tiny FCN (gap head 32->3)")
    eff = build_model("efficientnet_lite0", pretrained=False, head="wildcat", wildcat_maps=4)
    assert guess_arch(eff.state_dict()) == ("efficientnet_lite0", "efficientnet_lite0 FCN (wildcat head 1280->12)")
    r18 = torchvision.models.resnet18(weights=None, num_classes=5)
    assert guess_arch(r18.state_dict()) == ("resnet18", "resnet18 (fc 512->5)")
    assert guess_arch({"w": torch.zeros(1)})[0] is None


def test_roundtrip_gap_and_half(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.features.block2[1].running_mean.uniform_(-0.2, 0.2)
    path = save_model(model, tmp_path / "m.pt", note="unit test", settings={"lr": 1e-4, "epochs": [1, 2]})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["arch"] == "tiny" and raw["head"] == "gap"
    assert raw["classes"] == list(CLASSES) and raw["layer"] == "block4" and raw["num_units"] == 32
    assert raw["head_kwargs"] == {} and raw["meta"]["settings"]["epochs"] == [1, 2]
    loaded = load_model(path)
    assert loaded.meta == {"note": "unit test", "settings": {"lr": 1e-4, "epochs": [1, 2]}}
    x = torch.rand(2, 1, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    half = save_model(model, tmp_path / "h.pt", half=True)
    raw = torch.load(half, map_location="cpu", weights_only=True)
    assert raw["state_dict"]["head.fc.weight"].dtype == torch.float16
    assert raw["state_dict"]["features.block1.1.num_batches_tracked"].dtype == torch.int64
    assert half.stat().st_size < 0.75 * path.stat().st_size
    loaded = load_model(half)
    assert loaded.head.fc.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=2e-2, rtol=1e-2)
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_roundtrip_wildcat_efficientnet(tmp_path):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", head="wildcat", pretrained=False, num_classes=2,
                        classes=("neg", "pos"), wildcat_maps=3, wildcat_k=0.2, wildcat_alpha=0.5).eval()
    loaded = load_any(save_model(model, tmp_path / "w.pt"))
    assert (loaded.head_type, loaded.classes, loaded.layer) == ("wildcat", ("neg", "pos"), "bn2")
    assert loaded.head.head_kwargs == {"maps": 3, "k": 0.2, "alpha": 0.5, "surround": 0.0}
    x = torch.rand(1, 1, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match=r"nope\.pt: no such file"):
        load_model(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(InputError, match="junk.pt: not a PyTorch checkpoint"):
        load_any(junk)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(InputError, match="pickled.pt: not loadable with weights_only=True") as err:
        load_any(pickled)
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="meta.when: date is not a plain value"):
        import datetime
        save_model(build_model("tiny"), tmp_path / "bad.pt", when=datetime.date.today())
    assert not (tmp_path / "bad.pt").exists()
    # a checkpoint whose header says resnet18 but whose weights are tiny's
    tiny = save_model(build_model("tiny"), tmp_path / "tiny.pt")
    raw = torch.load(tiny, weights_only=True)
    raw["arch"] = "resnet18"
    torch.save(raw, tmp_path / "liar.pt")
    with pytest.raises(InputError, match=r"does not fit resnet18 .*looks like tiny FCN \(gap head 32->3\)") as err:
        load_model(tmp_path / "liar.pt")
    assert "\n" not in str(err.value) and "missing keys" in str(err.value)
    raw["format"] = "someone-else/9"
    torch.save(raw, tmp_path / "other.pt")
    with pytest.raises(InputError, match="unknown checkpoint format 'someone-else/9'"):
        load_any(tmp_path / "other.pt")
    torch.save(collections.OrderedDict(a=[1, 2]), tmp_path / "list.pt")
    with pytest.raises(InputError, match="not a DeepMiner checkpoint"):
        load_any(tmp_path / "list.pt")
