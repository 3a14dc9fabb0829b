"""A small LRU cache of explained images, bounded by bytes, so a repeated query on one image
(a new sketch, a new ``ablate`` unit set, other options) skips the forward pass.

Keys are content hashes made by :func:`deepminer.explain.engine.explain_image` (sha1 of the image
bytes and shape, ``max_side``, the patch rule and the model's identity); the engine's values are
``(explanation, features)``: the whole :class:`~deepminer.explanation.Explanation` of the forward
pass (every unit's map included, float16) and the unit maps ``(K, h, w)`` float32 an ablation runs
the head on, arrays read-only. (1024 px on the demo model: 32 x 32 cells x 1280 units, about
7.5 MB an image; the default 256 MB keeps the last ~30.)
Thread-safe (one lock).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np


def _nbytes(value: Any) -> int:
    """Bytes held by the numpy arrays of a value: an array, a tuple of values, or a
    dataclass-like value (one level down too: the unit maps' stack)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if not hasattr(value, "__dict__"):
        return 0
    total = 0
    for v in vars(value).values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif hasattr(v, "__dict__"):
            total += sum(a.nbytes for a in vars(v).values() if isinstance(a, np.ndarray))
    return total


class ExplanationCache:
    """LRU of explanations, at most ``max_bytes`` of arrays in all (an entry larger than that is
    not kept). ``hits``/``misses`` count lookups."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        if max_bytes <= 0:
            raise ValueError(f"ExplanationCache: max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
