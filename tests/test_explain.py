"""One pass explains: geometry, CAM, influence, probabilities, cache, the HTTP API body."""
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from deepminer.encoding import decode_array
from deepminer.errors import InputError
from deepminer.explain import ExplanationCache, explain_image
from deepminer.explanation import Explanation
from modelfixtures import box_sketch, random_image, tiny_model
from deepminer.models import FCN, GAPHead, build_model

CLASSES = ("normal", "benign", "malignant")
W = np.array([[1.0, -1.0, 0.5], [2.0, 0.0, -3.0], [-0.5, 4.0, 1.0]])  # (C, K) head weights
B = np.array([0.1, -0.2, 0.3])


def block_model(stride: int = 8) -> FCN:
    """Units = fixed functions of the mean grey value of each ``stride x stride`` block (no
    normalisation): unit 0 = mean (a bright-dot detector), unit 1 = 1 - mean, unit 2 = mean / 2."""
    conv = nn.Conv2d(3, 3, stride, stride=stride)
    with torch.no_grad():
        per_px = 1.0 / (3 * stride * stride)
        conv.weight.copy_(torch.tensor([per_px, -per_px, per_px / 2]).view(3, 1, 1, 1).expand(3, 3, stride, stride))
        conv.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    head = GAPHead(3, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor(W, dtype=torch.float32)[:, :, None, None])
        head.fc.bias.copy_(torch.tensor(B, dtype=torch.float32))
    return FCN(nn.Sequential(conv, nn.ReLU()), head, arch="blocks", classes=CLASSES, layer="0", num_units=3,
               mean=(0, 0, 0), std=(1, 1, 1)).eval()


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_hand_computed_cam_influence_and_class_maps():
    model = block_model()
    img = np.zeros((64, 96), np.float32)
    img[24:32, 40:48] = 1.0  # exactly block (3, 5)
    e = explain_image(model, img, max_side=None, unit_maps="all")
    assert e.input["scale"] == 1.0 and e.map_size == (8, 12)
    dot, bg = np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.0])  # unit values by hand
    assert np.allclose(e.unit_max, [1.0, 1.0, 0.5])
    assert np.allclose(e.influence, W * np.array([1.0, 1.0, 0.5])[None, :])  # max activation x weight
    assert e.top_units["benign"][:3] == [0, 1, 2] and e.top_units["normal"][:3] == [0, 2, 1]
    assert e.top_units["malignant"][:3] == [1, 2, 0]
    assert np.allclose(e.cam[:, 3, 5], W @ dot, atol=1e-5) and np.allclose(e.cam[:, 0, 0], W @ bg, atol=1e-5)
    assert np.allclose(e.class_maps[:, 3, 5], softmax(W @ dot + B), atol=1e-5)
    assert np.allclose(e.class_maps.sum(0), 1.0, atol=1e-6)
    assert np.allclose(e.unit_maps[0][3, 5], 1.0) and e.unit_maps[0].dtype == np.float16


def test_unit_peak_maps_back_to_the_dot_in_original_pixels():
    model = block_model()
    img = np.full((320, 480), 0.1, np.float32)
    img[196:204, 292:300] = 1.0  # an 8x8 dot centred at (200, 296) in ORIGINAL pixels
    e = explain_image(model, img, max_side=240, unit_maps="all")
    assert e.input == {"height": 320, "width": 480, "scale": 0.5, "model_height": 160, "model_width": 240,
                       "map_height": 20, "map_width": 30, "scale_source": "max_side: long side at most 240 px",
                       "model_scale": None}
    i, j = np.unravel_index(np.argmax(e.unit_maps[0].astype(np.float32)), e.map_size)
    y0, x0, y1, x1 = e.cell_box(i, j)
    assert (y0, x0, y1, x1) == (192.0, 288.0, 208.0, 304.0)  # 16 original px per cell at scale 0.5
    assert y0 <= 196 and 204 <= y1 and x0 <= 292 and 300 <= x1  # the whole dot lies in the box
    assert e.cell_of(200, 296) == (i, j) and e.cell_size == (16.0, 16.0)


def test_torchcam_cam_agrees():
    from torchcam.methods import CAM as TorchCAM

    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False).eval()
    img = np.random.default_rng(0).random((96, 80)).astype(np.float32)
    e = explain_image(model, img, max_side=None)
    fc = nn.Linear(model.num_units, len(model.classes))
    with torch.no_grad():
        fc.weight.copy_(model.unit_weights)
        fc.bias.copy_(model.head.fc.bias)
    clf = nn.Sequential(OrderedDict([("features", model.features), ("pool", nn.AdaptiveAvgPool2d(1)),
                                     ("flatten", nn.Flatten()), ("fc", fc)])).eval()
    x = model.normalize(torch.from_numpy(img)[None, None])
    with TorchCAM(clf, target_layer="features", fc_layer="fc") as extractor:
        with torch.no_grad():
            scores = clf(x)
        assert torch.allclose(torch.softmax(scores[0], 0), torch.tensor(list(e.probabilities.values())), atol=1e-5)
        for c in range(len(model.classes)):
            ref = extractor(c, scores)[0][0].numpy()
            assert np.abs(ref - e.cam_normalized(c)).max() < 1e-4


