"""What a phantom shows, decided before anything is drawn: the patient draw (label, laterality,
density, exposure) and the findings with their label rule (``deepminer phantoms``; the renderer is
:mod:`deepminer.data.phantom_render`).

Findings (each with a 0/255 mask per concept, see :data:`PHANTOM_CONCEPTS`):

- masses: shape round / oval / lobular / irregular; margin circumscribed / obscured (partly hidden by
  overlapping tissue) / microlobulated / ill-defined / spiculated (a core with radiating spicules;
  ``spicules`` masks the lines alone);
- calcifications: benign coarse (popcorn), large rod-like, vascular (tram tracks along a vessel),
  round; malignant fine pleomorphic and fine-linear branching, always clustered;
- architectural distortion: thin lines radiating from a point, with the tissue pulled towards it.

**Label rule.** A finding *looks malignant* when it is a mass with an irregular shape or a
spiculated / ill-defined / microlobulated margin, fine pleomorphic or fine-linear branching clustered
calcifications, or an architectural distortion. It *looks benign* when it is a round / oval / lobular
mass with a circumscribed or obscured margin, or coarse / rod-like / vascular / round calcifications.
A patient's label is drawn first (``label_mix``, default 1/3 each); normal patients have no finding;
benign patients get 1-2 benign-looking findings and malignant patients 1-2 malignant-looking ones,
except that with probability ``overlap`` (default 5%, drawn from the patient's seed) a malignant
patient's findings look benign and a benign patient's look malignant. Every finding of a patient
carries the patient's pathology (lesion mask value 1 = benign, 2 = malignant) and the image label is
the patient's label; the report describes what the findings look like.

**Fairness.** Mass contrast and size, tissue density, exposure and the number of unreported tissue
islands and isolated punctate specks are drawn from the same distributions for every label (normal
images get one mass-sized tissue island more), so global statistics such as the intensity histogram
do not give the label away.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deepminer import CLASSES
from deepminer import concepts as _concepts
from deepminer.errors import InputError

VIEWS = ("CC", "MLO")
LATERALITIES = ("L", "R")
MASS_SHAPES = ("round", "oval", "lobular", "irregular")
MASS_MARGINS = ("circumscribed", "obscured", "microlobulated", "ill_defined", "spiculated")
CALC_TYPES = ("coarse", "rod_like", "vascular", "round", "fine_pleomorphic", "fine_linear_branching")
BENIGN_SHAPES = ("round", "oval", "lobular")
BENIGN_MARGINS = ("circumscribed", "obscured")
MALIGNANT_MARGINS = ("microlobulated", "ill_defined", "spiculated")
BENIGN_CALCS = ("coarse", "rod_like", "vascular", "round")
MALIGNANT_CALCS = ("fine_pleomorphic", "fine_linear_branching")
OVERLAP = 0.05
DEFAULT_SPLITS = {"train": 0.6, "val": 0.1, "test": 0.3, "holdout": 0.0}
DEFAULT_LABEL_MIX = {"normal": 1 / 3, "benign": 1 / 3, "malignant": 1 / 3}
ASPECT = 0.59  # width / height (portrait, like DDSM's 1536 x 908 scans)
MIN_SIZE, MAX_SIZE = 64, 8192
BITS = 12
CONTRAST = (0.2, 0.32)  # added density of masses and of unreported tissue islands, for every label
DENSITIES = ("A", "B", "C", "D")  # BI-RADS breast composition: fatty ... extremely dense

# the concepts this generator draws; every image gets a mask for each (all-zero when absent)
PHANTOM_CONCEPTS: tuple[str, ...] = tuple(c.name for c in _concepts.CONCEPTS)

_CALC_DISTRIBUTION = {"coarse": ("regional",), "rod_like": ("segmental",), "vascular": ("linear",),
                      "round": ("regional", "clustered"), "fine_pleomorphic": ("clustered",),
                      "fine_linear_branching": ("clustered",)}


# --------------------------------------------------------------------------- findings and labels
@dataclass(frozen=True)
class Finding:
    """One finding of a patient, the same in both views. ``kind`` is ``mass``, ``calcification`` or
    ``architectural_distortion``; ``size`` is its diameter as a fraction of the image width;
    ``u, v`` its place in breast coordinates (depth from the chest wall, 0..1; side, -1..1);
    ``pathology`` is benign/malignant; ``seed`` drives its details."""

    kind: str
    pathology: str
    size: float
    u: float
    v: float
    seed: int
    shape: str = ""
    margin: str = ""
    calc_type: str = ""
    distribution: str = ""

    @property
    def looks(self) -> str:
        """``malignant`` or ``benign`` by the documented rule (appearance, not pathology)."""
        return "malignant" if looks_malignant(self) else "benign"

    def concepts(self) -> list[str]:
        """The concept names this finding shows."""
        if self.kind == "mass":
            names = [f"mass_{self.shape}", f"mass_{self.margin}_margin", "mass"]
            return names + (["spicules"] if self.margin == "spiculated" else [])
        if self.kind == "calcification":
            return [f"calc_{self.calc_type}", f"calc_{self.distribution}", "calcification"]
        return ["architectural_distortion"]

    def report(self) -> str:
        """The DDSM-style keywords of this finding (e.g. ``LESION_TYPE MASS SHAPE OVAL MARGINS ...``)."""
        kw = lambda name: _concepts.get(name).ddsm[0][1]  # noqa: E731 - canonical DDSM keyword
        if self.kind == "mass":
            return (f"LESION_TYPE MASS SHAPE {kw('mass_' + self.shape)} "
                    f"MARGINS {kw('mass_' + self.margin + '_margin')}")
        if self.kind == "calcification":
            return (f"LESION_TYPE CALCIFICATION TYPE {kw('calc_' + self.calc_type)} "
                    f"DISTRIBUTION {kw('calc_' + self.distribution)}")
        return "LESION_TYPE MASS SHAPE ARCHITECTURAL_DISTORTION"


def looks_malignant(f: Finding) -> bool:
    """The label rule: irregular or spiculated/ill-defined/microlobulated masses, fine pleomorphic or
    fine-linear branching calcifications, and architectural distortion look malignant."""
    if f.kind == "mass":
        return f.shape == "irregular" or f.margin in MALIGNANT_MARGINS
    if f.kind == "calcification":
        return f.calc_type in MALIGNANT_CALCS
    return True


def report_line(findings: Sequence[Finding]) -> str:
    """The image's DDSM-style report: one lesion description per finding, joined by ``; ``."""
    return "; ".join(f.report() for f in findings)


