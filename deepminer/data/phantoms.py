"""Phantom mammograms with ground-truth concept masks (``deepminer phantoms``).

Each patient is one breast (laterality L or R) seen in a CC and an MLO view. An image is a digitized-
film-like 16-bit PNG (12 bits used, brighter = denser, background near 0): a breast outline with a
skin line and a nipple, the pectoral muscle in the top chest-wall corner of MLO views, fatty to
extremely dense fibroglandular tissue (a 1/f^3 power-law texture, the exponent published breast-
texture models use, thresholded inside a density envelope), thin curved vessels, and the findings.
The chest wall is on the left of left breasts and on the right of right breasts (mirror images).

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

**Determinism.** Every image is drawn from generators seeded by ``(seed, patient, stream)`` only, so
images can be made in any order and the same arguments give the same bytes.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from deepminer import CLASSES
from deepminer import concepts as _concepts
from deepminer.data.io import png16  # the one 16-bit PNG writer (re-exported here, its old home)
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


# --------------------------------------------------------------------------- the phantom
@dataclass
class Phantom:
    """One rendered image: ``image`` uint16 (H, W) with 12 bits used; ``masks`` concept -> bool (H, W)
    for every concept in :data:`PHANTOM_CONCEPTS`; ``lesion`` uint8 (0 none, 1 benign, 2 malignant);
    ``breast`` and ``pectoral`` bool masks; the label, DDSM-style report, view and laterality."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    lesion: np.ndarray
    label: str
    report: str
    view: str
    laterality: str
    breast: np.ndarray
    pectoral: np.ndarray
    patient: Patient
    findings: tuple[Finding, ...] = ()
    centers: list[tuple[float, float]] = field(default_factory=list)  # finding centres (x, y) in pixels

    @property
    def image_id(self) -> str:
        return image_id(self.patient.index, self.laterality, self.view)


# --------------------------------------------------------------------------- drawing primitives
def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _box(cx: float, cy: float, r: float, shape: tuple[int, int]):
    """Slices of the square of half-side ``r`` around (cx, cy), clipped to the image, and its origin."""
    h, w = shape
    x0, x1 = max(int(math.floor(cx - r)), 0), min(int(math.ceil(cx + r)) + 1, w)
    y0, y1 = max(int(math.floor(cy - r)), 0), min(int(math.ceil(cy + r)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    return (slice(y0, y1), slice(x0, x1)), x0, y0


def _local_grid(sl):
    """Pixel-centre coordinates (xs row, ys column) of a window of the image."""
    ys = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None]
    xs = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :]
    return xs, ys


def _stroke(canvas: np.ndarray, mask: np.ndarray | None, pts: np.ndarray, radii, values,
            soft: bool = False) -> None:
    """Draw an anti-aliased polyline with per-vertex radius and value into ``canvas`` (max-composite)
    and mark the pixels within its radius in ``mask``."""
    pts = np.asarray(pts, dtype=np.float64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), (len(pts),))
    for i in range(len(pts) - 1):
        (ax, ay), (bx, by) = pts[i], pts[i + 1]
        pad = max(radii[i], radii[i + 1]) * (1.6 if soft else 1.0) + 1.5
        b = _box((ax + bx) / 2, (ay + by) / 2, pad + max(abs(bx - ax), abs(by - ay)) / 2, canvas.shape)
        if b is None:
            continue
        sl, x0, y0 = b
        xs, ys = _local_grid(sl)
        px, py, dx, dy = xs - ax, ys - ay, bx - ax, by - ay
        l2 = dx * dx + dy * dy
        t = np.clip((px * dx + py * dy) / l2, 0.0, 1.0) if l2 > 1e-9 else np.zeros_like(px + py)
        dist = np.hypot(px - t * dx, py - t * dy)
        r = radii[i] + (radii[i + 1] - radii[i]) * t
        v = values[i] + (values[i + 1] - values[i]) * t
        if soft:
            cov = np.clip(1.0 - (dist / (r + 0.8)) ** 2, 0.0, 1.0)
        else:
            cov = np.clip(r - dist + 0.5, 0.0, 1.0)
        np.maximum(canvas[sl], (cov * v).astype(np.float32), out=canvas[sl])
        if mask is not None:
            mask[sl] |= dist <= np.maximum(r, 0.5)


def _disc(canvas: np.ndarray, mask: np.ndarray | None, cx: float, cy: float, r: float, value: float):
    _stroke(canvas, mask, np.array([[cx, cy], [cx, cy]]), r, value)


def _fill_polygon(mask: np.ndarray, xy: np.ndarray) -> None:
    from skimage.draw import polygon

    rr, cc = polygon(xy[:, 1], xy[:, 0], shape=mask.shape)
    mask[rr, cc] = True


def _hull_region(mask: np.ndarray, pts: np.ndarray, pad: float) -> None:
    """Fill the convex hull of ``pts`` grown by ``pad`` pixels (a calcification group's region)."""
    pts = np.asarray(pts, dtype=np.float64)
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = (pts[:, None, :] + pad * np.stack([np.cos(ang), np.sin(ang)], -1)[None]).reshape(-1, 2)
    from scipy.spatial import ConvexHull

    try:
        hull = ring[ConvexHull(ring).vertices]
    except Exception:  # noqa: BLE001 - Qhull fails on degenerate input (points on a line): fall back to discs
        hull = ring
    _fill_polygon(mask, hull)


