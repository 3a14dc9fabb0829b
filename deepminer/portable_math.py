"""Elementary functions whose results are the same bits on every x86-64 CPU.

numpy picks SIMD kernels for its transcendental ufuncs at run time (``np.exp``, ``np.log``,
``np.sin``, ``np.cos``, ``np.tanh``, ``np.arctan2``, ``np.power``, ...): on a CPU with AVX-512 it runs
other code than on one with only AVX2, or only the x86-64-v2 baseline, and the results differ in the
last bit. That is harmless for a model, but not for a generator that promises the same bytes for the
same seed on every machine (``deepminer phantoms``): a last-bit difference in a float32 feeding a
rounding to 12-bit pixels flips a few pixels of some images.

The functions here use only operations IEEE 754 rounds exactly and numpy computes the same way on
every CPU (``+ - * /``, ``sqrt``, ``rint``, ``floor``, ``frexp``, ``ldexp``, comparisons), in float64:
a range reduction and a polynomial, accurate to a few units in the last place of a float64. The result
has the input's float dtype (float32 in, float32 out: the float64 result rounded once), so a caller
written for float32 keeps its memory and its types. Python scalars give a float64 0-d array's value
as a ``float``.

Checked against numpy's own functions in ``tests/test_portable_math.py`` (within 4 ulp of float64),
and the phantom generator that uses them renders the same bytes with numpy's AVX-512 kernels on or off
(``tests/test_phantoms.py``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["arctan2", "cos", "exp", "hypot", "log", "power", "sin", "sincos", "tanh", "wrap_angle"]

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^20 (fdlibm)
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_PIO2_1 = 1.57079632673412561417e00  # pi/2 in three parts (fdlibm's pio2_1, pio2_2, pio2_3)
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
_PI = 3.14159265358979311600e00
_PI_LO = 1.2246467991473532e-16  # pi - _PI
_PI_2 = 1.57079632679489655800e00
_PI_4 = 0.78539816339744827900e00


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _out(result: np.ndarray, *like):
    """The result in the inputs' float type, as numpy's own ufuncs choose it (Python numbers are
    "weak"): float32 when every numpy input is float32, else float64; a Python float when every input
    is a Python number."""
    typed = [a for a in like if isinstance(a, (np.ndarray, np.generic))]
    if _float32_out(*like):
        result = result.astype(np.float32)
    if all(np.ndim(a) == 0 for a in like):
        return result.item() if not typed else result.reshape(())[()]
    return result


def _horner(x: np.ndarray, coeffs) -> np.ndarray:
    """c0 + c1 x + c2 x^2 + ... with coefficients from c0 on, by Horner's rule."""
    acc = np.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc *= x
        acc += c
    return acc


_EXP_TAYLOR = [1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(15)]  # 1/k!


