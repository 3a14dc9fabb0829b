"""The concept vocabulary: every concept is a real pydicom BI-RADS code, the dropdown term list is
CID 6004-6015, and DDSM report keywords map back to concepts."""
from __future__ import annotations

import pytest
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes

from deepminer import concepts as C
from deepminer.data.phantoms import PHANTOM_CONCEPTS


@pytest.mark.parametrize("concept", C.CONCEPTS, ids=lambda c: c.name)
def test_every_concept_is_a_real_pydicom_code(concept):
    code = getattr(getattr(codes, concept.code_scheme), concept.code_keyword)
    assert (code.value, code.scheme_designator, code.meaning) == (
        concept.code_value, concept.code_scheme, concept.code_meaning)
    assert concept.code() == code
    if concept.cid is not None:
        assert 6004 <= concept.cid <= 6015
        assert concept.code_keyword in cid_concepts[concept.cid][concept.code_scheme]
    assert concept.group in C.GROUPS


def test_phantom_concepts_are_the_vocabulary_and_names_are_unique():
    assert set(PHANTOM_CONCEPTS) == set(C.CONCEPT_NAMES)
    assert len(C.CONCEPT_NAMES) == len(set(C.CONCEPT_NAMES))
    groups = {g: [c.name for c in C.CONCEPTS if c.group == g] for g in C.GROUPS}
    assert groups["mass shape"] == ["mass_round", "mass_oval", "mass_lobular", "mass_irregular"]
    assert len(groups["mass margin"]) == 6 and "spicules" in groups["mass margin"]
    assert len(groups["calcification type"]) == 6
    # each DDSM keyword names one concept only
    keys = [k for c in C.CONCEPTS for k in c.ddsm]
    assert len(keys) == len(set(keys))
    with pytest.raises(KeyError, match="unknown concept"):
        C.get("mass_square")


def test_birads_terms_are_cid_6004_to_6015_deduplicated():
    terms = C.birads_terms()
    # independent count: distinct (scheme, keyword -> value) over the CIDs' raw tables
    distinct = {(scheme, getattr(getattr(codes, scheme), kw).value)
                for cid in range(6004, 6016) for scheme, kws in cid_concepts[cid].items() for kw in kws}
    assert len(terms) == len(distinct) == len({(t[2], t[3]) for t in terms})
    assert ("mass margin", "Spiculated lesion", "129742005", "SCT") in terms
    assert ("calcification type", "Fine pleomorphic calcification", "111344", "DCM") in terms
    assert ("finding", "Architectural distortion of breast", "129792006", "SCT") in terms
    assert {t[0] for t in terms} == set(C.GROUPS) | {"mass density"}
    for c in C.CONCEPTS:  # every CID-listed concept appears in the dropdown
        if c.cid is not None:
            assert (c.code_value, c.code_scheme) in {(t[2], t[3]) for t in terms}


def test_reports_map_to_concepts():
    def names(report: str) -> list[str]:
        return [c.name for c in C.concepts_from_report(report)]

    assert names("LESION_TYPE MASS SHAPE IRREGULAR MARGINS SPICULATED") == [
        "mass_irregular", "mass_spiculated_margin", "mass"]
    assert names("LESION_TYPE CALCIFICATION TYPE PLEOMORPHIC DISTRIBUTION CLUSTERED") == [
        "calc_fine_pleomorphic", "calc_clustered", "calcification"]
    # CBIS-DDSM multi-values, lower case, several lesions, unknown words ignored
    assert names("lesion_type calcification type ROUND_AND_REGULAR-PUNCTATE distribution CLUSTERED; "
                 "LESION_TYPE MASS SHAPE LOBULATED MARGINS ILL_DEFINED") == [
        "mass_lobular", "mass_ill_defined_margin", "calc_round", "calc_clustered", "mass", "calcification"]
    # architectural distortion is a DDSM mass shape but not a mass
    assert names("LESION_TYPE MASS SHAPE ARCHITECTURAL_DISTORTION") == ["architectural_distortion"]
    assert names("LESION_TYPE MASS SHAPE IRREGULAR-ARCHITECTURAL_DISTORTION MARGINS SPICULATED") == [
        "mass_irregular", "mass_spiculated_margin", "architectural_distortion", "mass"]
    assert names("") == [] and names("NORMAL") == []
    assert C.concept_for_keyword("margins", "spiculated").name == "mass_spiculated_margin"
    assert C.concept_for_keyword("TYPE", "EGGSHELL") is None
    assert C.parse_report("LESION_TYPE MASS SHAPE OVAL; LESION_TYPE CALCIFICATION TYPE VASCULAR") == [
        {"LESION_TYPE": ["MASS"], "SHAPE": ["OVAL"]}, {"LESION_TYPE": ["CALCIFICATION"], "TYPE": ["VASCULAR"]}]