def _radius_fn(rng: np.random.Generator, shape: str, margin: str, r0: float):
    """R(theta) of a mass outline as (cos, sin) Fourier terms; returns a vectorised function."""
    terms: list[tuple[int, float, float]] = []
    aspect, phi = 1.0, float(rng.uniform(0, np.pi))
    if shape == "round":
        terms += [(k, float(rng.normal(0, 0.015)), float(rng.normal(0, 0.015))) for k in (2, 3)]
    elif shape == "oval":
        aspect = float(rng.uniform(1.35, 1.8))
    elif shape == "lobular":
        n = int(rng.integers(3, 6))
        terms.append((n, float(rng.uniform(0.13, 0.2)), 0.0))
        terms += [(k, float(rng.normal(0, 0.02)), float(rng.normal(0, 0.02))) for k in (2, 3)]
    else:  # irregular
        terms += [(k, float(rng.normal(0, 0.16 / k ** 0.6)), float(rng.normal(0, 0.16 / k ** 0.6)))
                  for k in range(2, 9)]
    micro = None
    if margin == "ill_defined":  # a ragged outline under the blur
        terms += [(k, float(rng.normal(0, 0.05)), float(rng.normal(0, 0.05))) for k in range(5, 12)]
    if margin == "microlobulated":
        micro = (int(rng.integers(14, 22)), float(rng.uniform(0.05, 0.08)), float(rng.uniform(0, np.pi)))
    lob_phase = float(rng.uniform(0, 2 * np.pi))

    def radius(theta: np.ndarray) -> np.ndarray:
        t = theta - phi
        if aspect != 1.0:
            a, b = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
            base = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
        else:
            base = np.full_like(t, r0)
        f = np.ones_like(t)
        for k, ca, sa in terms:
            f += ca * np.cos(k * t + (lob_phase if ca > 0.1 else 0.0)) + sa * np.sin(k * t)
        if micro is not None:
            k, amp, ph = micro
            f += amp * (np.abs(np.sin(k * t / 2 + ph)) - 0.6)
        return base * np.maximum(f, 0.45)

    return radius


# --------------------------------------------------------------------------- noise fields
def _nice(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    for a3 in (1, 3, 9, 27):
        for a5 in (1, 5, 25):
            m = a3 * a5
            p = 1
            while p * m < n:
                p *= 2
            best = min(best, p * m)
    return best


@lru_cache(maxsize=8)
def _powerlaw_amp(gh: int, gw: int, beta: float, stretch: float = 1.0) -> np.ndarray:
    fy = np.fft.fftfreq(gh)[:, None]
    fx = np.fft.fftfreq(gw)[None, :] * stretch
    f0 = 1.0 / max(gh, gw)
    amp = (fx * fx + fy * fy + f0 * f0) ** (-beta / 4.0)
    amp[0, 0] = 0.0
    amp *= gh * gw / np.sqrt((amp ** 2).sum())  # unit variance of the real and imaginary parts
    amp.setflags(write=False)
    return amp.astype(np.float32)


def powerlaw_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float = 3.0,
                   scale: int = 2, stretch: float = 1.0, pair: bool = True) -> tuple[np.ndarray, ...]:
    """Two independent zero-mean, unit-variance Gaussian fields of shape (H, W) with power spectrum
    1/f^beta, made by one FFT on a grid ``scale`` times coarser and upsampled bilinearly; ``stretch``
    > 1 elongates the structures along x (ducts and ligaments run towards the nipple). With
    ``pair=False`` only the first field is returned (a 1-tuple)."""
    import scipy.fft
    from PIL import Image

    h, w = shape
    sh, sw = max(8, -(-h // scale)), max(8, -(-w // scale))
    gh, gw = _nice(sh), _nice(sw)
    amp = _powerlaw_amp(gh, gw, float(beta), float(stretch))
    spec = (rng.standard_normal((gh, gw), dtype=np.float32)
            + 1j * rng.standard_normal((gh, gw), dtype=np.float32)).astype(np.complex64) * amp
    field = scipy.fft.ifft2(spec, workers=1)[:sh, :sw]
    out = []
    for part in (field.real, field.imag)[: 2 if pair else 1]:
        small = np.ascontiguousarray(part, dtype=np.float32)
        out.append(np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BILINEAR)))
    return tuple(out)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    small = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


@lru_cache(maxsize=4)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


