"""Backbones, FCN conversion, the WILDCAT head, the shipped EfficientNet-Lite0 ImageNet weights."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepminer import CLASSES
from deepminer.errors import DeepMinerError
from deepminer.models import (ARCHS, FCN, GAPHead, WildcatHead, build_model, efficientnet_lite0_imagenet_state,
                              efficientnet_lite0_weights_path, imagenet_classifier, param_count, resolve_k,
                              size_mb, tiny_cnn, to_fcn, wildcat_pool)


@pytest.fixture(scope="module")
def lite0_imagenet() -> nn.Module:
    return imagenet_classifier("efficientnet_lite0")


def _center_crop(rgb: np.ndarray, side: int = 224, resize: int = 256) -> torch.Tensor:
    """timm's eval transform for tf_efficientnet_lite0: bicubic resize of the short side, centre crop."""
    im = Image.fromarray(rgb)
    w, h = im.size
    s = resize / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = im.size
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None]


# -- registry -------------------------------------------------------------------------------------

def test_registry_names_and_tiny_model():
    assert {"tiny", "resnet18", "resnet50", "resnet152", "efficientnet_lite0"} <= set(ARCHS)
    model = build_model("tiny")
    assert isinstance(model, FCN) and model.arch == "tiny" and model.head_type == "gap"
    assert model.classes == CLASSES and model.layer == "block4" and model.num_units == 32
    assert 5_000 < param_count(model) < 100_000
    assert size_mb(model) == pytest.approx(sum(v.numel() * v.element_size()
                                               for v in model.state_dict().values()) / 1e6)
    model.eval()
    x = torch.rand(2, 1, 96, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 32, 6, 4)
    maps = model.class_logits(feats)
    # class maps = the 1x1 conv written out by hand: sum_k w[c,k] f_k + b_c
    by_hand = torch.einsum("ck,bkhw->bchw", model.unit_weights, feats) + model.head.fc.bias[None, :, None, None]
    torch.testing.assert_close(maps, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), maps.mean(dim=(2, 3)), atol=1e-6, rtol=0)


def test_build_model_errors_and_classes():
    with pytest.raises(DeepMinerError, match="unknown arch 'vgg16'.*efficientnet_lite0"):
        build_model("vgg16")
    with pytest.raises(DeepMinerError, match="unknown head"):
        build_model("tiny", head="attention")
    with pytest.raises(DeepMinerError, match="2 names but num_classes is 3"):
        build_model("tiny", classes=("a", "b"))
    assert build_model("tiny", num_classes=2).classes == ("class0", "class1")
    assert build_model("tiny", num_classes=2, classes=("neg", "pos")).classes == ("neg", "pos")


def test_resnet_pretrained_warns_random_init():
    with pytest.warns(UserWarning, match="no ImageNet weights ship"):
        model = build_model("resnet18", pretrained=True)
    assert model.layer == "layer4" and model.num_units == 512
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model("tiny", pretrained=True)  # tiny never has weights: silent


# -- FCN conversion -------------------------------------------------------------------------------

def test_to_fcn_resnet18_matches_classifier_and_gives_maps():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fcn = to_fcn(net, arch="resnet18", classes=CLASSES).eval()
    assert fcn.layer == "layer4" and fcn.num_units == 512 and isinstance(fcn.head, GAPHead)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # original untouched
    assert hasattr(net, "fc") and isinstance(net.fc, nn.Linear)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net((x - mean) / std)
        got = fcn(x)
    assert want.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    grey = torch.rand(1, 1, 512, 320)
    with torch.no_grad():
        feats = fcn.forward_features(grey)
        maps = fcn.class_logits(feats)
        whole = net((grey.expand(-1, 3, -1, -1) - mean) / std)
    assert feats.shape == (1, 512, 16, 10) and maps.shape == (1, 3, 16, 10)
    torch.testing.assert_close(fcn.pool(maps), whole, atol=1e-5, rtol=0)
    assert maps.std() > 0


