"""Decoded images, one per content and process: decoded in a worker thread, at full resolution and
as a preview of at most :data:`PREVIEW_SIDE` pixels that the pages draw on (:func:`decoded`);
:func:`set_image` makes an image the session's current one and starts its decode."""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import streamlit as st

from deepminer.errors import DeepMinerError
from ui.render import md_escape
from ui.session import ImageRef, session

DECODED_MAX = 4  #: decoded images kept per process (a 4,500 x 3,000 image is ~58 MB decoded)
PREVIEW_SIDE = 1024  #: long side of the copy of an image the pages draw on


def set_image(name: str, data: bytes, *, upload: bool = False) -> None:
    """Make ``data`` the current image (resets the patch, sketch and unit selection) and start
    decoding it."""
    ref = ImageRef(name, bytes(data))
    if session().new_image(ref, upload=upload):
        prefetch(ref)


@dataclass(frozen=True)
class Decoded:
    """An image decoded once: ``pixels`` at full resolution (for crops) and ``preview``, the same
    scaled down to at most :data:`PREVIEW_SIDE` pixels on the long side (what the pages draw on and
    colour). Both float [0, 1] and read-only: every session of the process shares them."""

    pixels: np.ndarray
    preview: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    @property
    def scale(self) -> float:
        """preview pixels per image pixel (<= 1)."""
        return self.preview.shape[0] / self.pixels.shape[0]


def _decode(data: bytes) -> Decoded:
    from deepminer.data.io import load_image
    from ui.render import fit

    pixels = load_image(data).pixels
    preview = fit(pixels, PREVIEW_SIDE)
    pixels.setflags(write=False)
    preview.setflags(write=False)
    return Decoded(pixels, preview)


class _Decoder:
    """Decodes images in worker threads, once per content (the last :data:`DECODED_MAX` are kept).
    The Explain page starts the decode before it waits for the model server, so both run at once."""

    def __init__(self, size: int = DECODED_MAX) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deepminer-decode")
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Future[Decoded]] = OrderedDict()
        self._size = size

    def submit(self, ref: ImageRef) -> Future[Decoded]:
        with self._lock:
            job = self._jobs.get(ref.digest)
            if job is None:
                job = self._pool.submit(_decode, ref.data)
                self._jobs[ref.digest] = job
                while len(self._jobs) > self._size:
                    self._jobs.popitem(last=False)
            else:
                self._jobs.move_to_end(ref.digest)
            return job


@st.cache_resource(show_spinner=False)
def _decoder() -> _Decoder:
    return _Decoder()


def prefetch(ref: ImageRef) -> None:
    """Start decoding ``ref`` in a worker thread (nothing when it is decoded or on its way)."""
    _decoder().submit(ref)


def decoded(ref: ImageRef) -> Decoded | None:
    """The decoded image (waits for its decode); None after showing why it could not be read."""
    try:
        return _decoder().submit(ref).result()
    except DeepMinerError as err:
        st.error(f"Cannot read {md_escape(ref.name)}: {md_escape(err)}")
        return None


def pixels(ref: ImageRef) -> np.ndarray | None:
    """The decoded image at full resolution (float [0, 1], read-only); None after showing why it
    could not be read."""
    d = decoded(ref)
    return None if d is None else d.pixels