# --------------------------------------------------------------------------- anatomy
class _Breast:
    """The geometry of one view in canonical orientation (chest wall at x = 0)."""

    def __init__(self, rng: np.random.Generator, view: str, h: int, w: int):
        self.h, self.w, self.view = h, w, view
        self.s = h / 1024.0
        xs, ys = _grid(h, w)
        if view == "CC":
            self.cx = -w * rng.uniform(0.02, 0.1)
            self.cy = h * rng.uniform(0.46, 0.54)
            self.a = w * rng.uniform(0.8, 0.95) - self.cx
            self.b_up = h * rng.uniform(0.36, 0.43)
            self.b_lo = h * rng.uniform(0.36, 0.43)
            self.alpha = math.radians(rng.uniform(-6, 6))
        else:
            self.cx = -w * rng.uniform(0.04, 0.12)
            self.cy = h * rng.uniform(0.40, 0.47)
            self.a = w * rng.uniform(0.78, 0.92) - self.cx
            self.b_up = h * rng.uniform(0.6, 0.75)
            self.b_lo = h * rng.uniform(0.38, 0.46)
            self.alpha = math.radians(rng.uniform(8, 20))
        ca, sa = math.cos(self.alpha), math.sin(self.alpha)
        dx, dy = xs - np.float32(self.cx), ys - np.float32(self.cy)
        u = dx * np.float32(ca) + dy * np.float32(sa)
        v = dy * np.float32(ca) - dx * np.float32(sa)
        bv = np.where(v < 0, np.float32(self.b_up), np.float32(self.b_lo))
        ua, vb = u / np.float32(self.a), v / bv
        rho = np.sqrt(ua * ua + vb * vb)
        grad = np.sqrt((ua / np.float32(self.a)) ** 2 + (vb / bv) ** 2) / np.maximum(rho, 1e-3)
        wobble = _smooth_noise(rng, (h, w), (6, 4)) * np.float32(rng.uniform(0.01, 0.02))
        rho = rho * (1 + wobble)
        d = (1 - rho) / np.maximum(grad, 1e-6)
        # nipple: a small bump at the tip of the long axis
        self.rn = h * rng.uniform(0.008, 0.014)
        self.nipple = None
        tx, ty = self.cx + self.a * ca, self.cy + self.a * sa
        self.tip = (tx, ty)
        b = _box(tx, ty, self.rn + 4, (h, w))
        if b is not None:
            sl, _, _ = b
            lx, ly = _local_grid(sl)
            dn = np.float32(self.rn) - np.hypot(lx - tx, ly - ty)
            np.maximum(d[sl], dn, out=d[sl])
            self.nipple = (sl, _smoothstep(dn / np.float32(0.5 * self.rn)))
        self.rho, self.d, self.u = rho, d, u
        self.breast = d > 0
        # pectoral muscle (MLO): a slightly convex triangle in the top chest-wall corner
        self.pect = np.zeros((h, w), np.float32)
        self.pect_depth = np.zeros((h, w), np.float32)
        self.pt = self.pl = 0.0
        if view == "MLO":
            row = np.nonzero(self.breast[0])[0]
            x_top = float(row.max()) if row.size else 0.3 * w
            self.pt = max(8.0, x_top * rng.uniform(0.5, 0.8))
            self.pl = h * rng.uniform(0.3, 0.48)
            gam = rng.uniform(1.0, 1.2)
            b = _box(self.pt / 2, self.pl / 2, max(self.pt, self.pl) / 2 + 6 * self.s, (h, w))
            sl, _, _ = b
            lx, ly = _local_grid(sl)
            f = (lx / np.float32(self.pt)) ** gam + (ly / np.float32(self.pl)) ** gam
            edge = min(self.pt, self.pl) / (gam * 2.0 * max(self.s, 0.5))
            self.pect[sl] = np.clip(0.5 + (1 - f) * np.float32(edge), 0, 1)
            self.pect_depth[sl] = np.clip(1 - f, 0, 1)  # 0 at the muscle's edge, 1 in the corner
            self.breast |= self.pect > 0.5
        self.pectoral = self.pect > 0.5

    def point(self, u: float, v: float) -> tuple[float, float]:
        """Pixel position of breast coordinates (u = depth fraction along the axis, v = side -1..1)."""
        b = self.b_up if v < 0 else self.b_lo
        pu, pv = u * self.a, v * b * math.sqrt(max(0.0, 1 - u * u))
        ca, sa = math.cos(self.alpha), math.sin(self.alpha)
        return self.cx + pu * ca - pv * sa, self.cy + pu * sa + pv * ca

    def depth_at(self, x: float, y: float) -> float:
        xi, yi = int(round(x)), int(round(y))
        if not (0 <= xi < self.w and 0 <= yi < self.h):
            return -1.0
        return float(self.d[yi, xi])

    def free(self, x: float, y: float, r: float) -> bool:
        """True when a disc of radius r at (x, y) lies inside the breast, off the pectoral muscle."""
        if self.depth_at(x, y) < r + 4 * self.s or x < 0.06 * self.w:
            return False
        for ox, oy in ((0, 0), (r, 0), (-r, 0), (0, r), (0, -r)):
            xi, yi = int(round(x + ox)), int(round(y + oy))
            if not (0 <= xi < self.w and 0 <= yi < self.h) or self.pect[yi, xi] > 0:
                return False
        return True


# --------------------------------------------------------------------------- the renderer
class _Canvas:
    """Layers of one image being drawn."""

    def __init__(self, geo: _Breast, tex: np.ndarray):
        self.geo = geo
        self.h, self.w, self.s = geo.h, geo.w, geo.s
        self.add = np.zeros((geo.h, geo.w), np.float32)      # mass-like additive density
        self.lines = np.zeros((geo.h, geo.w), np.float32)    # thin structures (max-composited)
        self.calc = np.zeros((geo.h, geo.w), np.float32)     # calcifications (max-composited)
        self.boost = np.zeros((geo.h, geo.w), np.float32)    # unreported islands (scale the tissue)
        self.tex = tex
        self.masks: dict[str, np.ndarray] = {}
        self.lesion = np.zeros((geo.h, geo.w), np.uint8)
        self.taken: list[tuple[float, float, float]] = []

    def mask(self, name: str) -> np.ndarray:
        if name not in self.masks:
            self.masks[name] = np.zeros((self.h, self.w), bool)
        return self.masks[name]

    def place(self, rng: np.random.Generator, u: float, v: float, r: float) -> tuple[float, float]:
        """A free spot near breast coordinates (u, v) for a finding of radius r."""
        for attempt in range(60):
            if attempt:
                u = float(np.clip(u + rng.normal(0, 0.12), 0.15, 0.85))
                v = float(np.clip(v + rng.normal(0, 0.25), -0.75, 0.75))
            x, y = self.geo.point(u, v)
            rr = r if attempt < 40 else r * 0.6
            if self.geo.free(x, y, rr) and all(math.hypot(x - tx, y - ty) > rr + tr + 4 * self.s
                                               for tx, ty, tr in self.taken):
                self.taken.append((x, y, r))
                return x, y
        x, y = self.geo.point(0.5, 0.0)  # the breast centre always exists
        self.taken.append((x, y, r))
        return x, y


