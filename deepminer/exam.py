"""The 4-view screening exam (RCC, LCC, RMLO, LMLO) hung as radiologists hang it, and its exam-level
scores (docs/workbench.md, "Studies").

* **Hanging**: CC row above the MLO row; the right breast's views on the left of the screen, the
  left breast's on the right, mirrored so the chest walls meet in the middle (a right view shows its
  chest wall on its right edge, a left view on its left edge). Laterality and view come from the DICOM
  tags (ImageLaterality / Laterality, ViewPosition: :class:`deepminer.data.io.LoadedImage`); where the
  chest wall is in the pixels comes from Patient Orientation (0020,0020) when the file has it (row
  direction ``A``: chest wall on the left; ``P``: on the right), else from the image (the brighter
  side: the breast lies against the chest wall; :func:`chest_wall_side`).
* **Exam score per breast** (:func:`breast_scores`): the **maximum of P(malignant) over the breast's
  views** (the rule: a finding seen in one view is enough to call the breast back); the view that gave
  it is named.
* **CC/MLO agreement**: the two views of one breast agree when the model predicts the same class on
  both; the difference of their P(malignant) is reported too. One view only: no agreement to report.

No torch, Streamlit or TorchServe here.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepminer.errors import InputError

SIDES = ("R", "L")  #: screen order, left to right
VIEWS = ("CC", "MLO")  #: screen order, top to bottom
SCORE_CLASS = "malignant"
RULE = "exam score of a breast = max P(malignant) over its views"


@dataclass
class ExamView:
    """One image of the exam: ``key`` names it (SOP Instance UID or file name)."""

    key: str
    laterality: str | None
    view: str | None
    orientation: tuple[str, ...] = ()  #: Patient Orientation, when the file has it
    item: Any = None  #: whatever the caller keeps with it (bytes, an Instance)

    @property
    def slot(self) -> tuple[str, str] | None:
        if self.laterality in SIDES and self.view in VIEWS:
            return (str(self.laterality), str(self.view))
        return None


@dataclass
class Hanging:
    """Views by slot ``(laterality, view)``; ``unplaced`` lists views without a slot or a second
    image for a taken slot, each with the reason."""

    slots: dict[tuple[str, str], ExamView] = field(default_factory=dict)
    unplaced: list[tuple[ExamView, str]] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [f"{lat}{v}" for v in VIEWS for lat in SIDES if (lat, v) not in self.slots]

    def grid(self) -> list[list[ExamView | None]]:
        """Rows CC then MLO, columns R then L."""
        return [[self.slots.get((lat, v)) for lat in SIDES] for v in VIEWS]


def hang(views: Iterable[ExamView]) -> Hanging:
    """Place views in the 2 x 2 hanging; the first image of a slot wins."""
    out = Hanging()
    for v in views:
        slot = v.slot
        if slot is None:
            why = "no laterality" if v.laterality not in SIDES else "view is not CC or MLO"
            out.unplaced.append((v, why))
        elif slot in out.slots:
            out.unplaced.append((v, f"a second {slot[0]}{slot[1]} image"))
        else:
            out.slots[slot] = v
    if not out.slots:
        raise InputError("no mammogram with laterality (L/R) and view (CC/MLO) to hang")
    return out


def chest_wall_side(pixels: np.ndarray) -> str:
    """``"left"`` or ``"right"``: the side of the image the breast lies against (more tissue signal
    in the outer quarter of columns on that side)."""
    a = np.asarray(pixels, dtype=np.float32)
    q = max(1, a.shape[1] // 4)
    return "left" if float(a[:, :q].mean()) >= float(a[:, -q:].mean()) else "right"


def orientation_side(orientation: Sequence[str]) -> str | None:
    """Chest-wall side from Patient Orientation: the row direction (first value) pointing anterior
    (``A``) puts the chest wall on the left, posterior (``P``) on the right; None when unknown."""
    if len(orientation) != 2:
        return None
    row = str(orientation[0]).upper()
    if row.startswith("A"):
        return "left"
    if row.startswith("P"):
        return "right"
    return None


def needs_mirror(laterality: str, pixels: np.ndarray | None = None, orientation: Sequence[str] = ()) -> bool:
    """Whether an image of ``laterality`` is flipped left-right for the hanging (right views show
    the chest wall on their right edge, left views on their left edge)."""
    side = orientation_side(orientation) or (chest_wall_side(pixels) if pixels is not None else None)
    if side is None:
        return False
    return (laterality == "R" and side == "left") or (laterality == "L" and side == "right")


@dataclass(frozen=True)
class BreastScore:
    laterality: str
    score: float  #: max P(malignant) over the views
    from_view: str  #: the view that gave it
    views: dict[str, float]  #: P(malignant) per view
    predictions: dict[str, str]  #: predicted class per view
    agree: bool | None  #: CC and MLO predict the same class (None: not both views)
    difference: float | None  #: |P_CC(malignant) - P_MLO(malignant)|

    @property
    def agreement_text(self) -> str:
        if self.agree is None:
            return "one view only"
        p = self.predictions
        word = "agree" if self.agree else "disagree"
        return f"CC and MLO {word} ({p['CC']} / {p['MLO']}; P(malignant) differs by {self.difference:.2f})"


def breast_scores(results: Mapping[tuple[str, str], Any], score_class: str = SCORE_CLASS) -> dict[str, BreastScore]:
    """Per breast (``"R"``, ``"L"``, those with at least one explained view) its exam score by
    :data:`RULE` and its CC/MLO agreement. ``results``: ``(laterality, view)`` -> anything with
    ``probabilities`` {class: p} and ``prediction``."""
    out: dict[str, BreastScore] = {}
    for lat in SIDES:
        here = {v: results[(lat, v)] for v in VIEWS if (lat, v) in results and results[(lat, v)] is not None}
        if not here:
            continue
        for v, r in here.items():
            if score_class not in r.probabilities:
                raise InputError(f"{lat}{v}: the model has no class {score_class!r} to score the exam by")
        probs = {v: float(r.probabilities[score_class]) for v, r in here.items()}
        best = max(probs, key=lambda v: probs[v])
        preds = {v: str(r.prediction) for v, r in here.items()}
        both = len(here) == 2
        out[lat] = BreastScore(lat, probs[best], best, probs, preds,
                               (preds["CC"] == preds["MLO"]) if both else None,
                               abs(probs["CC"] - probs["MLO"]) if both else None)
    return out
