"""What one browser session holds: one :class:`Session` object in ``st.session_state`` (the current
image and recent uploads, the chosen patch, the sketch, the Evaluate page's set and run;
:meth:`Session.new_image` / :meth:`Session.new_patch` reset what depends on them) and the values of
the widgets, under the keys named in :class:`Keys`; the sketch target; a message that survives a rerun."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import streamlit as st

RECENT_MAX = 5


Box = tuple[int, int, int, int]  #: (x0, y0, x1, y1) in image pixels, x1/y1 exclusive


@dataclass(frozen=True)
class ImageRef:
    name: str
    data: bytes

    @cached_property
    def digest(self) -> str:
        """sha1 of the file (computed once: a full-field DICOM is 10-30 MB)."""
        return hashlib.sha1(self.data).hexdigest()


class Keys:
    """The keys of the widgets whose values the code reads or sets, named once. Streamlit keeps a
    widget's value under its key (everything else a session holds is in :class:`Session`). Widgets
    that belong to one image carry its digest in their key: a keyed widget ignores ``index=`` once
    its key exists, so a new image's radios and selections start afresh (at its own prediction)
    while the choices made for an image hold as long as it stays."""

    ANNOTATOR = "annotator"
    MODEL = "model"  #: the sidebar's model picker
    #: widgets whose choice follows the picked model: a new pick drops them (the Labels page's model,
    #: which starts at the picked one)
    PER_MODEL = ("labels_model",)
    COMPARE_A, COMPARE_B, COMPARE_CLASS = "compare_a", "compare_b", "compare_class"  #: the Compare page
    UPLOAD = "upload"
    SAMPLE = "sample"
    RECENT = "recent_pick"
    TOOL = "tool"
    UNIT_MAP = "unit_map"
    SELECT_MATCHING = "select_matching"
    LABEL_UNITS = "label_units"
    LABEL_CONCEPT = "label_concept"
    INSPECT_UNIT = "inspect_unit"
    #: the widgets that belong to the sketch target (the image or one of its patches): a new image or
    #: a new patch drops their values (:meth:`Session.new_image`, :meth:`Session.new_patch`)
    PER_TARGET = (LABEL_UNITS, INSPECT_UNIT)

    #: per-image widgets (key = name + the image's digest, :meth:`of_image`): the Explain page's
    #: "CAM of class" and "Class probability map" radios and its table of suspicious patches (the
    #: selected row), the Sketch page's "Sketch on" choice
    CAM_CLASS, PROB_CLASS, PATCHES_TABLE, TARGET = "cam_class", "prob_class", "patches_table", "target"

    #: the Evaluate page: the outline tool, a mask file, the explained class (per image), the peer
    #: methods, the set's source and zip upload, the set's method checkboxes, Run and Cancel
    EVAL_TOOL, EVAL_MASK, EVAL_CLASS, EVAL_PEERS = "eval_tool", "eval_mask", "eval_class", "eval_peers"
    EVAL_PEERS_SLOW = "eval_peers_slow"
    EVAL_SOURCE, EVAL_ZIP, EVAL_SET_PEERS = "eval_source", "eval_zip", "eval_set_peers"
    EVAL_RUN, EVAL_CANCEL, EVAL_MODE = "eval_run", "eval_cancel", "eval_mode"

    @staticmethod
    def of_image(name: str, ref: ImageRef) -> str:
        """The key of widget ``name`` for the image ``ref``."""
        return f"{name}_{ref.digest[:12]}"

    @classmethod
    def canvas(cls, ref: ImageRef, box: Box | None) -> str:
        """The Sketch page's drawing canvas (one per image and patch)."""
        return f"{cls.of_image('canvas', ref)}_{box}"


