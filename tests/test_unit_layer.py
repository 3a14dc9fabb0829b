"""The unit layer's activation and output stride (``deepminer.models.unit_layer``): the atrous
conversion equals the libraries' own (timm ``output_stride=16``, torchvision
``replace_stride_with_dilation``), ``relu`` lifts exactly the ReLU6 cap, a checkpoint is served the
way it was saved, and ``train-whole --serve-output-stride`` fits its temperature at the served stride."""
from __future__ import annotations

import json

import pytest
import torch

from deepminer.errors import InputError
from deepminer.models import build_model, load_model, save_model
from deepminer.models.unit_layer import apply_unit_layer, describe, native, unit_layer


def _x(h=224, w=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, h, w, generator=g)


def test_efficientnet_output_stride_16_equals_timms_own_and_goes_back():
    import timm

    model = build_model("efficientnet_lite0", pretrained=True).eval()
    x = _x()
    with torch.no_grad():
        f32 = model.forward_features(x)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3, output_stride=16)
    missing, _ = ref.load_state_dict(model.features.net.state_dict(), strict=False)
    assert not [k for k in missing if not k.startswith("classifier")]
    ref.eval()
    apply_unit_layer(model, output_stride=16)
    with torch.no_grad():
        f16, r16 = model.forward_features(x), ref.forward_features(model.normalize(x))
    assert f32.shape[-2:] == (7, 5) and f16.shape[-2:] == (14, 10)
    assert torch.equal(f16, r16)
    assert model.meta["unit_layer"] == {"output_stride": 16}
    apply_unit_layer(model, output_stride=32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), f32)
    assert "unit_layer" not in model.meta  # native again: nothing recorded


def test_resnet_output_stride_16_equals_torchvisions_dilation():
    import torchvision

    torch.manual_seed(0)
    model = build_model("resnet50", pretrained=False).eval()
    ref = torchvision.models.resnet50(weights=None, num_classes=3, replace_stride_with_dilation=[False, False, True])
    state = ref.state_dict()
    state.update({k: v for k, v in model.features.state_dict().items() if k in state})
    ref.load_state_dict(state)
    ref.eval()
    apply_unit_layer(model, output_stride=16)
    x = _x(128, 96)
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = torch.nn.Sequential(*list(ref.children())[:-2])(model.normalize(x))
    assert ours.shape == theirs.shape == (1, 2048, 8, 6)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_relu_lifts_exactly_the_relu6_cap():
    model = build_model("efficientnet_lite0", pretrained=True).eval()
    x = _x(256, 192, seed=3)
    with torch.no_grad():
        capped = model.forward_features(x)
        apply_unit_layer(model, activation="relu")
        free = model.forward_features(x)
    assert float(capped.max()) == 6.0 and float(free.max()) > 6.0  # some unit is clipped on this input
    assert torch.equal(free.clamp(max=6.0), capped)
    assert describe(model) == "bn2 + relu, output stride 32"


def test_a_checkpoint_is_served_the_way_it_was_saved(tmp_path):
    model = build_model("efficientnet_lite0", pretrained=True).eval()
    apply_unit_layer(model, activation="relu", output_stride=16)
    save_model(model, tmp_path / "m.pt", **model.meta)
    back = load_model(tmp_path / "m.pt")
    assert unit_layer(back) == {"activation": "relu", "output_stride": 16}
    x = _x()
    with torch.no_grad():
        assert torch.equal(back.forward_features(x), model.forward_features(x))
    plain = build_model("efficientnet_lite0", pretrained=False)
    save_model(plain, tmp_path / "p.pt")
    assert unit_layer(load_model(tmp_path / "p.pt")) == native("efficientnet_lite0") == {
        "activation": "relu6", "output_stride": 32}


@pytest.mark.parametrize("arch, kwargs, says", [
    ("tiny", {"activation": "relu6"}, "plain ReLU"),
    ("efficientnet_lite0", {"output_stride": 8}, r"takes 32 \(as built\) or 16, not 8"),
    ("efficientnet_lite0", {"activation": "gelu"}, "not one of relu6, relu"),
])
def test_options_an_arch_cannot_take_are_one_line_errors(arch, kwargs, says):
    model = build_model(arch, pretrained=False)
    with pytest.raises(InputError, match=says) as e:
        apply_unit_layer(model, **kwargs)
    assert "\n" not in str(e.value)


def test_train_whole_serves_at_the_asked_stride_and_fits_its_temperature_there(tmp_path):
    from tests.test_whole_image import H, _dataset
    from deepminer.whole_image import WholeImageConfig, train_whole

    data = tmp_path / "data"
    _dataset(data, {"train": 6, "val": 4}, seed=1)
    torch.manual_seed(0)
    save_model(build_model("tiny", pretrained=False), tmp_path / "patch.pt", patch_size=32)
    cfg = WholeImageConfig(model=str(tmp_path / "patch.pt"), data=str(data), out=str(tmp_path / "run"), long_side=H,
                           train_from="block3", epochs=2, lr=0.1, batch_size=4, patience=None, serve_output_stride=8)
    metrics = train_whole(cfg, progress=False)
    model = load_model(tmp_path / "run" / "best.pt")
    assert unit_layer(model)["output_stride"] == 8 and metrics["unit_layer"]["output_stride"] == 8
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 1, H, 64)).shape[-2:] == (H // 8, 64 // 8)
    val = metrics["val"]
    assert val["at_training_stride"]["output_stride"] == 16
    # the temperature is the one that minimises the NLL of the served (stride 8) logits
    assert val["nll_after"] <= val["nll_before"] + 1e-9
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["config"]["serve_output_stride"] == 8
    from deepminer.model_card import whole_image_section

    card = whole_image_section(saved)
    assert "output stride: trained at 16 (cached trunk), served at 8" in card
    assert "kept model as served (stride 8), T = 1" in card


def test_train_whole_can_train_at_the_finer_stride(tmp_path):
    from tests.test_whole_image import H, _dataset
    from deepminer.whole_image import WholeImageConfig, train_whole

    data = tmp_path / "data"
    _dataset(data, {"train": 4, "val": 3}, seed=2)
    torch.manual_seed(0)
    save_model(build_model("tiny", pretrained=False), tmp_path / "patch.pt", patch_size=32)
    common = dict(model=str(tmp_path / "patch.pt"), data=str(data), long_side=H, train_from="block3", epochs=1,
                  lr=0.1, batch_size=4, patience=None, trunk_cache=str(tmp_path / "cache"))
    train_whole(WholeImageConfig(out=str(tmp_path / "a"), **common), progress=False)
    metrics = train_whole(WholeImageConfig(out=str(tmp_path / "b"), output_stride=8, **common), progress=False)
    assert metrics["unit_layer"]["output_stride"] == 8 and metrics["val"]["at_training_stride"] is None
    from deepminer.model_card import whole_image_section

    assert "- output stride: 8, trained and served" in whole_image_section(metrics)
    # the cache of the stride-16 run is not reused for stride 8: its key names the stride (the cache keeps the breast
    # cells at the unit map's grid, which the stride sets, even when the trunk's own outputs would be the same)
    cached = torch.load(str(tmp_path / "cache") + ".train", weights_only=True)
    assert cached["key"]["unit_layer"] == {"output_stride": 8}
    model = load_model(tmp_path / "b" / "best.pt")
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 1, H, 64)).shape[-2:] == (H // 8, 64 // 8)
