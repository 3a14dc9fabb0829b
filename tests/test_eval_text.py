"""Greedy Matching Score (deepminer.evaluation.text): a hand-worked example on three 2-d vectors, the
word fallbacks, the tokeniser on DDSM report lines, and the real GloVe vectors."""
import json
import math

import numpy as np
import pytest

from deepminer.concepts import CONCEPTS
from deepminer.data.phantoms import Finding, report_line
from deepminer.evaluation.text import (DEEPMINER_GMS, FALLBACK_TABLE, WordVectors,
                                       explanation_text_agreement, greedy_matching_score, resolve,
                                       shared_vectors, tokenize)

R2 = 1 / math.sqrt(2)


class DictVectors:
    """A WordVectors stand-in: a dict of vectors."""

    def __init__(self, table):
        self.table = {w: np.asarray(v, dtype=np.float32) for w, v in table.items()}

    def vector(self, word):
        return self.table.get(word)


TINY = DictVectors({"a": (1, 0), "b": (0, 1), "c": (R2, R2)})


def test_hand_worked_gms():
    # A = [a, c], B = [b].  cos(a, b) = 0, cos(c, b) = 1/sqrt2.
    # A -> B: a's best match in B is b (0), c's is b (1/sqrt2): mean (0 + 0.7071) / 2 = 0.35355
    # B -> A: b's best match in A is c (1/sqrt2)                 : 0.70711
    # GMS = (0.35355 + 0.70711) / 2 = 0.53033
    r = greedy_matching_score(["a", "c"], ["b"], TINY)
    assert r.a_to_b == pytest.approx(R2 / 2)
    assert r.b_to_a == pytest.approx(R2)
    assert r.score == pytest.approx((R2 / 2 + R2) / 2) == pytest.approx(0.530330, abs=1e-6)
    assert r.oov_share == (0.0, 0.0) and r.fallbacks == {}
    # symmetric in its arguments (directions swap)
    s = greedy_matching_score(["b"], ["a", "c"], TINY)
    assert (s.a_to_b, s.b_to_a) == pytest.approx((r.b_to_a, r.a_to_b)) and s.score == pytest.approx(r.score)
    # A = [a, c], B = [a, b]: A->B (1 + 0.7071)/2, B->A (1 + 0.7071)/2, GMS 0.85355
    assert greedy_matching_score(["a", "c"], ["a", "b"], TINY).score == pytest.approx((1 + R2) / 2)


def test_identical_texts_score_one():
    assert greedy_matching_score(["a", "b", "c"], ["c", "b", "a"], TINY).score == pytest.approx(1.0)
    assert greedy_matching_score("irregular spiculated mass", "irregular spiculated mass",
                                 _glove_like()).score == pytest.approx(1.0)


def test_nan_when_a_side_has_no_usable_word():
    r = greedy_matching_score(["a"], ["zzzz"], TINY)
    assert math.isnan(r.score) and r.fallbacks == {"zzzz": "dropped"} and r.oov_share == (0.0, 1.0)
    r = greedy_matching_score([], ["a"], TINY)
    assert math.isnan(r.score) and math.isnan(r.oov_share[0])


def _glove_like():
    """A small vocabulary shaped like GloVe's: 'spiculated' is missing, its table entry is not."""
    rng = np.random.default_rng(0)
    words = ["spiky", "spicules", "irregular", "mass", "micro", "calcifications", "rod", "like", "lobular"]
    return DictVectors({w: rng.standard_normal(8) for w in words})


def test_fallback_table_used_and_reported_for_spiculated():
    vec = _glove_like()
    v, step, parts = resolve("spiculated", vec)
    assert step == "table" and parts == ("spiky", "spicules")
    u = [vec.vector(p) / np.linalg.norm(vec.vector(p)) for p in parts]
    np.testing.assert_allclose(v, np.mean(u, axis=0), rtol=1e-6)
    r = greedy_matching_score("LESION_TYPE MASS SHAPE IRREGULAR MARGINS SPICULATED", "spiculated mass", vec)
    assert r.fallbacks == {"spiculated": "table"}
    assert r.oov_share == pytest.approx((1 / 3, 1 / 2))
    # a table entry with only some parts known uses those; none known -> the later steps
    assert resolve("lobulated", vec)[1:] == ("table", ("lobular",))
    assert resolve("microcalcifications", vec)[1:] == ("table", ("micro", "calcifications"))


def test_split_prefix_and_dropped_steps():
    vec = DictVectors({"rod": (1, 0), "like": (0, 1), "calcif": (1, 1)})
    assert resolve("rodlike", vec)[1:] == ("table", ("rod", "like"))
    assert resolve("rodshape", DictVectors({"rod": (1, 0), "shape": (0, 1)}))[1:] == ("split", ("rod", "shape"))
    assert resolve("calcified", vec)[1:] == ("prefix", ("calcif",))        # 6 of 9 letters >= 60%
    assert resolve("calcifications", vec)[1:] == ("dropped", ())             # 6 of 14 letters: too short a stem
    r = greedy_matching_score(["rodshape", "rod"], ["rod"], DictVectors({"rod": (1, 0), "shape": (0, 1)}))
    assert r.fallbacks == {"rodshape": "split"} and r.oov_share == (0.5, 0.0)


