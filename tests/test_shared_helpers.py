"""The small ideas written once (docs/architecture.md, "One home per idea"), each against a
hand-worked example or an independent computation."""
from __future__ import annotations

import numpy as np
import pytest
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
