"""A source DICOM as real archives hold it: where its laterality and view are written, whether it is
an image we explain at all, and the header our results copy from it, repaired per the target IODs
(docs/dicom.md, "Sources from real archives").

* :func:`placement`: laterality and view, and **where each was found** (ImageLaterality, the
  series' Laterality, ViewPosition, the View Code Sequence, a single-valued Patient Orientation
  holding the view as digitized-film archives write it, or the PatientID as the CBIS-DDSM names do).
* :func:`check_image`: a multi-frame object or a modality that is not a projection radiograph is
  refused in one line.
* :func:`result_header`: the source's header without pixel data, with Patient Orientation kept only
  when valid (two values of L, R, A, P, H, F), else derived from laterality + view as the
  Mammography IOD writes it (row: A when the chest wall is on the image's left, P on its right;
  column: CC toward the opposite side, MLO toward the feet and the opposite side), else removed;
  person names in the retired comma form rewritten with ``^``; dates and times in old forms
  rewritten, invalid ones left out (Type 2 ones written empty); text kept as Unicode and written as
  ISO_IR 192 (UTF-8) when any value is not ASCII.

No torch, Streamlit or TorchServe here.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deepminer.errors import InputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

LATERALITIES = ("L", "R")
VIEWS = ("CC", "MLO")
#: modalities of a single projection radiograph (digitized film is often OT or SC's default)
IMAGE_MODALITIES = ("MG", "DX", "CR", "OT")
_PATIENT_ID_HINT = re.compile(r"(LEFT|RIGHT)_(CC|MLO)(?:_|$)")
_VIEW_CODES = {"R-10242": "CC", "399162004": "CC", "R-10226": "MLO", "399368009": "MLO"}
_ORIENT = re.compile(r"^[LRAPHF]{1,3}$")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class Placement:
    """Laterality (``L``/``R``) and view (``CC``/``MLO``) of an image, each with the attribute it
    came from (None: not known)."""

    laterality: str | None = None
    view: str | None = None
    laterality_from: str | None = None
    view_from: str | None = None

    def inferred(self) -> list[str]:
        """What was read from somewhere other than ImageLaterality / ViewPosition, e.g.
        ``["laterality L from Laterality (series)"]``."""
        out = []
        if self.laterality and self.laterality_from != "ImageLaterality":
            out.append(f"laterality {self.laterality} from {self.laterality_from}")
        if self.view and self.view_from != "ViewPosition":
            out.append(f"view {self.view} from {self.view_from}")
        return out


def _text(ds, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - a damaged value is an absent one
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip().upper()
    return str(value).strip().upper()


def placement(ds) -> Placement:
    """Where laterality and view are in ``ds``, first found wins (see the module doc)."""
    lat = lat_from = view = view_from = None
    for kw, name in (("ImageLaterality", "ImageLaterality"), ("Laterality", "Laterality (series)")):
        v = _text(ds, kw)
        if v in LATERALITIES:
            lat, lat_from = v, name
            break
    v = _text(ds, "ViewPosition")
    if v in VIEWS:
        view, view_from = v, "ViewPosition"
    if view is None:
        try:
            seq = ds.get("ViewCodeSequence") or []
            code = str(seq[0].get("CodeValue", "")).strip() if len(seq) else ""
        except Exception:  # noqa: BLE001 - a malformed sequence says nothing
            code = ""
        if code in _VIEW_CODES:
            view, view_from = _VIEW_CODES[code], "ViewCodeSequence"
    if view is None:  # film archives: the view written as a single-valued Patient Orientation
        v = _text(ds, "PatientOrientation")
        if v in VIEWS:
            view, view_from = v, "PatientOrientation"
    if lat is None or view is None:  # CBIS-DDSM: PatientID like Mass-Training_P_00001_LEFT_CC
        hint = _PATIENT_ID_HINT.search(_text(ds, "PatientID"))
        if hint:
            if lat is None:
                lat, lat_from = hint.group(1)[0], "PatientID"
            if view is None:
                view, view_from = hint.group(2), "PatientID"
    return Placement(lat, view, lat_from, view_from)


def check_image(ds, name: str = "image") -> None:
    """Refuse, in one line, what is not one 2-D projection radiograph: several frames (e.g.
    tomosynthesis), or a Modality other than :data:`IMAGE_MODALITIES` (absent is accepted)."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise InputError(f"{name}: a multi-frame DICOM ({frames} frames, e.g. tomosynthesis); "
                         "one 2-D mammogram per file is supported")
    modality = _text(ds, "Modality")
    if modality and modality not in IMAGE_MODALITIES:
        raise InputError(f"{name}: Modality {modality} is not a mammogram (expected one of "
                         f"{', '.join(IMAGE_MODALITIES)})")


def valid_orientation(value) -> tuple[str, str] | None:
    """Patient Orientation as two valid biped values, else None."""
    try:
        vals = [str(v).strip().upper() for v in (value if isinstance(value, (list, tuple)) or
                                                  type(value).__name__ == "MultiValue" else [value])]
    except Exception:  # noqa: BLE001
        return None
    if len(vals) == 2 and all(_ORIENT.match(v) for v in vals):
        return vals[0], vals[1]
    return None