@dataclass
class Session:
    """What one browser session holds besides its widgets' values; one object in
    ``st.session_state`` (:func:`session`). What depends on the image or on the sketch target is reset
    by :meth:`new_image` and :meth:`new_patch`, in one place (:meth:`_new_target`)."""

    image: ImageRef | None = None
    recent: list[ImageRef] = field(default_factory=list)  #: this session's uploads, newest first
    patch_pick: int | None = None  #: the suspicious patch picked on the Explain page (its row)
    patch: Box | None = None  #: what the Sketch page sketches on (None: the whole image)
    sketch: np.ndarray | None = None  #: bool mask of the sketch target
    sketch_for: tuple[str, Box | None] | None = None  #: the target the sketch was drawn on: (digest, box)
    sketch_result: Any = None  #: the explanation of the target with the sketch
    explain_ms: float = 0.0  #: wall time of the Explain page's last explain call
    flash: str | None = None  #: a success message to show after the next rerun
    eval_outline: np.ndarray | None = None  #: the Evaluate page's lesion outline (bool, preview size)
    eval_outline_for: str | None = None  #: the digest of the image it was drawn on
    eval_set: Any = None  #: the Evaluate page's set (:class:`ui.evaluate.EvalSet`)
    eval_run: Any = None  #: its run, carried on across reruns (:class:`ui.evaluate.SetRun`)
    jobs: dict = field(default_factory=dict)  #: long calls in flight, by what they compute (ui.calls.explain_methods_job)
    job_results: dict = field(default_factory=dict)  #: their answers (or CANCELLED), by the same key

    def new_image(self, ref: ImageRef, *, upload: bool = False) -> bool:
        """Make ``ref`` the current image (an upload also goes first in :attr:`recent`); resets the
        patch and everything of the sketch target. False when it already was the current image."""
        if self.image is not None and self.image.digest == ref.digest:
            return False
        self.image = ref
        if upload:
            self.recent = [ref, *(r for r in self.recent if r.digest != ref.digest)][:RECENT_MAX]
        self.patch_pick = None
        self.patch = None
        self._new_target()
        return True

    def new_patch(self, box: Box | None) -> bool:
        """Sketch on ``box`` of the current image (None: the whole image); resets the sketch and the
        selected units. False when it already was the target."""
        if box == self.patch:
            return False
        self.patch = box
        self._new_target()
        return True

    def set_sketch(self, mask: np.ndarray | None, target: tuple[str, Box | None]) -> None:
        """The sketch drawn on ``target`` (None: nothing drawn). A changed sketch drops the selected
        units: it proposes its own matching ones."""
        if mask is None:
            self.sketch = self.sketch_for = self.sketch_result = None
            return
        old = self.sketch if self.sketch_for == target else None
        if old is None or old.shape != mask.shape or not np.array_equal(old, mask):
            self.sketch, self.sketch_for, self.sketch_result = mask, target, None
            st.session_state.pop(Keys.LABEL_UNITS, None)

    def sketch_on(self, target: tuple[str, Box | None]) -> np.ndarray | None:
        """The sketch when it was drawn on ``target``, else None."""
        return self.sketch if self.sketch_for == target else None

    def _new_target(self) -> None:
        self.sketch = self.sketch_for = self.sketch_result = None
        for key in Keys.PER_TARGET:
            st.session_state.pop(key, None)


SESSION_KEY = "session"  #: where the :class:`Session` lives in ``st.session_state``


def session() -> Session:
    """This browser session's :class:`Session` (made on first use)."""
    s = st.session_state.get(SESSION_KEY)
    if not isinstance(s, Session):
        s = Session()
        st.session_state[SESSION_KEY] = s
    return s


def image() -> ImageRef | None:
    return session().image


def recent() -> list[ImageRef]:
    return list(session().recent)


# -- the sketch target (whole image or a patch) ---------------------------------------------------

WHOLE = "whole image"  # the Sketch page's choice meaning "no patch" (a selectbox shows None as empty)


def set_patch(box: Sequence[int] | None, *, from_widget: bool = False) -> None:
    """Sketch on ``box`` of the current image (None: the whole image); resets the sketch. Other
    pages also preset the Sketch page's choice (``from_widget=False``)."""
    target: Box | None = None if box is None else (int(box[0]), int(box[1]), int(box[2]), int(box[3]))
    ref = image()
    if ref is not None and not from_widget:
        st.session_state[Keys.of_image(Keys.TARGET, ref)] = WHOLE if target is None else target
    session().new_patch(target)


def patch() -> Box | None:
    return session().patch


# -- messages that survive a rerun ----------------------------------------------------------------

def flash(message: str) -> None:
    """Show ``message`` (a success) after the next rerun, e.g. once a save has redrawn the page."""
    session().flash = message


def show_flash() -> None:
    s = session()
    msg, s.flash = s.flash, None
    if msg:
        st.success(msg)
