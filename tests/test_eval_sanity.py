"""Cascading randomization (deepminer.evaluation.sanity): CAM depends on the model, an edge map does not."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from deepminer.evaluation.sanity import (SANITY_BOUND, cascading_randomization, map_ssim, passes,
                                         randomization_blocks, rank_correlation)
from deepminer.explain.peers import saliency
from deepminer.models import build_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", pretrained=False)


@pytest.fixture(scope="module")
def image():
    """A structured 128x96 image: soft background, two bright blobs, a dark bar."""
    yy, xx = np.mgrid[0:128, 0:96].astype(np.float32)
    img = 0.25 + 0.1 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img += 0.6 * np.exp(-((yy - 40) ** 2 + (xx - 30) ** 2) / 60.0)
    img += 0.4 * np.exp(-((yy - 95) ** 2 + (xx - 70) ** 2) / 150.0)
    img[60:66, 10:80] = 0.05
    return np.clip(img, 0, 1).astype(np.float32)


def cam(model, img, target):
    return saliency(model, img, "cam", target, max_side=None)


def edges(model, img, target):
    """The control: Sobel magnitude of the image pooled to the CAM grid; it ignores the model."""
    mag = np.hypot(ndimage.sobel(img, 0), ndimage.sobel(img, 1))
    grid = (math.ceil(img.shape[0] / 16), math.ceil(img.shape[1] / 16))
    return F.adaptive_avg_pool2d(torch.from_numpy(mag)[None, None], grid)[0, 0].numpy()


def test_blocks_tiny(tiny):
    names = [n for n, _ in randomization_blocks(tiny)]
    assert names == ["head", "features.block4", "features.block3", "features.block2", "features.block1"]
    assert randomization_blocks(tiny)[0][1] is tiny.head


def test_blocks_efficientnet():
    model = build_model("efficientnet_lite0", pretrained=False)
    blocks = randomization_blocks(model)
    names = [n for n, _ in blocks]
    assert names == (["head", "features.net.conv_head+bn2"] + [f"features.net.blocks.{i}" for i in range(6, -1, -1)]
                     + ["features.net.conv_stem+bn1"])
    covered = {id(p) for _, m in blocks for p in m.parameters()}
    assert covered == {id(p) for p in model.parameters()}  # every parameter is in one block


def test_cam_passes_and_edges_fail(tiny, image):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    target = 2
    steps = cascading_randomization(tiny, image, target, cam, seed=0)
    assert [s.block for s in steps] == [n for n, _ in randomization_blocks(tiny)]
    assert steps[0].map.shape == (8, 6)
    assert passes(steps), [round(s.spearman, 3) for s in steps]
    assert steps[1].spearman < SANITY_BOUND
    # the caller's model is untouched
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    control = cascading_randomization(tiny, image, target, edges, seed=0)
    assert not passes(control)
    for s in control:
        assert s.spearman == pytest.approx(1.0)
        assert s.ssim == pytest.approx(1.0)

    # seeded: the same cascade twice gives the same maps
    again = cascading_randomization(tiny, image, target, cam, seed=0, max_steps=2)
    assert len(again) == 2
    np.testing.assert_array_equal(again[1].map, steps[1].map)


def test_named_method_and_metrics(tiny, image):
    steps = cascading_randomization(tiny, image, 1, "cam", max_side=None, max_steps=2)
    direct = cascading_randomization(tiny, image, 1, cam, max_steps=2)
    assert [s.spearman for s in steps] == [s.spearman for s in direct]
    with pytest.raises(ValueError):
        passes(steps[:1])
    a = np.arange(12.0).reshape(3, 4)
    assert rank_correlation(a, np.zeros((3, 4))) == 0.0  # constant map: no ranking, 0
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert map_ssim(a, a) == pytest.approx(1.0)
    assert math.isnan(map_ssim(np.ones((2, 5)), np.ones((2, 5))))


def test_randomize_keeps_scale():
    from deepminer.evaluation.sanity import randomize_

    conv = nn.Conv2d(4, 8, 3)
    w = conv.weight.detach().clone()
    randomize_(conv, torch.Generator().manual_seed(0))
    assert not torch.equal(conv.weight, w)
    assert float(conv.weight.detach().std()) == pytest.approx(float(w.std()), rel=0.2)
