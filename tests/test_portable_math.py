"""deepminer.portable_math: the CPU-independent elementary functions the phantom generator uses, checked
against numpy's own (float64, a few ulp) and hand-worked values; that they are the same bits on every
CPU is tested where it matters, on the phantoms (tests/test_phantoms.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deepminer import portable_math as pm

RNG = np.random.default_rng(7)
X = RNG.standard_normal(200_000) * 6
Y = RNG.standard_normal(200_000) * 6


def _ulps(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.spacing(np.abs(want))))


@pytest.mark.parametrize("fn, ref, args, ulps", [
    (pm.exp, np.exp, (X,), 2),
    (pm.log, np.log, (np.abs(X) + 1e-3,), 4),
    (pm.power, np.power, (np.abs(X), 0.7), 40),
    (pm.power, np.power, (np.abs(X) + 0.5, -0.75), 40),
    (pm.hypot, np.hypot, (X, Y), 1),
])
def test_relative_accuracy_against_numpy(fn, ref, args, ulps):
    assert _ulps(fn(*args), ref(*args)) <= ulps


@pytest.mark.parametrize("fn, ref, args", [
    (pm.sin, np.sin, (X * 40,)), (pm.cos, np.cos, (X * 40,)), (pm.arctan2, np.arctan2, (Y, X)),
    (pm.tanh, np.tanh, (X,)), (pm.wrap_angle, lambda a: np.angle(np.exp(1j * a)), (X * 40,)),
])
def test_absolute_accuracy_against_numpy(fn, ref, args):
    assert np.max(np.abs(fn(*args) - ref(*args))) <= 1e-13


def test_hand_worked_values_and_edges():
    assert pm.exp(0.0) == 1.0 and pm.log(1.0) == 0.0 and pm.sin(0.0) == 0.0 and pm.cos(0.0) == 1.0
    assert pm.exp(1.0) == pytest.approx(math.e, rel=1e-15) and pm.log(math.e) == pytest.approx(1.0, rel=1e-15)
    assert pm.sin(math.pi / 2) == pytest.approx(1.0, abs=1e-16) and pm.cos(math.pi) == pytest.approx(-1.0, abs=1e-16)
    assert pm.power(2.0, 10.0) == pytest.approx(1024.0, rel=1e-14) and pm.power(9.0, 0.5) == pytest.approx(3.0)
    assert pm.power(0.0, 0.7) == 0.0 and pm.power(0.0, 0.0) == 1.0 and pm.power(1.0, 123.4) == 1.0
    assert pm.log(0.0) == -math.inf and math.isnan(pm.log(-1.0))
    assert pm.exp(-1000.0) == 0.0 and pm.exp(np.float32(-200)) == 0.0
    # the four quadrants and the axes of atan2, as math.atan2 gives them
    for y, x in ((1, 1), (1, -1), (-1, -1), (-1, 1), (0, 1), (0, -1), (1, 0), (-1, 0), (3, 4), (-4, -3)):
        assert pm.arctan2(float(y), float(x)) == pytest.approx(math.atan2(y, x), abs=1e-15)
    assert pm.arctan2(0.0, 0.0) == 0.0
    assert pm.tanh(20.0) == 1.0 and pm.tanh(-20.0) == -1.0 and pm.tanh(0.5) == pytest.approx(math.tanh(0.5))
    assert pm.wrap_angle(3 * math.pi / 2) == pytest.approx(-math.pi / 2) and pm.wrap_angle(0.25) == 0.25


def test_types_follow_numpy():
    """float32 in, float32 out (Python numbers are "weak", as in numpy's own ufuncs); a Python float for
    Python numbers; shapes broadcast."""
    f32 = np.linspace(0.1, 3, 12, dtype=np.float32).reshape(3, 4)
    assert pm.exp(f32).dtype == np.float32 and pm.power(f32, 0.7).dtype == np.float32
    assert pm.arctan2(f32, f32.T.reshape(3, 4)).dtype == np.float32 and pm.tanh(f32).dtype == np.float32
    assert pm.power(f32, np.float64(0.7)).dtype == np.float64  # a numpy float64 is not weak
    assert pm.exp(f32.astype(np.float64)).dtype == np.float64
    assert isinstance(pm.exp(1), float) and isinstance(pm.power(2, 0.5), float)
    assert pm.exp(np.float32(1)).dtype == np.float32 and pm.exp(np.float32(1)).shape == ()
    assert pm.hypot(f32, np.float32(2)).shape == (3, 4)
    # float32 results are the float64 results rounded once
    assert np.array_equal(pm.tanh(f32), pm.tanh(f32.astype(np.float64)).astype(np.float32))
    s, c = pm.sincos(f32)
    assert np.array_equal(s, pm.sin(f32)) and np.array_equal(c, pm.cos(f32))