def test_tokenize_ddsm_lines_and_concept_names():
    assert tokenize("LESION_TYPE MASS SHAPE IRREGULAR MARGINS SPICULATED") == ["mass", "irregular", "spiculated"]
    assert tokenize("LESION_TYPE CALCIFICATION TYPE PLEOMORPHIC DISTRIBUTION CLUSTERED; "
                    "LESION_TYPE MASS SHAPE ARCHITECTURAL_DISTORTION") == [
        "calcification", "pleomorphic", "clustered", "mass", "architectural", "distortion"]
    # CBIS-DDSM values: underscores and hyphens split, stop words dropped
    assert tokenize("TYPE ROUND_AND_REGULAR-PUNCTATE MARGINS ILL_DEFINED") == [
        "round", "regular", "punctate", "ill", "defined"]
    assert tokenize("mass_spiculated_margin") == ["mass", "spiculated", "margin"]
    assert tokenize("calc_fine_linear_branching") == ["calcification", "fine", "linear", "branching"]
    assert tokenize("Spicules (lines radiating from a mass)") == ["spicules", "lines", "radiating", "mass"]
    # lower-case words that spell a field are words, not fields
    assert tokenize("irregular shape") == ["irregular", "shape"]
    assert tokenize("") == []
    # a line the phantom generator writes
    f = Finding("mass", "malignant", 0.1, 0.5, 0.0, 1, shape="lobular", margin="microlobulated")
    assert tokenize(report_line([f])) == ["mass", "lobulated", "microlobulated"]


def test_explanation_text_agreement_top1_and_top8():
    vec = DictVectors({"x": (1, 0), "y": (0, 1), "z": (R2, R2)})  # TINY renamed: "a" is a stop word
    labels = ["x", "y", "z"] + ["y"] * 10
    out = explanation_text_agreement(labels, "x", vec)
    assert out["top1"] == pytest.approx(1.0)
    assert out["n_labels"] == 8
    # top8 = GMS([x, y, z, y, y, y, y, y], [x]): A->B (1 + 0 + R2 + 5 * 0) / 8, B->A 1
    assert out["top8"] == pytest.approx(((1 + R2) / 8 + 1) / 2)
    assert out["deepminer"] == DEEPMINER_GMS == {"top1": 0.627, "top8": 0.533}
    assert out["details"]["top8"]["a_words"] == ["x", "y", "z", "y", "y", "y", "y", "y"]
    assert out["details"]["top1"] == greedy_matching_score(["x"], ["x"], vec).to_dict()
    assert out["oov_share"] == 0.0 and out["fallbacks"] == {}
    json.dumps(out)  # JSON-able (a per-image record of the evaluation run)
    # the share of fallback words over labels + report of the top-8 comparison
    glove = _glove_like()
    out = explanation_text_agreement(["spiculated mass", "irregular"], "LESION_TYPE MASS MARGINS SPICULATED", glove)
    assert out["fallbacks"] == {"spiculated": "table"} and out["oov_share"] == pytest.approx(2 / 5)
    none = explanation_text_agreement([], "x", vec)
    assert math.isnan(none["top1"]) and math.isnan(none["top8"]) and none["n_labels"] == 0


def test_real_glove_loads_once_and_knows_the_vocabulary():
    """(How long the load takes is a row of ``deepminer bench``: ``word_vectors_load_s``.)"""
    wv = WordVectors.default()
    assert wv is WordVectors.default() is shared_vectors()
    v = wv.vector("mass")
    assert v is not None and v.shape == (50,) and v.dtype == np.float32
    assert len(wv) == 400_000 and wv.dim == 50 and "mass" in wv and wv.vector("spiculated") is None
    assert wv.load_seconds is not None  # loaded (once: the same instance above)
    # every word of the project's vocabulary resolves (GloVe or the table), none is dropped
    missing = {}
    for c in CONCEPTS:
        texts = [c.name, c.display, c.code_meaning] + [f"{f} {val}" for f, val in c.ddsm]
        for w in (w for t in texts for w in tokenize(t)):
            _, step, _ = resolve(w, wv)
            if step != "vocab":
                missing[w] = step
    assert missing == {"lobulated": "table", "microlobulated": "table", "rodlike": "table",
                       "spiculated": "table"}
    assert set(missing) <= set(FALLBACK_TABLE)
    out = explanation_text_agreement(["mass_spiculated_margin", "mass_irregular"],
                                     "LESION_TYPE MASS SHAPE IRREGULAR MARGINS SPICULATED", wv)
    assert 0.5 < out["top1"] <= out["top8"] <= 1.0 + 1e-9
    unrelated = greedy_matching_score("vascular calcification", "spiculated mass", wv).score
    related = greedy_matching_score("spiky mass", "spiculated mass", wv).score
    assert related > unrelated
