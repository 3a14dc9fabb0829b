"""Peer saliency behind one interface: CAM's shape, finite, peaks at the class evidence, hooks gone."""
import numpy as np
import pytest
import torch
from torch import nn

from deepminer.errors import InputError
from deepminer.explain import METHODS, explain_image, saliency
from deepminer.models import FCN, GAPHead, build_model

SPOT = (10, 4)  # the cell holding the bright spot (8 px cells)


def spot_model() -> FCN:
    """Unit 0 fires on bright 8x8 blocks (mean > 0.5), unit 1 on dark ones; only unit 0 is
    evidence for 'malignant', only unit 1 for 'normal'. ReLU modules, so Guided Backprop applies."""
    conv = nn.Conv2d(3, 2, 8, stride=8)
    with torch.no_grad():
        per_px = 1.0 / (3 * 64)
        conv.weight.copy_(torch.tensor([per_px, -per_px]).view(2, 1, 1, 1).expand(2, 3, 8, 8))
        conv.bias.copy_(torch.tensor([-0.5, 0.5]))
    head = GAPHead(2, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0], [5.0, 0.0]])[:, :, None, None])
        head.fc.bias.zero_()
    return FCN(nn.Sequential(conv, nn.ReLU()), head, arch="spot", classes=("normal", "benign", "malignant"),
               layer="0", num_units=2, mean=(0, 0, 0), std=(1, 1, 1)).eval()


def spot_image() -> np.ndarray:
    img = np.full((128, 128), 0.2, np.float32)
    img[SPOT[0] * 8:SPOT[0] * 8 + 8, SPOT[1] * 8:SPOT[1] * 8 + 8] = 1.0
    return img


def hooks_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or
            getattr(m, "_backward_pre_hooks", None)]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_peaks_at_the_evidence(method):
    model = spot_model()
    out = saliency(model, spot_image(), method, target_class="malignant", max_side=None,
                   **({"steps": 16} if method == "integrated_gradients" else {}))
    assert out.shape == (16, 16) and out.dtype == np.float32 and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0.99
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert max(abs(peak[0] - SPOT[0]), abs(peak[1] - SPOT[1])) <= 1, (method, peak)
    assert out[SPOT] > 0.5 and np.median(out) < 0.2
    assert hooks_left(model) == [] and not model.training


def test_same_shape_as_cam_on_a_resized_image_and_default_target():
    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False).eval()
    img = np.random.default_rng(0).random((300, 200)).astype(np.float32)
    grid = explain_image(model, img, max_side=160).map_size
    for method in METHODS:
        opts = {"steps": 4} if method == "integrated_gradients" else {"samples": 2} if method == "smoothgrad" else {}
        out = saliency(model, img, method, max_side=160, **opts)
        assert out.shape == grid and np.isfinite(out).all(), method
    # CAM through the peer interface is the explanation's normalised CAM of the top class
    e = explain_image(model, img, max_side=160)
    with torch.no_grad():
        top = int(model(torch.nn.functional.interpolate(
            torch.from_numpy(img)[None, None], size=(160, 107), mode="bilinear", antialias=True))[0].argmax())
    assert np.allclose(saliency(model, img, "cam", max_side=160), e.cam_normalized(top), atol=1e-5)
    assert hooks_left(model) == []


def test_hooks_removed_and_mode_restored_on_error():
    model = spot_model().train()

    def broken(maps):
        raise RuntimeError("boom")

    model.pool = broken  # fails after the features (and their hooks) ran
    for method in ("gradcam", "guided_backprop"):
        with pytest.raises(RuntimeError, match="boom"):
            saliency(model, spot_image(), method, target_class=2, max_side=None)
        assert hooks_left(model) == [] and model.training


def test_unknown_method_and_class():
    model = spot_model()
    with pytest.raises(InputError, match="unknown 'lime'"):
        saliency(model, spot_image(), "lime")
    with pytest.raises(InputError, match="target_class"):
        saliency(model, spot_image(), "cam", target_class="cancer")
