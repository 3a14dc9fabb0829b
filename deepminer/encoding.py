"""The one encoding of arrays in the HTTP API (docs/api.md): ``{"shape", "dtype", "data"}`` with
``data`` the base64 of the array's little-endian bytes. Used by the handler, the client and the CLI."""
from __future__ import annotations

import base64
from typing import Any

import numpy as np

from deepminer.errors import InputError

_ALLOWED = {"float16", "float32", "float64", "uint8", "uint16", "int32", "int64", "bool"}


def encode_array(arr: Any, dtype: str | None = None) -> dict:
    """Encode an array (numpy or torch) as ``{"shape", "dtype", "data"}``; ``dtype`` casts first."""
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    a = np.asarray(arr)
    if dtype is not None:
        a = a.astype(dtype)
    if a.dtype.name not in _ALLOWED:
        raise ValueError(f"cannot encode dtype {a.dtype.name}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return {"shape": list(a.shape), "dtype": a.dtype.name, "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(obj: dict) -> np.ndarray:
    """Inverse of :func:`encode_array`; raises :class:`InputError` on a malformed object."""
    try:
        shape = [int(s) for s in obj["shape"]]
        dtype = str(obj["dtype"])
        raw = base64.b64decode(obj["data"], validate=True)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"malformed array object: {err}") from None
    if dtype not in _ALLOWED:
        raise InputError(f"malformed array object: unsupported dtype {dtype!r}")
    a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if a.size != int(np.prod(shape)):
        raise InputError(f"malformed array object: {a.size} values for shape {shape}")
    return a.reshape(shape).astype(np.dtype(dtype), copy=False)