def _blob(cv: _Canvas, cx, cy, radius_fn, r0, contrast, edge, sector=None, texture=0.08,
          mask_names: Sequence[str] = (), lesion_value: int = 0, layer: np.ndarray | None = None,
          shift: float = 0.0) -> np.ndarray | None:
    """A mass-like density: r/R(theta) profile with edge width ``edge`` pixels (optionally wider in a
    sector), dome-shaped body; writes its nominal outline into the named masks."""
    b = _box(cx, cy, r0 * 1.8 + edge + 3, (cv.h, cv.w))
    if b is None:
        return None
    sl, _, _ = b
    xs, ys = _local_grid(sl)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    R = radius_fn(theta).astype(np.float32)
    ew = np.full_like(R, max(edge, 0.7))
    if sector is not None:
        c0, half, extra = sector
        dth = np.abs(np.angle(np.exp(1j * (theta - c0))))
        ew = ew + np.float32(extra) * _smoothstep((half - dth) / (0.4 * half)).astype(np.float32)
    prof = _smoothstep(0.5 + (R + np.float32(shift) - r) / ew)
    rho = r / R
    body = 0.8 + 0.2 * np.sqrt(np.clip(1 - rho * rho, 0, 1))
    body = body * (1 + np.float32(texture) * cv.tex[sl])
    (cv.add if layer is None else layer)[sl] += (np.float32(contrast) * prof * body).astype(np.float32)
    inside = (r <= R) & cv.geo.breast[sl]
    for name in mask_names:
        cv.mask(name)[sl] |= inside
    if lesion_value:
        cv.lesion[sl][inside] = lesion_value
    return inside


def _render_mass(cv: _Canvas, f: Finding, rng: np.random.Generator, contrast: float, value: int):
    r0 = f.size * cv.w / 2
    reach = r0 * (2.6 if f.margin == "spiculated" else 1.1)
    cx, cy = cv.place(rng, f.u, f.v, reach)
    fr = np.random.default_rng(f.seed)  # same outline in both views
    radius_fn = _radius_fn(fr, f.shape, f.margin, r0)
    edge = {"circumscribed": 0.8 * cv.s, "obscured": 0.8 * cv.s, "microlobulated": 0.8 * cv.s,
            "ill_defined": 1.1 * r0, "spiculated": 0.15 * r0}[f.margin]
    sector = None
    if f.margin == "obscured":  # part of the margin hidden by overlapping fibroglandular tissue
        c0 = float(rng.uniform(-np.pi, np.pi))
        half = float(rng.uniform(0.45, 0.8)) * np.pi / 2
        sector = (c0, half, 0.5 * r0)
        ox, oy = cx + r0 * 1.05 * math.cos(c0), cy + r0 * 1.05 * math.sin(c0)
        r1 = r0 * rng.uniform(0.6, 0.8)
        isl = _radius_fn(rng, "oval", "", r1)
        _blob(cv, ox, oy, isl, r1, contrast * rng.uniform(0.6, 0.8), 0.6 * r1, texture=0.15)
    names = [f"mass_{f.shape}", f"mass_{f.margin}_margin", "mass"]
    _blob(cv, cx, cy, radius_fn, r0, contrast, edge, sector, mask_names=names,
          lesion_value=value, shift=0.2 * r0 if f.margin == "ill_defined" else 0.0)
    if f.margin == "spiculated":
        _spicules(cv, rng, cx, cy, radius_fn, r0, contrast, value)
    return cx, cy


