"""Process-wide settings that make CPU inference fast: keep freed memory for the next forward pass.

A forward pass of a convolutional network on a whole mammogram allocates and frees hundreds of MB of
activations (EfficientNet-Lite0 at 1024 x 1024: buffers of up to 32 MB, ~0.5 GB in all). PyTorch's
CPU tensors come from the C library's ``malloc``; glibc serves blocks over its mmap threshold with a
fresh ``mmap`` and hands them back to the kernel on ``free``, so every forward pass page-faults all
of its activations in again. Measured on the 2-core VM of this project (demo model, 1024 x 1024,
2 threads): 3.0 million minor page faults and 870 ms per forward, against 0.2 million faults and
300 ms once freed blocks stay in the heap. This is the problem the PyTorch CPU tuning guides solve
by preloading jemalloc or tcmalloc; :func:`keep_freed_memory` does it with glibc's own ``mallopt``,
without a new dependency.

The cost: the process keeps up to 1 GiB of freed heap (what its largest forward passes needed)
instead of returning it between requests; freed memory beyond that, and single blocks over 1 GiB,
still go back to the kernel. A no-op where the C library is not glibc (macOS, musl, Windows).
Called by the CLI (every ``deepminer`` command), the TorchServe handler and the workbench.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB free at its top is kept

_state: dict[str, bool] = {}


def keep_freed_memory(limit_bytes: int = KEEP_BYTES) -> bool:
    """Serve allocations up to ``limit_bytes`` from the heap and keep up to ``limit_bytes`` of freed
    memory there (glibc ``mallopt`` ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``). Returns True when
    the settings are in force in this process (idempotent), False where they cannot be applied."""
    if _state.get("applied"):
        return True
    if not sys.platform.startswith("linux") or not 0 < limit_bytes < 2**31:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # older glibc refuses an mmap threshold over 32 MiB (HEAP_MAX_SIZE / 2): take what it allows
    ok = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (int(limit_bytes), min(int(limit_bytes), 32 << 20)))
    ok = ok and bool(mallopt(_M_TRIM_THRESHOLD, int(limit_bytes)))
    _state["applied"] = ok
    return ok


def is_applied() -> bool:
    """Whether :func:`keep_freed_memory` is in force in this process."""
    return bool(_state.get("applied"))


def resolve_device(device: Any = "auto") -> Any:
    """A ``torch.device`` from ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or a ``torch.device``; a one-line :class:`~deepminer.errors.InputError` for a name torch
    does not know or a CUDA device this machine does not have."""
    import torch

    from deepminer.errors import InputError

    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"--device {name}: {str(err).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here")
    return dev