def test_whole_image_probability_rule():
    torch.manual_seed(1)
    model = build_model("tiny", pretrained=False).eval()  # stride 16
    img = np.random.default_rng(2).random((256, 192)).astype(np.float32)
    # at most one patch: exactly the classifier's output
    small = explain_image(model, img[:64, :64], max_side=None, patch_px=64)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(img[:64, :64].copy())[None, None])[0], 0).numpy()
    assert np.allclose(list(small.probabilities.values()), ref, atol=1e-6) and small.window == (0, 0, 4, 4)
    # a whole image: the most abnormal 4x4-cell window (64 px patches), computed here by hand
    e = explain_image(model, img, max_side=None, patch_px=64)
    with torch.no_grad():
        logits = model.class_logits(model.forward_features(torch.from_numpy(img)[None, None]))[0].numpy()
    best = None
    for i in range(16 - 3):
        for j in range(12 - 3):
            p = softmax(logits[:, i:i + 4, j:j + 4].mean(axis=(1, 2)))
            if best is None or p[0] < best[0][0]:
                best = (p, (i, j, i + 4, j + 4))
    assert np.allclose(list(e.probabilities.values()), best[0], atol=1e-5) and e.window == best[1]
    assert e.prediction == CLASSES[int(np.argmax(best[0]))] and "window" in e.probability_rule


def test_wildcat_head_uses_its_pooling_and_class_maps():
    torch.manual_seed(3)
    model = build_model("tiny", head="wildcat", pretrained=False).eval()
    img = np.random.default_rng(3).random((128, 96)).astype(np.float32)
    e = explain_image(model, img, max_side=None)
    x = torch.from_numpy(img)[None, None]
    with torch.no_grad():
        feats = model.forward_features(x)
        ref_p = torch.softmax(model(x)[0], 0).numpy()
        ref_cam = model.class_logits(feats)[0].numpy()
        ref_infl = model.unit_weights.numpy() * feats[0].amax((1, 2)).numpy()[None]
    assert np.allclose(list(e.probabilities.values()), ref_p, atol=1e-6)
    assert np.allclose(e.cam, ref_cam, atol=1e-5) and np.allclose(e.influence, ref_infl, atol=1e-6)


def test_model_state_is_kept_and_train_mode_is_not_used():
    torch.manual_seed(4)
    model = build_model("tiny", pretrained=False)
    img = np.random.default_rng(4).random((64, 64)).astype(np.float32)
    model.eval()
    ref = explain_image(model, img, max_side=None)
    model.train()
    e = explain_image(model, img, max_side=None)
    assert model.training  # restored
    assert np.allclose(e.cam, ref.cam) and e.probabilities == ref.probabilities