@dataclass(frozen=True)
class Patient:
    """What both views of a patient share."""

    index: int
    label: str
    laterality: str
    density: str
    dense_fraction: float
    fat: float
    gland: float
    gain: float
    core: float
    background: float
    findings: tuple[Finding, ...]
    mimic: bool  # True when the findings look like the other class (the documented overlap)

    @property
    def patient_id(self) -> str:
        return patient_id(self.index)


def patient_id(index: int) -> str:
    return f"P{index:05d}"


def image_id(index: int, laterality: str, view: str) -> str:
    return f"{patient_id(index)}_{laterality}_{view}"


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(stream)])


def _draw_finding(rng: np.random.Generator, looks: str, pathology: str, kind: str) -> Finding:
    # drawn in this order for every kind (u, v, then the detail seed): the phantoms depend on it
    u = float(rng.uniform(0.22, 0.78))
    v = float(rng.uniform(-0.6, 0.6))
    detail_seed = int(rng.integers(2**31))
    if kind == "mass":
        if looks == "benign":
            shape = str(rng.choice(BENIGN_SHAPES))
            margin = str(rng.choice(BENIGN_MARGINS, p=[0.6, 0.4]))
        else:
            shape = "irregular" if rng.random() < 0.5 else str(rng.choice(BENIGN_SHAPES))
            margin = str(rng.choice(MALIGNANT_MARGINS, p=[0.3, 0.3, 0.4]))
        return Finding("mass", pathology=pathology, size=float(rng.uniform(0.05, 0.12)), u=u, v=v,
                       seed=detail_seed, shape=shape, margin=margin)
    if kind == "calcification":
        ctype = str(rng.choice(BENIGN_CALCS if looks == "benign" else MALIGNANT_CALCS))
        dist = _CALC_DISTRIBUTION[ctype]
        distribution = dist[0] if len(dist) == 1 else str(rng.choice(dist, p=[0.6, 0.4]))
        size = float(rng.uniform(0.05, 0.1)) if ctype != "vascular" else float(rng.uniform(0.1, 0.16))
        return Finding("calcification", pathology=pathology, size=size, u=u, v=v, seed=detail_seed,
                       calc_type=ctype, distribution=distribution)
    return Finding("architectural_distortion", pathology=pathology, size=float(rng.uniform(0.08, 0.13)), u=u, v=v,
                   seed=detail_seed)


def draw_patient(seed: int, index: int, label: str | None = None, *, overlap: float = OVERLAP,
                 label_mix: dict[str, float] | None = None) -> Patient:
    """The patient-level draw (label, laterality, density, exposure, findings) for ``(seed, index)``."""
    rng = _rng(seed, index, 0)
    anatomy = _rng(seed, index, 1)  # label-independent by construction
    mix = label_mix or DEFAULT_LABEL_MIX
    lab = rng.choice(CLASSES, p=np.array([mix[c] for c in CLASSES]) / sum(mix.values()))
    label = label or str(lab)
    if label not in CLASSES:
        raise InputError(f"label: {label!r} not in {'/'.join(CLASSES)}")
    mimic = bool(rng.random() < overlap) and label != "normal"
    findings: list[Finding] = []
    if label != "normal":
        looks = label if not mimic else ("benign" if label == "malignant" else "malignant")
        n = 1 + int(rng.random() < 0.2)
        kinds_p = ([0.55, 0.45, 0.0] if looks == "benign" else [0.45, 0.4, 0.15])
        for _ in range(n):
            kind = str(rng.choice(("mass", "calcification", "architectural_distortion"), p=kinds_p))
            findings.append(_draw_finding(rng, looks, label, kind))
    dens = int(anatomy.choice(4, p=[0.15, 0.4, 0.35, 0.1]))
    lo, hi = [(0.05, 0.15), (0.15, 0.35), (0.35, 0.6), (0.6, 0.8)][dens]
    fat = float(anatomy.uniform(0.26, 0.34))
    return Patient(index=index, label=label, laterality=str(anatomy.choice(LATERALITIES)),
                   density=DENSITIES[dens], dense_fraction=float(anatomy.uniform(lo, hi)), fat=fat,
                   gland=fat + float(anatomy.uniform(0.18, 0.26)), gain=float(anatomy.uniform(3000, 3900)),
                   core=float(anatomy.uniform(0.04, 0.14)),
                   background=float(anatomy.uniform(20, 60)), findings=tuple(findings), mimic=mimic)
