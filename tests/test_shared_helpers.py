"""The small ideas written once (docs/architecture.md, "One home per idea"), each against a
hand-worked example or an independent computation."""
from __future__ import annotations

import numpy as np
import torch

from deepminer.explanation import normalize_map


def test_normalize_map_hand_worked():
    a = np.array([[1.0, 3.0], [5.0, 9.0]])
    assert normalize_map(a, 0.0).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    # torchcam's form: divide by the range + eps
    np.testing.assert_allclose(normalize_map(a), np.array([[0, 2], [4, 8]]) / (8 + 1e-8), rtol=1e-7)
    assert normalize_map(a).dtype == np.float32 and normalize_map(a, dtype=np.float64).dtype == np.float64


def test_normalize_map_each_trailing_map_alone_flat_is_zeros_and_tensors_work():
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(3, 4, 5)) * [[[1.0]], [[10.0]], [[0.0]]] + 7.0  # the last map is flat
    got = normalize_map(torch.from_numpy(stack), 0.0, dtype=np.float64)
    for m, g in zip(stack, got):
        want = (m - m.min()) / (m.max() - m.min()) if np.ptp(m) > 0 else np.zeros_like(m)
        np.testing.assert_allclose(g, want, atol=1e-12)
    assert not got[2].any() and got[:2].min() == 0.0 and got[:2].max() == 1.0


def test_png16_writes_sbit_text_and_the_values():
    import io

    from PIL import Image

    from deepminer.data.io import load_image, png16, png_sbit

    values = np.tile(np.array([[0, 1000], [2048, 4095]], dtype=np.uint16), (16, 16))  # the loader's 32 px minimum
    data = png16(values, bits=12, text={"Laterality": "L", "View": "MLO"})
    assert png_sbit(data) == 12
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), values) and im.text == {"Laterality": "L", "View": "MLO"}
    loaded = load_image(data)
    np.testing.assert_allclose(loaded.pixels, values / 4095.0, atol=1e-7)
    assert (loaded.laterality, loaded.view) == ("L", "MLO")


def test_png16_of_pixels_hand_worked():
    import io

    from PIL import Image

    from deepminer.data.io import load_image, png16_of_pixels, png_sbit

    pixels = np.array([[0.0, 0.5], [1.0, 1.5], [-0.25, 1 / 65535]], dtype=np.float32)
    data = png16_of_pixels(pixels)
    with Image.open(io.BytesIO(data)) as im:  # 0.5 * 65535 = 32767.5 rounds to even
        assert np.asarray(im).tolist() == [[0, 32768], [65535, 65535], [0, 1]]
    assert png_sbit(data) == 16
    tiled = np.tile(pixels, (11, 16))
    assert np.abs(load_image(png16_of_pixels(tiled)).pixels - np.clip(tiled, 0, 1)).max() <= 1 / 131070 + 1e-7