def test_to_fcn_efficientnet_lite0_matches_classifier(lite0_imagenet):
    fcn = to_fcn(lite0_imagenet, arch="efficientnet_lite0", classes=[str(i) for i in range(1000)]).eval()
    assert fcn.layer == "bn2" and fcn.num_units == 1280
    assert tuple(fcn.mean.flatten().tolist()) == (0.5, 0.5, 0.5) == tuple(lite0_imagenet.pretrained_cfg["mean"])
    assert lite0_imagenet.get_classifier().out_features == 1000  # original untouched
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = lite0_imagenet((x - 0.5) / 0.5)
        got = fcn(x)
        maps = fcn.class_logits(fcn.forward_features(torch.rand(1, 1, 512, 320)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert maps.shape == (1, 1000, 16, 10)


def test_to_fcn_sequential_and_refusals():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 2)).eval()
    fcn = to_fcn(net, arch="toy", classes=("a", "b")).eval()
    assert fcn.layer == "2" and fcn.num_units == 6
    x = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x), net((x - fcn.mean) / fcn.std), atol=1e-6, rtol=0)
    tiny = to_fcn(tiny_cnn(3), arch="tiny", classes=CLASSES, layer="block3")
    assert tiny.layer == "block3"
    max_pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="not a classifier with a global-average-pool"):
        to_fcn(max_pooled, arch="toy", classes=("a", "b"))
    with pytest.raises(ValueError, match="2 outputs but 3 classes"):
        to_fcn(net, arch="toy", classes=CLASSES)
    with pytest.raises(ValueError, match="layer 'nope'"):
        to_fcn(net, arch="toy", classes=("a", "b"), layer="nope")


# -- the shipped EfficientNet-Lite0 ImageNet weights ----------------------------------------------

def test_efficientnet_lite0_imagenet_classifies_real_photos(lite0_imagenet):
    import skimage.data

    checks = {"chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
              "coffee": {967, 968, 504}}  # espresso, cup, coffee mug
    for name, ok in checks.items():
        x = _center_crop(getattr(skimage.data, name)())
        with torch.no_grad():
            top5 = lite0_imagenet((x - 0.5) / 0.5).topk(5).indices[0].tolist()
        assert ok & set(top5), f"{name}: top-5 {top5}"
        assert top5[0] in ok, f"{name}: top-1 {top5[0]}"


def test_build_model_efficientnet_lite0_loads_shipped_weights():
    src = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = build_model("efficientnet_lite0", pretrained=True)
    net = model.features.net
    torch.testing.assert_close(net.conv_stem.weight, src["_conv_stem.weight"], atol=0, rtol=0)
    torch.testing.assert_close(net.bn2.running_var, src["_bn1.running_var"], atol=0, rtol=0)
    torch.testing.assert_close(net.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"],
                               atol=0, rtol=0)
    assert model.head.fc.weight.shape == (3, 1280, 1, 1)
    fresh = build_model("efficientnet_lite0", pretrained=False)
    assert not torch.equal(fresh.features.net.conv_stem.weight, net.conv_stem.weight)
    assert sum(1 for k in src if not k.endswith("num_batches_tracked")) == 247


def test_efficientnet_weight_mapping_fails_clearly():
    import timm

    other = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(DeepMinerError, match=r"247 tensors, but tf_efficientnet_lite0 has \d+"):
        efficientnet_lite0_imagenet_state(other)
    wider = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    with pytest.raises(DeepMinerError, match=r"tensor 245 _fc.weight \(1000, 1280\) does not map"):
        efficientnet_lite0_imagenet_state(wider)


# -- WILDCAT --------------------------------------------------------------------------------------