def _spicules(cv: _Canvas, rng, cx, cy, radius_fn, r0, contrast, value):
    n = int(rng.integers(8, 19))
    angles = np.sort((np.arange(n) + rng.uniform(-0.4, 0.4, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi))
    spic = np.zeros((cv.h, cv.w), bool)
    base_r = radius_fn(angles)
    for ang, rb in zip(angles, base_r):
        length = r0 * rng.uniform(0.5, 1.8)
        k = 7
        steps = np.linspace(0, 1, k)
        drift = np.cumsum(rng.normal(0, 0.05, k))
        rad = rb * 0.96 + steps * (length + rb * 0.04)
        th = ang + drift * 0.5
        pts = np.stack([cx + rad * np.cos(th), cy + rad * np.sin(th)], -1)
        w0 = max(1.3 * cv.s * rng.uniform(0.9, 1.4), 0.55)
        radii = w0 * (1 - 0.75 * steps)
        vals = contrast * rng.uniform(0.55, 0.85) * (1 - 0.6 * steps)
        _stroke(cv.lines, spic, pts, radii, vals)
    b = _box(cx, cy, r0 * 3.2, (cv.h, cv.w))
    sl, _, _ = b
    xs, ys = _local_grid(sl)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    rho = np.hypot(dx, dy) / radius_fn(np.arctan2(dy, dx)).astype(np.float32)
    local = spic[sl] & (rho > 0.9) & cv.geo.breast[sl]
    spic[:] = False
    spic[sl] = local
    cv.mask("spicules")[:] |= spic
    cv.lesion[spic & (cv.lesion == 0)] = value


def _calc_group(cv: _Canvas, f: Finding, rng: np.random.Generator, value: int):
    s = cv.s
    R = f.size * cv.w / 2
    cx, cy = cv.place(rng, f.u, f.v, R)
    t = f.calc_type
    dots = np.zeros((cv.h, cv.w), bool)
    centres: list[tuple[float, float]] = []
    bright = lambda: float(rng.uniform(0.22, 0.4))  # noqa: E731 - a fresh brightness draw at each use, kept beside them
    # towards the nipple: the direction of the ducts
    nip = cv.geo.tip
    duct = math.atan2(nip[1] - cy, nip[0] - cx)
    if t == "coarse":
        for _ in range(int(rng.integers(1, 4))):
            px, py = cx + rng.normal(0, R * 0.35), cy + rng.normal(0, R * 0.35)
            for _ in range(int(rng.integers(4, 9))):
                qx, qy = px + rng.normal(0, 3.5 * s), py + rng.normal(0, 3.5 * s)
                _disc(cv.calc, dots, qx, qy, max(rng.uniform(2.5, 4.5) * s, 0.6), bright() + 0.05)
                centres.append((qx, qy))
    elif t == "rod_like":
        for _ in range(int(rng.integers(3, 8))):
            px, py = cx + rng.normal(0, R * 0.4), cy + rng.normal(0, R * 0.4)
            a = duct + rng.normal(0, 0.25)
            ln = rng.uniform(12, 35) * s / 2
            pts = np.array([[px - ln * math.cos(a), py - ln * math.sin(a)],
                            [px + ln * math.cos(a), py + ln * math.sin(a)]])
            _stroke(cv.calc, dots, pts, max(rng.uniform(1.6, 2.6) * s, 0.6), bright())
            centres += [tuple(p) for p in pts]
    elif t == "vascular":
        a = duct + rng.normal(0, 0.3)
        k = 12
        st = np.linspace(-R, R, k)
        wig = np.cumsum(rng.normal(0, 0.03, k))
        ang = a + wig
        xs = cx + np.cumsum(np.r_[0, np.diff(st)] * np.cos(ang)) - R * math.cos(a)
        ys = cy + np.cumsum(np.r_[0, np.diff(st)] * np.sin(ang)) - R * math.sin(a)
        path = np.stack([xs, ys], -1)
        vr = max(1.8 * s, 0.7)
        _stroke(cv.lines, None, path, vr, 0.07, soft=True)  # the vessel itself
        nrm = np.stack([-np.sin(ang), np.cos(ang)], -1)
        for side in (-1, 1):
            track = path + side * (vr + 0.6 * s) * nrm
            i = 0
            while i < k - 1:  # dashed tram-track
                j = min(k, i + int(rng.integers(2, 5)))
                _stroke(cv.calc, dots, track[i:j], max(rng.uniform(0.9, 1.4) * s, 0.55), bright())
                i = j + int(rng.integers(0, 2))
        centres += [tuple(p) for p in path]
    elif t == "round":
        for _ in range(int(rng.integers(4, 11))):
            px, py = cx + rng.uniform(-1, 1) * R * 0.7, cy + rng.uniform(-1, 1) * R * 0.7
            _disc(cv.calc, dots, px, py, max(rng.uniform(1.8, 3.2) * s, 0.6), bright())
            centres.append((px, py))
    elif t == "fine_pleomorphic":
        for _ in range(int(rng.integers(10, 26))):
            px, py = cx + rng.normal(0, R * 0.35), cy + rng.normal(0, R * 0.35)
            m = int(rng.integers(1, 4))
            pts = np.array([[px, py]] + [[px + rng.normal(0, 1.8 * s), py + rng.normal(0, 1.8 * s)]
                                         for _ in range(m)])
            _stroke(cv.calc, dots, pts, max(rng.uniform(0.9, 2.2) * s, 0.5), bright())
            centres.append((px, py))
    else:  # fine_linear_branching: broken thin casts along a branching duct tree
        stack = [(cx - R * 0.8 * math.cos(duct), cy - R * 0.8 * math.sin(duct), duct, R * 1.5, 0)]
        while stack:
            x, y, a, ln, depth = stack.pop()
            k = max(3, int(ln / (4 * s)))
            step = ln / k
            cast: list[tuple[float, float]] = [(x, y)]
            for _ in range(k):
                a += rng.normal(0, 0.12)
                x, y = x + step * math.cos(a), y + step * math.sin(a)
                cast.append((x, y))
            pts = np.array(cast)
            i = 0
            while i < len(pts) - 1:
                j = min(len(pts), i + int(rng.integers(2, 4)))
                _stroke(cv.calc, dots, pts[i:j], max(rng.uniform(0.8, 1.3) * s, 0.5), bright())
                i = j
            centres += [tuple(p) for p in pts]
            if depth < 2:
                for side in (-1, 1):
                    if rng.random() < 0.75:
                        bi = int(rng.integers(1, len(pts) - 1))
                        stack.append((pts[bi][0], pts[bi][1], a + side * rng.uniform(0.35, 0.8),
                                      ln * rng.uniform(0.45, 0.7), depth + 1))
    dots &= cv.geo.breast
    region = np.zeros((cv.h, cv.w), bool)
    _hull_region(region, np.array(centres), pad=4 * s + 1)
    region &= cv.geo.breast
    region |= dots
    cv.mask(f"calc_{t}")[:] |= dots
    cv.mask("calcification")[:] |= dots
    cv.mask(f"calc_{f.distribution}")[:] |= region
    cv.lesion[region & (cv.lesion == 0)] = value
    return cx, cy


def _render_distortion(cv: _Canvas, f: Finding, rng: np.random.Generator, value: int, image_pull: list):
    R = f.size * cv.w / 2
    cx, cy = cv.place(rng, f.u, f.v, R)
    image_pull.append((cx, cy, R, float(rng.uniform(0.25, 0.4))))
    n = int(rng.integers(14, 26))
    angles = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * 2 * np.pi / n
    ends = []
    for ang in angles:
        ln = R * rng.uniform(0.7, 1.0)
        steps = np.linspace(0, 1, 6)
        r = R * 0.08 + steps * ln
        th = ang + np.cumsum(rng.normal(0, 0.04, 6))
        pts = np.stack([cx + r * np.cos(th), cy + r * np.sin(th)], -1)
        _stroke(cv.lines, None, pts, max(1.0 * cv.s, 0.5) * (1 - 0.6 * steps),
                float(rng.uniform(0.09, 0.14)) * (1 - 0.5 * steps))
        ends.append(pts[-1])
    region = np.zeros((cv.h, cv.w), bool)
    _fill_polygon(region, np.array(ends))
    region &= cv.geo.breast
    cv.mask("architectural_distortion")[:] |= region
    cv.lesion[region & (cv.lesion == 0)] = value
    return cx, cy


def _pull(img: np.ndarray, cx: float, cy: float, R: float, k: float) -> None:
    """Warp tissue towards (cx, cy): what lay at radius r(1 + k g(r)) now shows at r."""
    from scipy.ndimage import map_coordinates

    b = _box(cx, cy, R * 1.4, img.shape)
    if b is None:
        return
    sl, _, _ = b
    xs, ys = _local_grid(sl)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    r = np.hypot(dx, dy)
    g = 1 + k * np.exp(-(r / (0.7 * R)) ** 2)
    sy = np.broadcast_to(cy + dy * g, r.shape)
    sx = np.broadcast_to(cx + dx * g, r.shape)
    img[sl] = map_coordinates(img, [sy, sx], order=1, mode="nearest")


def _vessels(cv: _Canvas, rng: np.random.Generator) -> None:
    geo, s = cv.geo, cv.s
    for _ in range(int(rng.integers(2, 6))):
        y = geo.cy + rng.uniform(-0.7, 0.7) * (geo.b_up if rng.random() < 0.5 else geo.b_lo) * 0.8
        x = geo.w * rng.uniform(0.02, 0.1)
        if geo.view == "MLO":
            y = max(y, geo.pl * 0.9)
        if geo.depth_at(x, y) <= 0:
            continue
        a = math.atan2(geo.tip[1] - y, geo.tip[0] - x) + rng.normal(0, 0.25)
        step = 10 * s + 1
        n = int(geo.w * rng.uniform(0.5, 0.9) / step)
        trail = [(x, y)]
        turn = 0.0
        for _ in range(n):
            turn = 0.8 * turn + rng.normal(0, 0.07)
            a += turn
            x, y = x + step * math.cos(a), y + step * math.sin(a)
            if geo.depth_at(x, y) < 3 * s:
                break
            trail.append((x, y))
        if len(trail) < 3:
            continue
        pts = np.array(trail)
        t = np.linspace(0, 1, len(pts))
        r0 = max(rng.uniform(1.0, 2.0) * s, 0.5)
        _stroke(cv.lines, None, pts, r0 * (1 - 0.5 * t), float(rng.uniform(0.035, 0.065)) * (1 - 0.4 * t),
                soft=True)


def _island(cv: _Canvas, rng: np.random.Generator, contrast: float, size: float) -> None:
    """An unreported tissue island: a mass-sized region where overlapping fibroglandular tissue adds
    up (the local tissue pattern, brighter), not a homogeneous mass."""
    r0 = size * cv.w / 2
    x, y = cv.place(rng, float(rng.uniform(0.25, 0.75)), float(rng.uniform(-0.6, 0.6)), r0 * 1.3)
    fn = _radius_fn(rng, "oval", "circumscribed", r0 * 1.3)
    _blob(cv, x, y, fn, r0 * 1.3, contrast * 0.6, 0.5 * r0, texture=0.0, layer=cv.boost)


def render_phantom(seed: int, index: int, size: int = 1024, label: str | None = None,
                   view: str | None = None, *, laterality: str | None = None, overlap: float = OVERLAP,
                   label_mix: dict[str, float] | None = None, patient: Patient | None = None) -> Phantom:
    """Render one phantom image in memory: patient ``index`` of ``seed`` (label/laterality drawn unless
    given), ``view`` CC or MLO (drawn when None), ``size`` = image height in pixels (width
    ``round(0.59 * size)``)."""
    size = int(size)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size: {size} out of range {MIN_SIZE}..{MAX_SIZE}")
    if view is not None and view not in VIEWS:
        raise InputError(f"view: {view!r} not in {'/'.join(VIEWS)}")
    if laterality is not None and laterality not in LATERALITIES:
        raise InputError(f"laterality: {laterality!r} not in L/R")
    pat = patient or draw_patient(seed, index, label, overlap=overlap, label_mix=label_mix)
    if view is None:
        view = VIEWS[int(_rng(seed, index, 9).integers(2))]
    lat = laterality or pat.laterality
    h, w = size, max(8, int(round(ASPECT * size)))
    rng = _rng(seed, index, 2 + VIEWS.index(view))
    geo = _Breast(rng, view, h, w)
    n1, = powerlaw_noise(rng, (h, w), beta=3.0, stretch=2.2, pair=False)  # fibroglandular structure
    t1, t2 = powerlaw_noise(rng, (h, w), beta=2.0, stretch=1.3)  # finer texture
    cv = _Canvas(geo, t2)

    # fibroglandular tissue: a thresholded 1/f^3 field inside a density envelope
    env = _smoothstep((0.97 - geo.rho) / 0.5) * _smoothstep(geo.u / (0.35 * geo.a))
    field_ = n1 + np.float32(1.6) * env
    sub = field_[::4, ::4][geo.breast[::4, ::4]]
    thr = np.quantile(sub, 1 - pat.dense_fraction) if sub.size else 0.0
    gland = 0.5 * (1 + np.tanh((field_ - np.float32(thr)) / np.float32(0.5)))
    base = np.float32(pat.fat) + np.float32(pat.gland - pat.fat) * gland
    base += np.float32(0.03) * t1 * (0.3 + gland)
    # where the tissue is thickest the layers add up: dense cores are brighter still
    base += np.float32(pat.core) * np.maximum(field_ - np.float32(thr) - np.float32(0.4), 0) ** 1.5

    # the findings, then unreported islands and specks (for every label)
    findings = pat.findings
    value = 2 if pat.label == "malignant" else 1
    centers: list[tuple[float, float]] = []
    pulls: list = []
    contrast = lambda: float(rng.uniform(*CONTRAST))  # noqa: E731 - one distribution for every label
    for f in findings:
        if f.kind == "mass":
            centers.append(_render_mass(cv, f, rng, contrast(), value))
        elif f.kind == "calcification":
            centers.append(_calc_group(cv, f, rng, value))
        else:
            centers.append(_render_distortion(cv, f, rng, value, pulls))
    extra = np.random.default_rng([int(seed), int(index), 7, VIEWS.index(view)])
    n_islands = int(extra.poisson(1.0)) + (1 if pat.label == "normal" else 0)
    for _ in range(n_islands):
        _island(cv, extra, float(extra.uniform(*CONTRAST)), float(extra.uniform(0.05, 0.12)))
    for _ in range(int(extra.integers(0, 9)) + (3 if pat.label == "normal" else 0)):
        x, y = geo.point(float(extra.uniform(0.1, 0.9)), float(extra.uniform(-0.85, 0.85)))
        if geo.depth_at(x, y) > 3 * geo.s:
            _disc(cv.calc, None, x, y, max(extra.uniform(0.8, 1.8) * geo.s, 0.5), float(extra.uniform(0.2, 0.38)))
    _vessels(cv, rng)

    tissue = base + cv.add + cv.lines + cv.boost * np.clip(field_ - np.float32(thr - 0.3), 0, 1)
    for cx, cy, R, k in pulls:
        _pull(tissue, cx, cy, R, k)
    tissue += cv.calc
    # thickness fall-off towards the skin, the skin line, and the pectoral muscle
    thick = _smoothstep(geo.d / np.float32(geo.w * 0.07)) ** np.float32(0.7)
    img = tissue * thick
    if geo.nipple is not None:
        sl, prof = geo.nipple
        img[sl] = np.maximum(img[sl], np.float32(pat.fat * 0.55) * prof)
    skin = np.exp(-((geo.d - np.float32(1.3 * geo.s + 0.3)) / np.float32(1.1 * geo.s + 0.4)) ** 2)
    img += np.float32(0.09) * skin * (geo.d > -1.5)
    if view == "MLO":
        p = geo.pect
        level = np.float32(pat.gland + rng.uniform(-0.04, 0.04))
        ramp = np.float32(0.14) * _smoothstep(geo.pect_depth / np.float32(0.6))  # brighter into the corner
        muscle = level - np.float32(0.06) + ramp + np.float32(0.05) * n1 + np.float32(0.04) * t1
        img = img * (1 - p) + p * muscle * np.maximum(thick, p)
    dn = np.float32(pat.background) + img * np.float32(pat.gain)
    dn += rng.standard_normal((h, w), dtype=np.float32) * np.float32(7.0)
    image = np.clip(dn + 0.5, 0, 2 ** BITS - 1).astype(np.uint16)

    drawn = {name: cv.masks.get(name) for name in PHANTOM_CONCEPTS}
    zeros = np.zeros((h, w), bool)
    visible = geo.breast & ~geo.pectoral  # the muscle hides what lies under it
    masks = {k: (m & visible if m is not None else zeros) for k, m in drawn.items()}
    lesion = np.where(visible, cv.lesion, 0).astype(np.uint8)
    breast, pect = geo.breast, geo.pectoral
    if lat == "R":  # mirror: chest wall on the right
        image, lesion, breast, pect = (np.ascontiguousarray(a[:, ::-1]) for a in (image, lesion, breast, pect))
        masks = {k: (np.ascontiguousarray(m[:, ::-1]) if m is not zeros else zeros) for k, m in masks.items()}
        centers = [(w - 1 - x, y) for x, y in centers]
    return Phantom(image=image, masks=masks, lesion=lesion, label=pat.label, report=report_line(findings),
                   view=view, laterality=lat, breast=breast, pectoral=pect, patient=pat, findings=findings,
                   centers=centers)


# --------------------------------------------------------------------------- writing a dataset
@lru_cache(maxsize=4)
def _zero_png(h: int, w: int) -> bytes:
    return _png8(np.zeros((h, w), np.uint8))


def _png8(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _mask_bytes(m: np.ndarray) -> bytes:
    if not m.any():
        return _zero_png(*m.shape)
    return _png8(m.astype(np.uint8) * np.uint8(255))


def write_phantom(folder: Path, ph: Phantom) -> dict:
    """Write one phantom's PNGs into a dataset folder; returns its manifest row (split left empty)."""
    iid = ph.image_id
    (folder / "images" / f"{iid}.png").write_bytes(
        png16(ph.image, bits=BITS, text={"Laterality": ph.laterality, "View": ph.view}))
    for name in PHANTOM_CONCEPTS:
        (folder / "masks" / name / f"{iid}.png").write_bytes(_mask_bytes(ph.masks[name]))
    lesion = ""
    if ph.lesion.any():
        lesion = f"lesions/{iid}.png"
        (folder / lesion).write_bytes(_png8(ph.lesion))
    return {"image_id": iid, "patient_id": ph.patient.patient_id, "view": ph.view, "label": ph.label,
            "image": f"images/{iid}.png", "lesion_mask": lesion, "report": ph.report}


def _balanced(rng: np.random.Generator, n: int, fractions: dict[str, float]) -> list[str]:
    """``n`` names in the given fractions (largest remainders), shuffled."""
    keys = list(fractions)
    total = sum(fractions.values())
    raw = np.array([fractions[k] / total * n for k in keys])
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    out = [k for k, c in zip(keys, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def plan_patients(count: int, seed: int, label_mix: dict[str, float] | None = None,
                  splits: dict[str, float] | None = None) -> list[tuple[int, str, str, tuple[str, ...]]]:
    """(patient index, label, split, views) for a data set of ``count`` images: labels in the
    ``label_mix`` fractions by patient, splits assigned per patient and stratified by label."""
    n_pat = -(-count // 2)
    rng = np.random.default_rng([int(seed), 1 << 30])
    labels = _balanced(rng, n_pat, label_mix or DEFAULT_LABEL_MIX)
    split_of: dict[int, str] = {}
    for lab in CLASSES:
        idx = [i for i, label in enumerate(labels) if label == lab]
        for i, sp in zip(idx, _balanced(rng, len(idx), splits or DEFAULT_SPLITS)):
            split_of[i] = sp
    plan: list[tuple[int, str, str, tuple[str, ...]]] = []
    for i in range(n_pat):
        views = VIEWS if 2 * i + 1 < count else VIEWS[:1]
        plan.append((i, labels[i], split_of[i], views))
    return plan


def _fractions(values: dict[str, float] | None, default: dict[str, float], what: str) -> dict[str, float]:
    vals = dict(default if values is None else values)
    unknown = set(vals) - set(default)
    if unknown:
        raise InputError(f"{what}: unknown name(s) {', '.join(sorted(unknown))}")
    vals = {k: float(vals.get(k, 0.0)) for k in default}
    if any(not math.isfinite(v) or v < 0 for v in vals.values()):
        raise InputError(f"{what}: fractions must be finite and >= 0")
    if abs(sum(vals.values()) - 1) > 1e-6:
        raise InputError(f"{what}: fractions must sum to 1, got {sum(vals.values()):g}")
    return vals


def _render_job(job):
    seed, index, size, label, view, overlap, folder = job
    ph = render_phantom(seed, index, size, label, view, overlap=overlap)
    return write_phantom(Path(folder), ph)


def generate_dataset(out: str | os.PathLike, count: int, seed: int, size: int = 1024, *,
                     splits: dict[str, float] | None = None, label_mix: dict[str, float] | None = None,
                     overlap: float = OVERLAP, jobs: int = 1, progress: bool = False) -> Path:
    """Write a phantom data set of ``count`` images (``ceil(count / 2)`` patients, CC then MLO) into
    ``out`` (a dataset folder, the contract in docs/data.md); the same arguments give the same bytes."""
    from deepminer.data.dataset import staged_output, write_manifest

    if isinstance(count, bool) or int(count) != count or count < 1:
        raise InputError(f"count: must be a positive integer, got {count}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed: must be a non-negative integer, got {seed}")
    size = int(size)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size: {size} out of range {MIN_SIZE}..{MAX_SIZE}")
    if not 0 <= overlap <= 0.5:
        raise InputError(f"overlap: {overlap} out of range 0..0.5")
    splits = _fractions(splits, DEFAULT_SPLITS, "splits")
    label_mix = _fractions(label_mix, DEFAULT_LABEL_MIX, "label-mix")
    out = Path(out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{out}: cannot write ({parent} is not a folder)")
            break
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.csv").exists())):
        raise InputError(f"{out}: exists and is not a dataset folder; refusing to overwrite it")
    plan = plan_patients(int(count), int(seed), label_mix, splits)
    jobs_list = [(int(seed), i, size, lab, v, float(overlap)) for i, lab, _, views in plan for v in views]
    split_of = {patient_id(i): sp for i, _, sp, _ in plan}
    try:
        with staged_output(out) as stage:
            for sub in ["images", "lesions"] + [f"masks/{c}" for c in PHANTOM_CONCEPTS]:
                (stage / sub).mkdir(parents=True, exist_ok=True)
            work = [j + (str(stage),) for j in jobs_list]
            rows = _run_jobs(work, jobs, progress)
            for row in rows:
                row["split"] = split_of[row["patient_id"]]
            write_manifest(stage, rows)
            meta = {"generator": "deepminer phantoms", "seed": int(seed), "count": int(count), "size": size,
                    "width": int(round(ASPECT * size)), "bits_stored": BITS, "splits": splits,
                    "label_mix": label_mix, "overlap": float(overlap), "concepts": list(PHANTOM_CONCEPTS)}
            (stage / "phantoms.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    except OSError as err:
        raise InputError(f"{out}: cannot write ({err.strerror or err})") from None
    return out


def _run_jobs(work: list, jobs: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=len(work), unit="img", desc="phantoms", disable=not progress)
    rows: list[dict] = []
    try:
        if jobs <= 1:
            for job in work:
                rows.append(_render_job(job))
                bar.update()
        else:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(jobs) as pool:
                for row in pool.imap(_render_job, work, chunksize=2):
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()
    return rows


__all__ = ["CALC_TYPES", "Finding", "MASS_MARGINS", "MASS_SHAPES", "PHANTOM_CONCEPTS", "Patient",
           "Phantom", "VIEWS", "draw_patient", "generate_dataset", "looks_malignant", "plan_patients",
           "png16", "powerlaw_noise", "render_phantom", "report_line", "write_phantom"]
