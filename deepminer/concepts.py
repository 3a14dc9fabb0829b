"""The concept vocabulary of the project: the BI-RADS concepts the phantoms draw (each with a pixel
mask), the labels a person can give a unit, and the keywords of DDSM-style reports.

Each :class:`Concept` carries the coded BI-RADS term it stands for, as listed by pydicom
(``pydicom.sr.codedict.codes``, DICOM context groups CID 6004-6015: shapes, margins, calcification
types and distributions, single-image findings). The code triples are written out here so importing
this module stays cheap; ``tests/test_concepts.py`` checks every one against pydicom.

DDSM report lines look like ``LESION_TYPE MASS SHAPE IRREGULAR MARGINS SPICULATED`` or
``LESION_TYPE CALCIFICATION TYPE PLEOMORPHIC DISTRIBUTION CLUSTERED``; several lesions are joined with
``; ``. As in DDSM, architectural distortion is written as a mass shape
(``LESION_TYPE MASS SHAPE ARCHITECTURAL_DISTORTION``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

GROUPS = ("mass shape", "mass margin", "calcification type", "calcification distribution", "finding")
BIRADS_CIDS = tuple(range(6004, 6016))
_CID_GROUP = {6004: GROUPS[0], 6005: GROUPS[0], 6006: GROUPS[1], 6007: GROUPS[1], 6008: "mass density",
              6009: "mass density", 6010: GROUPS[2], 6011: GROUPS[2], 6012: GROUPS[3], 6013: GROUPS[3],
              6014: GROUPS[4], 6015: GROUPS[4]}


@dataclass(frozen=True)
class Concept:
    """One concept: ``name`` (mask folder and label key), ``display`` text, ``group`` (one of
    :data:`GROUPS`), the coded term (``code_value``, ``code_scheme``, ``code_meaning``, and the pydicom
    keyword ``code_keyword`` it is found under, in context group ``cid`` or None when it is not in CID
    6004-6015), and the DDSM report keywords (``ddsm`` = (field, value) pairs) that name it."""

    name: str
    display: str
    group: str
    code_keyword: str
    code_value: str
    code_scheme: str
    code_meaning: str
    cid: int | None
    ddsm: tuple[tuple[str, str], ...] = ()

    def code(self):
        """The :class:`pydicom.sr.coding.Code` of this concept (imports pydicom)."""
        from pydicom.sr.coding import Code

        return Code(self.code_value, self.code_scheme, self.code_meaning)


def _c(name, display, group, keyword, value, scheme, meaning, cid, *ddsm):
    return Concept(name, display, group, keyword, value, scheme, meaning, cid, tuple(ddsm))


_MS, _MM, _CT, _CD, _F = GROUPS
CONCEPTS: tuple[Concept, ...] = (
    _c("mass_round", "Round mass", _MS, "RoundShape", "42700002", "SCT", "Round shape", 6005,
       ("SHAPE", "ROUND")),
    _c("mass_oval", "Oval mass", _MS, "OvoidShapeOval", "84360004", "SCT", "Ovoid shape (Oval)", 6005,
       ("SHAPE", "OVAL")),
    _c("mass_lobular", "Lobular mass", _MS, "Lobular", "40266001", "SCT", "Lobular", 6005,
       ("SHAPE", "LOBULATED"), ("SHAPE", "LOBULAR")),
    _c("mass_irregular", "Irregular mass", _MS, "Irregular", "49608001", "SCT", "Irregular", 6005,
       ("SHAPE", "IRREGULAR")),
    _c("mass_circumscribed_margin", "Circumscribed margin", _MM, "CircumscribedLesion", "129738007",
       "SCT", "Circumscribed lesion", 6007, ("MARGINS", "CIRCUMSCRIBED")),
    _c("mass_obscured_margin", "Obscured margin", _MM, "ObscuredLesion", "129740002", "SCT",
       "Obscured lesion", 6007, ("MARGINS", "OBSCURED")),
    _c("mass_microlobulated_margin", "Microlobulated margin", _MM, "MicrolobulatedLesion", "129739004",
       "SCT", "Microlobulated lesion", 6007, ("MARGINS", "MICROLOBULATED")),
    _c("mass_ill_defined_margin", "Ill-defined (indistinct) margin", _MM, "IndistinctLesion", "129741003",
       "SCT", "Indistinct lesion", 6007, ("MARGINS", "ILL_DEFINED"), ("MARGINS", "INDISTINCT")),
    _c("mass_spiculated_margin", "Spiculated margin", _MM, "SpiculatedLesion", "129742005", "SCT",
       "Spiculated lesion", 6007, ("MARGINS", "SPICULATED")),
    _c("spicules", "Spicules (lines radiating from a mass)", _MM, "SpiculatedLesion", "129742005", "SCT",
       "Spiculated lesion", 6007),
    _c("calc_coarse", "Coarse (popcorn-like) calcifications", _CT, "CoarsePopcornLikeCalcification",
       "129749001", "SCT", "Coarse (popcorn-like) calcification", 6011, ("TYPE", "COARSE"),
       ("TYPE", "POPCORN")),
    _c("calc_rod_like", "Large rod-like calcifications", _CT, "LargeRodLikeCalcification", "129752009",
       "SCT", "Large rod-like calcification", 6011, ("TYPE", "LARGE_RODLIKE"), ("TYPE", "RODLIKE")),
    _c("calc_vascular", "Vascular calcifications", _CT, "VascularCalcificationRadiographicFinding",
       "129759000", "SCT", "Vascular calcification", 6011, ("TYPE", "VASCULAR")),
    _c("calc_round", "Round calcifications", _CT, "RoundShapedCalcification", "129756007", "SCT",
       "Round shaped calcification", 6011, ("TYPE", "ROUND_AND_REGULAR"), ("TYPE", "ROUND")),
    _c("calc_fine_pleomorphic", "Fine pleomorphic calcifications", _CT, "FinePleomorphicCalcification",
       "111344", "DCM", "Fine pleomorphic calcification", 6011, ("TYPE", "PLEOMORPHIC"),
       ("TYPE", "FINE_PLEOMORPHIC")),
    _c("calc_fine_linear_branching", "Fine linear branching calcifications", _CT,
       "FineLinearBranchingCastingCalcification", "129762002", "SCT",
       "Fine linear, branching (casting) calcification", 6011, ("TYPE", "FINE_LINEAR_BRANCHING")),
    _c("calc_clustered", "Clustered (grouped) calcifications", _CD, "GroupedCalcificationDistribution",
       "129766004", "SCT", "Grouped calcification distribution", 6013, ("DISTRIBUTION", "CLUSTERED"),
       ("DISTRIBUTION", "GROUPED")),
    _c("calc_linear", "Linear calcification distribution", _CD, "LinearCalcificationDistribution",
       "129765000", "SCT", "Linear calcification distribution", 6013, ("DISTRIBUTION", "LINEAR")),
    _c("calc_segmental", "Segmental calcification distribution", _CD, "SegmentalCalcificationDistribution",
       "129768003", "SCT", "Segmental calcification distribution", 6013, ("DISTRIBUTION", "SEGMENTAL")),
    _c("calc_regional", "Regional calcification distribution", _CD, "RegionalCalcificationDistribution",
       "129767008", "SCT", "Regional calcification distribution", 6013, ("DISTRIBUTION", "REGIONAL")),
    _c("architectural_distortion", "Architectural distortion", _F, "ArchitecturalDistortionOfBreast",
       "129792006", "SCT", "Architectural distortion of breast", 6015,
       ("SHAPE", "ARCHITECTURAL_DISTORTION"), ("LESION_TYPE", "ARCHITECTURAL_DISTORTION")),
    _c("mass", "Mass (any)", _F, "MammographicBreastMass", "129788004", "SCT", "Mammographic breast mass",
       None, ("LESION_TYPE", "MASS")),
    _c("calcification", "Calcification (any)", _F, "CalcificationOfBreast", "309587003", "SCT",
       "Calcification of breast", None, ("LESION_TYPE", "CALCIFICATION")),
)
BY_NAME: dict[str, Concept] = {c.name: c for c in CONCEPTS}
CONCEPT_NAMES: tuple[str, ...] = tuple(BY_NAME)
_BY_KEYWORD: dict[tuple[str, str], Concept] = {k: c for c in CONCEPTS for k in c.ddsm}


def get(name: str) -> Concept:
    """The concept called ``name`` (KeyError naming the known ones otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown concept {name!r}; known: {', '.join(CONCEPT_NAMES)}") from None


def concept_for_keyword(field: str, value: str) -> Concept | None:
    """The concept a DDSM report keyword names, e.g. ``("MARGINS", "SPICULATED")``; None if none."""
    return _BY_KEYWORD.get((field.upper(), value.upper()))


_FIELDS = ("LESION_TYPE", "SHAPE", "MARGINS", "TYPE", "DISTRIBUTION")


def parse_report(report: str) -> list[dict[str, list[str]]]:
    """Split a DDSM-style report into lesions: one dict per ``LESION_TYPE``, field -> values (a
    CBIS-DDSM value such as ``ROUND_AND_REGULAR-PUNCTATE`` gives two values). Other words are ignored."""
    lesions: list[dict[str, list[str]]] = []
    field = None
    for tok in re.split(r"[\s;,|]+", report.upper()):
        if not tok:
            continue
        if tok in _FIELDS:
            field = tok
            if tok == "LESION_TYPE" or not lesions:
                lesions.append({})
            continue
        if field is not None:
            lesions[-1].setdefault(field, []).extend(v for v in tok.split("-") if v)
            field = None
    return lesions


def concepts_from_report(report: str) -> list[Concept]:
    """The concepts a DDSM-style report names, in vocabulary order. A lesion written as
    ``LESION_TYPE MASS SHAPE ARCHITECTURAL_DISTORTION`` names ``architectural_distortion`` but not
    ``mass`` unless it also names a mass shape or margin."""
    found: set[str] = set()
    for lesion in parse_report(report):
        names = {c.name for f, vals in lesion.items() for v in vals if (c := concept_for_keyword(f, v))}
        if "architectural_distortion" in names and not names & _MASS_DESCRIPTORS:
            names.discard("mass")
        found |= names
    return [c for c in CONCEPTS if c.name in found]


_MASS_DESCRIPTORS = {c.name for c in CONCEPTS if c.group in ("mass shape", "mass margin")}


@lru_cache(maxsize=1)
def birads_terms() -> tuple[tuple[str, str, str, str], ...]:
    """Every BI-RADS term of CID 6004-6015 in pydicom, deduplicated, for a label dropdown: tuples of
    (group, meaning, code value, scheme), ordered by context group then meaning; group is one of
    :data:`GROUPS` or ``"mass density"``."""
    from pydicom.sr.codedict import codes

    seen: set[tuple[str, str]] = set()
    terms = []
    for cid in BIRADS_CIDS:
        coll = getattr(codes, f"cid{cid}")
        group = _CID_GROUP[cid]
        for kw in sorted(coll.dir(), key=lambda k: getattr(coll, k).meaning.lower()):
            code = getattr(coll, kw)
            if (code.value, code.scheme_designator) in seen:
                continue
            seen.add((code.value, code.scheme_designator))
            terms.append((group, code.meaning, code.value, code.scheme_designator))
    return tuple(terms)


__all__ = ["BIRADS_CIDS", "BY_NAME", "CONCEPTS", "CONCEPT_NAMES", "Concept", "GROUPS", "birads_terms",
           "concept_for_keyword", "concepts_from_report", "get", "parse_report"]