def test_wildcat_pool_hand_worked():
    maps = torch.tensor([[[[1.0, 5.0, 3.0], [-2.0, 0.0, 4.0]]]])  # (1, 1, 2, 3): 6 positions
    # k=2: top {5, 4} -> 4.5; bottom {-2, 0} -> -1; 4.5 + 0.7 * -1 = 3.8
    assert wildcat_pool(maps, 2, 0.7).item() == pytest.approx(3.8)
    # k=0.5 of 6 positions = 3: top {5, 4, 3} -> 4; bottom {-2, 0, 1} -> -1/3
    assert wildcat_pool(maps, 0.5, 0.7).item() == pytest.approx(4 - 0.7 / 3)
    # k=10 clamps to 6: both ends are the mean 11/6
    assert wildcat_pool(maps, 10, 0.7).item() == pytest.approx(11 / 6 * 1.7)
    assert wildcat_pool(maps, 1, 0.0).item() == pytest.approx(5.0)
    assert resolve_k(0.01, 6) == 1 and resolve_k(3, 6) == 3 and resolve_k(3.0, 2) == 2
    for bad in (0, -1, 1.5, float("nan"), True):
        with pytest.raises(ValueError):
            resolve_k(bad, 6)


def test_wildcat_head_maps_and_unit_weights():
    head = WildcatHead(2, 2, maps=3, k=1, alpha=0.5)
    with torch.no_grad():
        # channel c*M + m = class c, map m; unit weights of the 6 maps on the 2 units
        head.conv.weight.copy_(torch.tensor([[1, 0], [2, 0], [3, 0], [0, 1], [0, -1], [0, 3]],
                                            dtype=torch.float32)[:, :, None, None])
        head.conv.bias.copy_(torch.tensor([0, 0, 3, 1, 1, 1], dtype=torch.float32))
    feats = torch.tensor([[[[1.0, 2.0]], [[10.0, 0.0]]]])  # (1, K=2, 1, 2)
    maps = head.maps(feats)
    # class 0: mean(1 f0, 2 f0, 3 f0 + 3) = 2 f0 + 1 -> [3, 5]; class 1: mean(f1+1, -f1+1, 3 f1+1) = f1 + 1
    torch.testing.assert_close(maps, torch.tensor([[[[3.0, 5.0]], [[11.0, 1.0]]]]))
    torch.testing.assert_close(head.unit_weights, torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(head.pool(maps), torch.tensor([[5 + 0.5 * 3, 11 + 0.5 * 1.0]]))
    assert head.head_kwargs == {"maps": 3, "k": 1, "alpha": 0.5, "surround": 0.0}
    model = build_model("tiny", head="wildcat", wildcat_maps=2, wildcat_k=0.25, wildcat_alpha=0.6)
    assert model.head_type == "wildcat" and model.head.conv.out_channels == 6
    assert model.unit_weights.shape == (3, 32)


def _ring_mean_by_hand(m: np.ndarray) -> np.ndarray:
    """The mean of the cells at Chebyshev distance exactly 2 that lie on the map, cell by cell (loops)."""
    h, w = m.shape
    out = np.zeros_like(m)
    for i in range(h):
        for j in range(w):
            ring = [m[a, b] for a in range(h) for b in range(w) if max(abs(a - i), abs(b - j)) == 2]
            out[i, j] = np.mean(ring) if ring else 0.0
    return out


def test_wildcat_surround_ring_mean_hand_worked():
    from deepminer.models.wildcat import ring_mean

    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 2, 2] = 1.0
    r = ring_mean(m)[0, 0]
    assert r[2, 2] == 0.0  # its ring (16 cells) holds no 1
    assert r[0, 0] == pytest.approx(1 / 5)  # on the map, (0, 0)'s ring is (0, 2), (1, 2), (2, 2), (2, 1), (2, 0)
    assert r[0, 2] == pytest.approx(1 / 9)  # (0, 2)'s ring on the map: row 2 (5 cells) and (0|1, 0|4), (2, 2) among them
    assert r[1, 1] == 0.0 and r[2, 3] == 0.0  # the 1 is within distance 1: inside the box left out
    gen = torch.Generator().manual_seed(3)
    for shape in ((7, 4), (3, 3), (1, 6), (9, 9)):
        x = torch.randn(2, 3, *shape, generator=gen)
        got = ring_mean(x)
        for b in range(2):
            for c in range(3):
                np.testing.assert_allclose(got[b, c].numpy(), _ring_mean_by_hand(x[b, c].numpy()), atol=1e-6)


