"""What the Studies page computes (no Streamlit): open a 4-view exam from a PACS study or from
uploaded files, explain its views concurrently, and make the DICOM results to store back.

Each view is decoded once here (full resolution, for the preview and the DICOM results) and sent to
the model fitted to the long side it is explained at (``DEEPMINER_MAX_SIDE``) as a 16-bit PNG: the
same pixels the server would compute from the DICOM, without sending 27 MB per view. The four
requests go out together, so TorchServe can run them in one batch of the worker (batchSize 4).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepminer.errors import DeepMinerError
from deepminer.exam import ExamView, Hanging, breast_scores, hang, needs_mirror
from deepminer.geometry import fit_image

PREVIEW_SIDE = 720  #: long side of a view's picture on the page
#: the longest side sent to the model when the workbench asks no ``max_side`` (the model brings the image
#: to its own scale; this only bounds the upload of a 4k x 3k DICOM, its pixel spacing sent along)
SEND_SIDE = 2048


@dataclass
class View:
    """One view of an opened exam: decoded, explained (or why not)."""

    key: str  #: SOP Instance UID or file name
    name: str  #: what the page calls it
    data: bytes | None = None  #: the DICOM (or image) file
    laterality: str | None = None
    view: str | None = None
    orientation: tuple[str, ...] = ()
    inferred: list[str] = field(default_factory=list)  #: laterality/view read from elsewhere than
    #: ImageLaterality/ViewPosition, and from where (deepminer.dicom_source.Placement.inferred)
    preview: np.ndarray | None = None  #: grey float [0, 1], long side <= PREVIEW_SIDE
    model_bytes: bytes | None = None  #: what the model is sent (a 16-bit PNG at the explained size)
    mirror: bool = False
    result: Any = None  #: the Explanation
    error: str | None = None
    shape: tuple[int, int] | None = None

    @property
    def slot_name(self) -> str:
        return f"{self.laterality or '?'}{self.view or '?'}"


@dataclass
class Exam:
    views: list[View]
    hanging: Hanging | None
    problem: str | None = None  #: why the exam cannot be hung (no mammogram)
    timings: dict[str, float] = field(default_factory=dict)
    study_uid: str | None = None

    def slot(self, lat: str, view: str) -> View | None:
        if self.hanging is None:
            return None
        ev = self.hanging.slots.get((lat, view))
        return ev.item if ev is not None else None

    @property
    def explained(self) -> list[View]:
        return [v for v in self.views if v.result is not None]

    def scores(self):
        if self.hanging is None:
            return {}
        return breast_scores({s: ev.item.result for s, ev in self.hanging.slots.items()
                              if ev.item.result is not None})


def _shrink(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """``pixels`` (grey float) fitted (area) to ``max_side``: an integer box reduction first, then
    the rest (the same mean as one BOX resize, several times cheaper on a 13.5 MP image)."""
    return fit_image(np.asarray(pixels, dtype=np.float32), max_side, reduce_first=True)


def model_input(pixels: np.ndarray, max_side: int | None, spacing_mm: float | None = None) -> bytes:
    """The image the model is sent: fitted (area) to ``max_side``, as a 16-bit PNG (16 bits used);
    ``spacing_mm`` (the pixel spacing of ``pixels``) travels along, scaled to the sent size, as the PNG
    text chunk the loader reads (:data:`deepminer.data.io.SPACING_TEXT`): the server brings the image
    to the model's scale by it."""
    from deepminer.data.io import SPACING_TEXT, png16_of_pixels

    small = _shrink(pixels, max_side)
    if not spacing_mm:
        return png16_of_pixels(small)
    sent = float(spacing_mm) * max(pixels.shape[:2]) / max(small.shape[:2])
    return png16_of_pixels(small, text={SPACING_TEXT: f"{sent:.6g}"})


def _decode(v: View, max_side: int | None = None) -> View:
    """Decode ``v.data`` once: laterality/view from the tags, the preview, the model's input (made
    here, in the loading thread; the full-resolution pixels are not kept)."""
    from deepminer.data.io import load_image

    try:
        img = load_image(v.data or b"", name=v.name)
    except DeepMinerError as err:
        v.error = f"{v.name}: {err}"
        return v
    except Exception as err:  # noqa: BLE001 - a decoder's own failure is a message for this view
        v.error = f"{v.name}: the image could not be decoded ({type(err).__name__}: {err})"
        return v
    v.laterality = v.laterality or img.laterality
    v.view = v.view or img.view
    v.shape = img.pixels.shape
    send = max_side or SEND_SIDE
    small = _shrink(img.pixels, max(send, PREVIEW_SIDE))
    spacing = None if img.spacing_mm is None else img.spacing_mm * max(img.pixels.shape) / max(small.shape)
    v.model_bytes = model_input(small, send, spacing)
    v.preview = _shrink(small, PREVIEW_SIDE)
    if v.laterality in ("L", "R"):
        v.mirror = needs_mirror(v.laterality, v.preview, v.orientation)
    return v