def mg_orientation(laterality: str | None, view: str | None, chest_wall: str | None) -> tuple[str, str] | None:
    """Patient Orientation of a mammogram from its laterality, view and the side of the image its
    chest wall is on (``"left"``/``"right"``), as the Mammography IOD writes it (lateral side up):
    row ``A`` (chest wall left) or ``P`` (right); column toward the other breast for CC (``R`` for a
    left breast), toward the feet and the other breast for MLO (``FR`` for a left breast)."""
    if laterality not in LATERALITIES or view not in VIEWS or chest_wall not in ("left", "right"):
        return None
    row = "A" if chest_wall == "left" else "P"
    other = "R" if laterality == "L" else "L"
    return row, (other if view == "CC" else "F" + other)


def person_name(value: str) -> str:
    """A person name in the current form: the retired ``Family, Given Middle`` form rewritten as
    ``Family^Given^Middle``, at most 5 components and 64 characters per group, no control
    characters."""
    text = "".join(ch for ch in str(value) if ch >= " " or ch == "\x1b").strip()
    groups = []
    for group in text.split("=")[:3]:
        if "^" not in group and "," in group:
            family, _, rest = group.partition(",")
            group = "^".join([family.strip(), *rest.split()[:4]])
        comps = [c.strip() for c in group.split("^")]
        if len(comps) > 5:
            comps = [*comps[:4], " ".join(comps[4:])]
        groups.append("^".join(comps).rstrip("^")[:64])
    return "=".join(groups).rstrip("=")


def _date(value: str) -> str | None:
    s = str(value).strip()
    m = re.fullmatch(r"(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})", s)
    if not m:
        return None
    try:
        datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None
    return "".join(m.groups())


def _time(value: str) -> str | None:
    s = str(value).strip()
    m = re.fullmatch(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?", s)
    if not m:
        return None
    hh, mm, ss, frac = m.group(1), m.group(2), m.group(3), m.group(4)
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return None
    return hh + (mm or "") + (ss or "") + (frac or "")


@dataclass
class SourceHeader:
    """The header results copy (``dataset``: no pixel data), where the image lies, and what was
    repaired (one short line each)."""

    dataset: Any
    placement: Placement
    orientation: tuple[str, str] | None
    repairs: list[str] = field(default_factory=list)


def result_header(source: Dataset, pixels: np.ndarray | None = None) -> SourceHeader:
    """The repaired header of ``source`` for the result objects (see the module doc). ``pixels``
    (the decoded image) tell where the chest wall is when the orientation must be derived."""
    from pydicom.dataset import Dataset as _Dataset

    place = placement(source)
    repairs: list[str] = []
    head = _Dataset()
    for elem in source:
        if elem.tag.group != 0x7FE0:  # pixel data stays behind (metadata is enough)
            head.add(elem)
    if hasattr(source, "file_meta"):
        head.file_meta = source.file_meta
    try:
        head.decode()  # text to Unicode with the source's character set
    except Exception:  # noqa: BLE001 - a character set pydicom cannot apply: keep the bytes' best reading
        repairs.append("text in an unknown character set read as is")

    orient = valid_orientation(head.get("PatientOrientation", []))
    if orient is None:
        from deepminer.exam import chest_wall_side

        side = chest_wall_side(pixels) if pixels is not None else None
        orient = mg_orientation(place.laterality, place.view, side)
        had = _text(source, "PatientOrientation")
        if "PatientOrientation" in head:
            del head.PatientOrientation
        if had or orient:
            repairs.append(f"PatientOrientation {had or '(none)'} -> "
                           + ("\\".join(orient) + " (from laterality, view and the chest wall's side)"
                              if orient else "left out (cannot be known)"))
    for elem in list(head):
        if elem.VR == "PN" and elem.value not in (None, ""):
            vals = elem.value if elem.VM > 1 else [elem.value]
            fixed = [person_name(str(v)) for v in vals]
            if [str(v) for v in vals] != fixed:
                repairs.append(f"{elem.keyword or elem.tag} {'/'.join(map(str, vals))!r} -> {'/'.join(fixed)!r}")
                elem.value = fixed if elem.VM > 1 else fixed[0]
        elif elem.VR in ("DA", "TM") and elem.value not in (None, ""):
            raw = str(elem.value if elem.VM <= 1 else elem.value[0])
            good = (_date if elem.VR == "DA" else _time)(raw)
            if good != raw:
                keyword = elem.keyword or str(elem.tag)
                repairs.append(f"{keyword} {raw!r} -> " + (repr(good) if good else "left out (invalid)"))
                if good:
                    head[elem.tag].value = good
                else:
                    del head[elem.tag]
    for kw in _TYPE2:
        if kw not in head:
            setattr(head, kw, "")
    if "SpecificCharacterSet" in head:
        del head.SpecificCharacterSet
    if any(_non_ascii(e.value) for e in head if e.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC")):
        head.SpecificCharacterSet = "ISO_IR 192"
    return SourceHeader(head, place, orient, repairs)


def _non_ascii(value) -> bool:
    vals = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return any(not str(v).isascii() for v in vals if v is not None)
