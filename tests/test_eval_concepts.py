"""Concept discovery (deepminer.evaluation.concepts): a hand-built atlas with known answers, the
class -> planted concepts mapping against the phantom generator's own draws, and the bundled demo
atlas (invariants only: its numbers are whatever the demo model learned)."""
from pathlib import Path

import numpy as np
import pytest

from deepminer import CLASSES
from deepminer.atlas import Atlas
from deepminer.data.phantoms import PHANTOM_CONCEPTS, draw_patient
from deepminer.defaults import MIN_LABEL_IOU, TOP_UNITS
from deepminer.errors import InputError
from deepminer.evaluation.concepts import PLANTED_SOURCE, concept_discovery, planted_concepts

DEMO = Path(__file__).resolve().parents[1] / "model_store" / "demo" / "atlas"


def tiny_atlas(iou, concepts, top_units, min_label_iou=0.04):
    """An Atlas built in memory: only what concept discovery reads."""
    iou = np.asarray(iou, np.float32)
    meta = {"classes": list(top_units), "data": {"concepts": list(concepts)},
            "iou": {"min_label_iou": min_label_iou},
            "per_class": {c: {"top_units": list(u), "coverage": None} for c, u in top_units.items()}}
    arrays = {"thresholds": np.zeros(iou.shape[0], np.float32), "iou": iou}
    return Atlas(Path("."), meta, arrays, None)


def test_hand_built_atlas():
    concepts = ["mass_spiculated_margin", "calc_coarse", "mass", "calc_vascular"]
    iou = [[0.30, 0.00, 0.10, 0.0],   # unit 0: spiculated (0.30)
           [0.00, 0.05, 0.00, 0.0],   # unit 1: coarse (0.05)
           [0.01, 0.02, 0.03, 0.0],   # unit 2: below the cut-off, unlabelled
           [0.02, 0.00, 0.20, 0.0],   # unit 3: mass (0.20)
           [0.00, 0.04, 0.00, 0.0]]   # unit 4: coarse (0.04, exactly the cut-off: labelled)
    atlas = tiny_atlas(iou, concepts, {"normal": [2, 0], "benign": [1, 3, 0, 2, 4], "malignant": [0, 3, 2]})
    r = concept_discovery(atlas)
    assert r["concepts"] == {"mass_spiculated_margin": {"unit": 0, "iou": pytest.approx(0.30), "detected": True},
                             "calc_coarse": {"unit": 1, "iou": pytest.approx(0.05), "detected": True},
                             "mass": {"unit": 3, "iou": pytest.approx(0.20), "detected": True},
                             "calc_vascular": {"unit": None, "iou": 0.0, "detected": False}}
    assert r["detected_share"] == 0.75 and r["detected"] == concepts[:3]
    assert r["labelled_units"] == 4 and r["labelled_concepts"] == 3 and r["units"] == 5
    assert r["min_label_iou"] == 0.04 and r["planted_source"] == PLANTED_SOURCE
    # normal: top [2, 0]; labelled: 0 (spiculated); normal plants nothing -> 0 of 1
    n = r["classes"]["normal"]
    assert (n["top_units"], n["labelled"], n["agreeing"], n["agreement"]) == (2, 1, 0, 0.0)
    # benign: labelled 1 (coarse), 3 (mass), 0 (spiculated), 4 (coarse); benign plants coarse and mass
    # -> 3 of 4; specific (benign only): coarse twice -> 2 of 4 (mass is planted for malignant too)
    b = r["classes"]["benign"]
    assert b["labels"] == {1: "calc_coarse", 3: "mass", 0: "mass_spiculated_margin", 4: "calc_coarse"}
    assert (b["labelled"], b["agreeing"], b["agreement"]) == (4, 3, 0.75)
    assert (b["specific"], b["specific_agreement"]) == (2, 0.5)
    # malignant: labelled 0 (spiculated), 3 (mass): both planted; only spiculated is malignant-only
    m = r["classes"]["malignant"]
    assert (m["labelled"], m["agreement"], m["specific_agreement"]) == (2, 1.0, 0.5)
    # only the first `top` units of a class count; a class with no labelled unit has agreement None
    r2 = concept_discovery(atlas, top=1)
    assert r2["classes"]["normal"]["agreement"] is None and r2["classes"]["benign"]["agreement"] == 1.0
    # a given mapping replaces the phantoms' one
    r3 = concept_discovery(atlas, planted={"malignant": ["mass_spiculated_margin"]})
    assert r3["classes"]["malignant"]["agreement"] == 0.5 and r3["classes"]["benign"]["agreement"] == 0.0
    assert r3["planted_source"] == "given"
    # the atlas's own cut-off is used
    assert concept_discovery(tiny_atlas(iou, concepts, {"x": [0]}, min_label_iou=0.25))["detected"] == [concepts[0]]


def test_atlas_without_concepts_is_an_input_error():
    with pytest.raises(InputError, match="no concept IoU"):
        concept_discovery(tiny_atlas(np.zeros((3, 0)), [], {"normal": [0]}))


def test_planted_concepts_match_the_generator():
    planted = planted_concepts()
    assert set(planted) == set(CLASSES) and planted["normal"] == frozenset()
    assert {"mass_spiculated_margin", "spicules", "calc_fine_pleomorphic", "calc_fine_linear_branching",
            "architectural_distortion", "mass_irregular"} <= planted["malignant"]
    assert not {"mass_spiculated_margin", "calc_fine_pleomorphic", "architectural_distortion"} & planted["benign"]
    assert {"mass_circumscribed_margin", "calc_coarse", "calc_vascular"} <= planted["benign"]
    assert planted["benign"] | planted["malignant"] == set(PHANTOM_CONCEPTS)
    # what the generator actually draws (no mimic patients), over enough patients to see every combination
    seen: dict[str, set[str]] = {c: set() for c in CLASSES}
    for i in range(1000):
        for label in CLASSES:
            for f in draw_patient(7, i, label, overlap=0.0).findings:
                seen[label].update(f.concepts())
    assert {c: frozenset(v) for c, v in seen.items()} == planted


@pytest.mark.skipif(not (DEMO / "atlas.json").is_file(), reason="demo atlas not bundled")
def test_demo_atlas_invariants():
    atlas = Atlas.load(DEMO)
    r = concept_discovery(atlas)
    iou = atlas.arrays["iou"]
    names = atlas.meta["data"]["concepts"]
    assert list(r["concepts"]) == names
    for j, name in enumerate(names):
        d = r["concepts"][name]
        column_max = float(max(iou[u, j] for u in range(iou.shape[0])))
        assert d["iou"] == pytest.approx(column_max, abs=0)
        assert d["detected"] == (column_max >= MIN_LABEL_IOU)
        if d["unit"] is not None:
            assert iou[d["unit"], j] == column_max
    assert 0.0 <= r["detected_share"] <= 1.0
    assert r["detected_share"] == pytest.approx(np.mean([d["detected"] for d in r["concepts"].values()]))
    assert r["labelled_units"] == atlas.summary()["labelled_units"]
    for cls in atlas.classes:
        c = r["classes"][cls]
        assert c["top_units"] == min(TOP_UNITS, len(atlas.top_units(cls)))
        assert 0 <= c["specific"] <= c["agreeing"] <= c["labelled"] <= c["top_units"]
        for key in ("agreement", "specific_agreement"):
            assert c[key] is None or 0.0 <= c[key] <= 1.0
        assert set(c["labels"]) <= set(atlas.top_units(cls))
        for u, concept in c["labels"].items():
            assert atlas.suggested_label(u)[0] == concept