def _dicom_header(data: bytes) -> tuple[tuple[str, ...], list[str]]:
    """Patient Orientation of a DICOM file (header only; () when absent, not DICOM, or not the two
    valid values a hanging can use) and what its laterality/view were inferred from."""
    import io

    import pydicom

    from deepminer.dicom_source import placement, valid_orientation

    if data[128:132] != b"DICM":
        return (), []
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - nothing to say then; the decoder reports real problems
        return (), []
    return valid_orientation(ds.get("PatientOrientation") or []) or (), placement(ds).inferred()


def open_exam(fetch: Sequence[tuple[str, str, Callable[[], bytes]]], explain: Callable[[bytes], Any],
              max_side: int | None, *, workers: int = 4, describe_error: Callable[[Exception], str] | None = None,
              study_uid: str | None = None) -> Exam:
    """Fetch, decode, hang and explain the views: ``fetch`` = (key, name, a function returning the
    file's bytes) per image; ``explain(model_input_bytes)`` returns an Explanation (it is called from
    ``workers`` threads at once). A view that fails is kept with its error; the others go on."""
    t0 = time.perf_counter()
    describe = describe_error or (lambda e: f"{type(e).__name__}: {e}")

    def load(item: tuple[str, str, Callable[[], bytes]]) -> View:
        key, name, get = item
        v = View(key=key, name=name)
        try:
            v.data = get()
        except DeepMinerError as err:
            v.error = f"{name}: {err}"
            return v
        v.orientation, v.inferred = _dicom_header(v.data)
        return _decode(v, max_side)

    def run(v: View) -> View:
        if v.model_bytes is None or v.error:
            return v
        try:
            v.result = explain(v.model_bytes)
        except Exception as err:  # noqa: BLE001 - worded by describe_error; the other views go on
            v.error = f"{v.slot_name}: {describe(err)}"
        return v

    with ThreadPoolExecutor(max(1, workers)) as pool:
        views = list(pool.map(load, fetch))
        t_loaded = time.perf_counter()
        placed = [v for v in views if v.error is None]
        try:
            hanging = hang([ExamView(v.key, v.laterality, v.view, v.orientation, v) for v in placed])
        except DeepMinerError as err:
            return Exam(views, None, str(err), {"load_s": t_loaded - t0}, study_uid)
        slotted = [ev.item for ev in hanging.slots.values()]
        list(pool.map(run, slotted))
    t_end = time.perf_counter()
    return Exam(views, hanging, None, {"load_s": t_loaded - t0, "explain_s": t_end - t_loaded,
                                       "total_s": t_end - t0}, study_uid)


def picture(v: View, cam: bool = True) -> np.ndarray:
    """The view as hung: CAM of the predicted class over the preview (or the preview alone),
    mirrored when the hanging asks for it (uint8 RGB)."""
    from deepminer.overlay import heat_overlay, to_rgb

    assert v.preview is not None
    if cam and v.result is not None:
        r = v.result
        rgb = heat_overlay(v.preview, r.cam[r.class_index(r.prediction)])
    else:
        rgb = to_rgb(v.preview)
    return np.ascontiguousarray(rgb[:, ::-1]) if v.mirror else rgb


def is_dicom(data: bytes) -> bool:
    from deepminer.data.io import sniff_format

    return sniff_format(bytes(data[:256])) == "dicom"


def dicom_zip_maker(data: bytes, result: Any, labels: dict[int, str] | None = None,
                    thresholds: Any = None) -> Callable[[], bytes]:
    """A function that makes the zip of SEG + SR + SC of ``result`` (the explanation of the DICOM
    ``data``) when called (a download button calls it on click, in its own thread); ``thresholds``:
    the model's atlas thresholds (unit masks as the atlas cuts them; None: half each unit's maximum)."""
    def make() -> bytes:
        from deepminer.dicom_results import build_results, read_source

        return build_results(read_source(data), result, labels=labels, thresholds=thresholds).zip_bytes()

    return make


def dicom_results(exam: Exam, labels: dict[int, str] | None = None,
                  thresholds: Any = None) -> tuple[list[Any], list[str]]:
    """SEG + SR + SC of every explained DICOM view (datasets to store) and the views skipped, with
    why (not DICOM, not explained); ``thresholds`` as in :func:`dicom_zip_maker`."""
    from deepminer.dicom_results import build_results, read_source

    out: list[Any] = []
    skipped: list[str] = []
    for v in exam.views:
        if v.result is None or v.data is None:
            skipped.append(f"{v.name}: not explained")
            continue
        try:
            src = read_source(v.data, name=v.name)
            res = build_results(src, v.result, labels=labels, thresholds=thresholds)
        except DeepMinerError as err:
            skipped.append(str(err))
            continue
        out.extend([res.seg, res.sr, res.sc])
    return out, skipped