def _exp64(x: np.ndarray) -> np.ndarray:
    xc = np.clip(x, -745.0, 709.0)
    n = np.rint(xc * _INV_LN2)
    r = (xc - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln2 / 2
    out = np.ldexp(_horner(r, _EXP_TAYLOR), n.astype(np.int32))
    return np.where(x < -746.0, 0.0, np.where(x > 709.8, np.inf, out))


def _float32_out(*like) -> bool:
    typed = [np.asarray(a).dtype for a in like if isinstance(a, (np.ndarray, np.generic))]
    return bool(typed) and all(d == np.float32 for d in typed)


def exp(x):
    """e^x. Only the elements whose result is not 0 in the output type are computed (most of a
    Gaussian fall-off is far below it)."""
    xf = _f64(x)
    if xf.ndim == 0:
        return _out(_exp64(xf), x)
    live = xf > (-110.0 if _float32_out(x) else -746.0)  # below: 0 (float32 underflows at -103.97)
    out = np.zeros_like(xf)
    out[live] = _exp64(xf[live])
    return _out(out, x)


_LOG_ODD = [2.0 / (2 * k + 1) for k in range(12)]  # log(m) = 2 atanh(f), f = (m-1)/(m+1)


def _log64(x: np.ndarray) -> np.ndarray:
    pos = x > 0
    m, e = np.frexp(np.where(pos, x, 1.0))  # m in [0.5, 1)
    small = m < 0.70710678118654752440
    m = np.where(small, m * 2.0, m)  # m in [sqrt(1/2), sqrt(2))
    e = (e - small).astype(np.float64)
    f = (m - 1.0) / (m + 1.0)  # |f| <= 0.1716
    s = f * f
    logm = f * _horner(s, _LOG_ODD)
    out = (e * _LN2_HI + logm) + e * _LN2_LO
    return np.where(pos, out, np.where(x == 0, -np.inf, np.nan))


def log(x):
    """Natural logarithm (-inf at 0, nan below)."""
    return _out(_log64(_f64(x)), x)


def power(x, y):
    """x ** y for x >= 0 (0 ** y = 0 for y > 0, 1 for y = 0)."""
    xf, yf = np.broadcast_arrays(_f64(x), _f64(y))
    out = np.where(xf == 0, np.where(yf == 0, 1.0, np.where(yf > 0, 0.0, np.inf)), 1.0)
    live = (xf != 0) & (xf != 1)  # 0 ** y and 1 ** y are known: only the rest is computed
    with np.errstate(invalid="ignore", divide="ignore"):
        out[live] = _exp64(yf[live] * _log64(xf[live]))
    return _out(out, x, y)


_SIN = [(-1.0) ** k / float(np.prod(np.arange(1, 2 * k + 2, dtype=np.float64))) for k in range(10)]  # x^(2k+1)
_COS = [(-1.0) ** k / float(np.prod(np.arange(1, 2 * k + 1, dtype=np.float64))) for k in range(10)]  # x^(2k)


def _sincos64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.rint(x * _TWO_OVER_PI)
    r = ((x - n * _PIO2_1) - n * _PIO2_2) - n * _PIO2_3  # |r| <= pi/4 (for |x| < 2^20 pi/2)
    r2 = r * r
    s = r * _horner(r2, _SIN)
    c = _horner(r2, _COS)
    q = np.mod(n, 4.0)
    sin = np.where(q == 0, s, np.where(q == 1, c, np.where(q == 2, -s, -c)))
    cos = np.where(q == 0, c, np.where(q == 1, -s, np.where(q == 2, -c, s)))
    return sin, cos


def sin(x):
    """sin x (accurate for |x| < 1e6)."""
    return _out(_sincos64(_f64(x))[0], x)


def cos(x):
    """cos x (accurate for |x| < 1e6)."""
    return _out(_sincos64(_f64(x))[1], x)


def sincos(x):
    """(sin x, cos x) with one range reduction."""
    s, c = _sincos64(_f64(x))
    return _out(s, x), _out(c, x)


_ATAN_ODD = [(-1.0) ** k / (2 * k + 1) for k in range(13)]  # atan(u) = u sum (-1)^k u^(2k) / (2k+1)


def _atan01(t: np.ndarray) -> np.ndarray:
    """atan t for t in [0, 1]."""
    big = t > 0.41421356237309504880  # tan(pi/8): atan t = pi/4 + atan((t-1)/(t+1))
    u = np.where(big, (t - 1.0) / (t + 1.0), t)  # |u| <= tan(pi/8)
    u = u / (1.0 + np.sqrt(1.0 + u * u))  # atan u = 2 atan(u / (1 + sqrt(1 + u^2))), |u| <= 0.199
    a = 2.0 * (u * _horner(u * u, _ATAN_ODD))
    return np.where(big, _PI_4 + a, a)


def arctan2(y, x):
    """The angle of (x, y) in (-pi, pi]; 0 for (0, 0)."""
    yf, xf = _f64(y), _f64(x)
    ax, ay = np.abs(xf), np.abs(yf)
    hi, lo = np.maximum(ax, ay), np.minimum(ax, ay)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 0.0)
    a = _atan01(t)
    a = np.where(ay > ax, (_PI_2 - a) + _PI_LO / 2, a)
    a = np.where(xf < 0, (_PI - a) + _PI_LO, a)
    return _out(np.where(yf < 0, -a, a), y, x)


def tanh(x):
    """tanh x (absolute error ~1e-16)."""
    xf = _f64(x)
    e = _exp64(-2.0 * np.abs(xf))
    t = (1.0 - e) / (1.0 + e)
    return _out(np.where(xf < 0, -t, t), x)


def hypot(x, y):
    """sqrt(x^2 + y^2) (no overflow guard: for image coordinates)."""
    xf, yf = _f64(x), _f64(y)
    return _out(np.sqrt(xf * xf + yf * yf), x, y)


def wrap_angle(a):
    """a brought to [-pi, pi) (the angle of e^(ia) without complex exponentials)."""
    af = _f64(a)
    return _out(af - 2.0 * _PI * np.floor((af + _PI) / (2.0 * _PI)), a)
