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


def test_fit_image_sizes_dtype_and_never_enlarges():
    from deepminer.geometry import fit_image, fit_size

    a = np.linspace(0, 1, 300 * 200, dtype=np.float64).reshape(300, 200)
    got = fit_image(a, 128)
    assert got.shape == fit_size(300, 200, 128) == (128, 85) and got.dtype == np.float32
    assert 0.0 <= got.min() and got.max() <= 1.0 and np.all(np.diff(got[:, 0]) > 0)  # a ramp stays a ramp
    assert fit_image(a, 300) is a and fit_image(a, None) is a  # never enlarged, untouched when it fits


def test_fit_image_reduce_first_integer_ratio_and_uint8_rgb():
    from deepminer.geometry import fit_image

    rng = np.random.default_rng(1)
    a = rng.random((8, 12)).astype(np.float32)
    blocks = a.reshape(2, 4, 3, 4).mean(axis=(1, 3))  # 8x12 -> 2x3: means of 4x4 blocks
    for reduce_first in (False, True):
        np.testing.assert_allclose(fit_image(a, 3, reduce_first=reduce_first), blocks, rtol=1e-5)
    rgb = (rng.random((8, 12, 3)) * 255).astype(np.uint8)
    got = fit_image(rgb, 6)
    assert got.dtype == np.uint8 and got.shape == (4, 6, 3)
    want = rgb.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert np.abs(got - want).max() <= 1.0  # PIL averages 8-bit data in fixed point