def test_wildcat_surround_class_maps_are_local_contrasts_and_survive_a_checkpoint(tmp_path):
    from deepminer.models import load_model, save_model
    from deepminer.models.wildcat import ring_mean

    head = WildcatHead(4, 3, maps=2, k=0.2, alpha=0.0, surround=1.5)
    plain = WildcatHead(4, 3, maps=2, k=0.2, alpha=0.0)
    plain.load_state_dict(head.state_dict())
    feats = torch.rand(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    m = plain.maps(feats)
    torch.testing.assert_close(head.maps(feats), m - 1.5 * ring_mean(m))
    # a constant map is pulled to (1 - beta) x itself: the surround of every cell holds the same value
    torch.testing.assert_close(head.contrast(torch.full((1, 1, 6, 6), 2.0)), torch.full((1, 1, 6, 6), -1.0))
    assert head.head_kwargs["surround"] == 1.5 and "surround=1.5" in repr(head)
    with pytest.raises(ValueError, match="surround"):
        WildcatHead(4, 3, surround=-1.0)
    model = build_model("tiny", head="wildcat", pretrained=False, wildcat_surround=2.0).eval()
    save_model(model, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert back.head.surround == 2.0
    x = torch.rand(1, 1, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    # a checkpoint from before the surround (no "surround" in head_kwargs) loads as plain WILDCAT
    obj = torch.load(tmp_path / "m.pt", weights_only=False)
    del obj["head_kwargs"]["surround"]
    torch.save(obj, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").head.surround == 0.0


def _square_batch(n: int, gen: torch.Generator, side: int = 64, sq: int = 14):
    """Noise images; label 1 = a bright square somewhere. Returns images, labels, square centres."""
    x = 0.3 + 0.1 * torch.rand(n, 1, side, side, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    centres = torch.randint(sq // 2, side - sq // 2, (n, 2), generator=gen)
    for i in range(n):
        if y[i]:
            r, c = centres[i].tolist()
            x[i, 0, r - sq // 2:r + sq // 2, c - sq // 2:c + sq // 2] = 1.0
    return x, y, centres


def test_wildcat_trains_end_to_end_and_map_peaks_at_the_square():
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    model = build_model("tiny", head="wildcat", num_classes=2, classes=("empty", "square"),
                        wildcat_maps=2, wildcat_k=2, wildcat_alpha=0.7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(25):
        x, y, _ = _square_batch(24, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5 and np.mean(losses[-3:]) < 0.2 * losses[0], losses
    model.eval()
    sq = 14
    x, y, centres = _square_batch(64, gen, sq=sq)
    with torch.no_grad():
        logits = model(x)
        maps = model.class_logits(model.forward_features(x))[:, 1]  # (B, 4, 4), one cell = 16 px
    assert (logits.argmax(1) == y).float().mean() > 0.9
    pos = y.nonzero().flatten()
    w = maps.shape[-1]
    cell = 64 // w
    peak = maps[pos].flatten(1).argmax(1)
    top, left = (peak // w) * cell, (peak % w) * cell
    r, c = centres[pos, 0], centres[pos, 1]
    # the peak cell overlaps the square (by chance: about 1 in 5)
    overlaps = (top < r + sq // 2) & (top + cell > r - sq // 2) & (left < c + sq // 2) & (left + cell > c - sq // 2)
    assert overlaps.float().mean() > 0.85, overlaps.float().mean()