def test_cache_skips_the_forward_pass():
    model = block_model()
    calls = []
    forward_features = model.forward_features
    model.forward_features = lambda x: calls.append(1) or forward_features(x)
    img = np.zeros((64, 96), np.float32)
    img[24:32, 40:48] = 1.0
    sketch = np.zeros_like(img, bool)
    sketch[24:32, 40:48] = True
    cache = ExplanationCache(max_bytes=1 << 20)
    first = explain_image(model, img, max_side=None, cache=cache)
    again = explain_image(model, img, max_side=None, cache=cache, sketch=sketch, thresholds=[0.5, 0.5, 0.2])
    assert len(calls) == 1 and again.cache_hit and not first.cache_hit and cache.hits == 1
    assert np.array_equal(first.cam, again.cam) and again.sketch_iou is not None and first.sketch_iou is None
    assert again.sketch_iou[0] > 0.4 and again.sketch_iou[1] < 0.1  # the dot unit matches the dot
    explain_image(model, img, max_side=48, cache=cache)  # another max_side: another key
    explain_image(model, img.copy(), max_side=None, cache=cache)  # same content, new array: a hit
    assert len(calls) == 2
    # bounded by bytes: room for one entry only -> the older one is evicted
    one = ExplanationCache()
    explain_image(model, img, max_side=None, cache=one)
    small = ExplanationCache(max_bytes=one.nbytes * 3 // 2)
    explain_image(model, img, max_side=None, cache=small)
    explain_image(model, 1 - img, max_side=None, cache=small)
    explain_image(model, img, max_side=None, cache=small)
    assert len(calls) == 6 and len(small) == 1 and small.nbytes <= small.max_bytes
    # a caller-made content key (the server's hash of the request file) replaces the pixel hash
    keyed = ExplanationCache()
    explain_image(model, img, max_side=None, cache=keyed, cache_key="file-a")
    assert explain_image(model, img, max_side=None, cache=keyed, cache_key="file-a").cache_hit
    assert not explain_image(model, img, max_side=None, cache=keyed, cache_key="file-b").cache_hit
    assert not explain_image(model, img, max_side=None, cache=keyed).cache_hit  # pixel key differs
    assert not explain_image(model, img, max_side=48, cache=keyed, cache_key="file-a").cache_hit
    assert len(calls) == 10


def test_to_json_matches_the_explanation_and_from_json_inverts_it():
    model, img = tiny_model(5), random_image((200, 150), 5)
    sketch = box_sketch(img.shape, slice(50, 120), slice(40, 100))
    e = explain_image(model, img, max_side=128, sketch=sketch, unit_maps="top", top_units=3)
    body = json.loads(json.dumps(e.to_json()))
    assert set(body) >= {"model", "input", "probabilities", "prediction", "class_maps", "cam", "units",
                         "sketch_iou", "timing_ms", "window", "probability_rule"}
    assert body["model"] == {"arch": "tiny", "layer": "block4", "head": "gap", "units": 32, "classes": list(CLASSES),
                             "trained_on": "not recorded in the checkpoint"}
    assert body["input"]["height"] == 200 and body["input"]["model_height"] == 128
    assert body["prediction"] == e.prediction and body["probabilities"] == e.probabilities
    for name in ("class_maps", "cam"):
        arr = decode_array(body[name])
        assert arr.dtype == np.float16 and np.allclose(arr, getattr(e, name), atol=2e-3, rtol=2e-3)
    units = body["units"]
    assert np.allclose(decode_array(units["max_activation"]), e.unit_max, atol=1e-3, rtol=1e-3)
    for i, c in enumerate(CLASSES):
        assert np.allclose(decode_array(units["influence"][c]), e.influence[i], atol=1e-3, rtol=1e-3)
        assert units["top"][c] == e.top_units[c] and len(e.top_units[c]) == 3
    wanted = {str(u) for ids in units["top"].values() for u in ids}
    assert set(units["maps"]) == wanted == {str(u) for u in e.unit_maps}  # "top": the top units' maps only
    full = explain_image(model, img, max_side=128, unit_maps="all")
    for u in wanted:
        assert np.array_equal(decode_array(units["maps"][u]), full.unit_maps[int(u)])
    assert np.allclose(decode_array(body["sketch_iou"]), e.sketch_iou, atol=1e-3)
    assert len(full.to_json()["units"]["maps"]) == 32
    assert explain_image(model, img, max_side=128, unit_maps="none").to_json()["units"]["maps"] == {}
    assert "sketch_iou" not in full.to_json()
    with pytest.raises(InputError, match="unit_maps"):
        explain_image(model, img, max_side=128, unit_maps="some")
    # the inverse: every field back, arrays within float16, the same geometry and rankings
    back = Explanation.from_json(body)
    assert back.classes == e.classes and back.prediction == e.prediction and back.top_units == e.top_units
    assert back.probabilities == e.probabilities and back.window == e.window and back.input == e.input
    assert back.probability_rule == e.probability_rule and back.thresholds_source == e.thresholds_source
    for name in ("class_maps", "cam", "unit_max", "influence", "sketch_iou"):
        assert back.__dict__[name].shape == e.__dict__[name].shape
        assert np.allclose(back.__dict__[name], e.__dict__[name], atol=2e-3, rtol=2e-3), name
    assert sorted(back.unit_maps) == sorted(e.unit_maps)
    assert all(np.allclose(back.unit_maps[u], e.unit_maps[u], atol=2e-3, rtol=2e-3) for u in e.unit_maps)
    assert back.cell_box(1, 2) == e.cell_box(1, 2) and back.ranked_units("malignant", 3) == e.ranked_units("malignant", 3)
    assert json.loads(json.dumps(back.to_json())) == body  # float16 survives a round trip exactly


def test_from_json_names_a_malformed_body():
    with pytest.raises(InputError, match="malformed explanation body"):
        Explanation.from_json({"prediction": "normal"})


def test_bad_input_is_one_line_error():
    model = block_model()
    with pytest.raises(InputError, match="image: expected a 2-D"):
        explain_image(model, np.zeros((2, 32, 32), np.float32))
    with pytest.raises(InputError, match=r"values must lie in \[0, 1\]"):
        explain_image(model, np.full((32, 32), 2.0, np.float32))
    with pytest.raises(InputError, match="NaN"):
        explain_image(model, np.full((32, 32), np.nan, np.float32))
    with pytest.raises(InputError, match="sketch: shape 16x16 does not match the image 32x32"):
        explain_image(model, np.zeros((32, 32), np.float32), sketch=np.zeros((16, 16), bool))
    with pytest.raises(InputError, match="at least 16 px"):
        explain_image(model, np.zeros((8, 400), np.float32), max_side=200)
    with pytest.raises(InputError, match="thresholds: 2 values for 3 units"):
        explain_image(model, np.zeros((32, 32), np.float32), sketch=np.ones((32, 32), bool), thresholds=[1, 2])


def test_class_index_takes_names_or_indices_and_names_the_problem():
    from deepminer.errors import InputError
    from deepminer.explanation import class_index

    classes = ("normal", "benign", "malignant")
    assert class_index(classes, "malignant") == 2 and class_index(classes, np.int64(1)) == 1
    with pytest.raises(InputError, match="target_class 'cancer' not in normal/benign/malignant"):
        class_index(classes, "cancer", what="target_class")
    with pytest.raises(InputError, match="class index 3 out of range 0..2"):
        class_index(classes, 3)
