"""The Evaluate page's logic: score the served model's saliency maps against a lesion outline, one
image or a set. No Streamlit here (the page only lays the answers out; the tests call these).

Every metric is the engine's (:mod:`deepminer.evaluation.localization`), the baselines are
:mod:`deepminer.evaluation.methods`'s, the intervals :func:`deepminer.evaluation.stats.bootstrap_ci`
and the PNG figures :mod:`deepminer.evaluation.figures`: nothing is computed a second way here.
"""
from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.explanation import Explanation
from ui.logic import trained_on_phantoms

ONE_PASS = ("cam", "class_map")  #: maps every explanation carries (no extra request)
PEERS_FAST = ("gradcam", "gradcam++", "guided_backprop")  #: one ``/explanations`` request
PEERS_SLOW = ("integrated_gradients", "smoothgrad")  #: a second request (seconds each)
PEERS = PEERS_FAST + PEERS_SLOW
BASELINES = ("random", "tissue_prior")  #: the floor every report shows
METRICS = ("auprc", "pointing", "iou", "dice", "relevance_mass")
METHOD_NAMES = {"cam": "CAM", "class_map": "probability map", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++",
                "guided_backprop": "guided backprop", "integrated_gradients": "integrated gradients",
                "smoothgrad": "SmoothGrad", "random": "random (baseline)", "tissue_prior": "tissue prior (baseline)"}
EVAL_SIDE = 1024  #: images are scored at most this long side (the preview the pages draw on)


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def is_baseline(method: str) -> bool:
    return method in BASELINES


# -- one image --------------------------------------------------------------------------------------

def lesion_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A mask image (any size; grey, RGB or RGBA; anything above 0 is lesion; for RGBA the alpha)
    as a bool ``shape`` mask, resized nearest."""
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[:, :, 3] if m.shape[2] == 4 else m.max(axis=2)
    on = m > 0
    h, w = int(shape[0]), int(shape[1])
    if on.shape != (h, w):
        on = np.asarray(Image.fromarray(on.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
    return on


def decode_mask(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """A mask file's bytes (PNG and friends) as a bool ``shape`` mask; :class:`InputError` when it is
    not an image."""
    from PIL import Image, UnidentifiedImageError

    from deepminer.errors import InputError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"the mask is not an image ({type(err).__name__})") from None
    return lesion_mask(arr, shape)


@dataclass(frozen=True)
class Scene:
    """One image prepared for scoring, at most :data:`EVAL_SIDE` long: its breast region and lesion,
    the engine's :class:`~deepminer.evaluation.localization.LesionTarget` of them, and its pixels
    when they were decoded here (None when the server's region was used: :meth:`of_region`)."""

    pixels: np.ndarray | None
    tissue: np.ndarray
    lesion: np.ndarray
    target: Any

    @classmethod
    def make(cls, pixels: np.ndarray, lesion: np.ndarray) -> Scene:
        """From the pixels (the breast region computed here, as the server does)."""
        from deepminer.data.tissue import tissue_mask
        from deepminer.evaluation.localization import LesionTarget

        px = np.asarray(pixels, dtype=np.float32)
        tissue = tissue_mask(px)
        les = lesion_mask(lesion, px.shape[:2])
        return cls(px, tissue, les, LesionTarget.make(les, tissue))

    @classmethod
    def of_region(cls, region: np.ndarray, lesion: np.ndarray) -> Scene:
        """From the breast region the server explained the image in
        (:meth:`~deepminer.explanation.Explanation.tissue_region`, the image's size; brought to at
        most :data:`EVAL_SIDE` like :func:`load_pixels`, nearest): no decoding here."""
        from deepminer.evaluation.localization import LesionTarget
        from deepminer.geometry import fit_size

        h, w = region.shape
        shape = fit_size(h, w, EVAL_SIDE)
        tissue = lesion_mask(region, shape)
        les = lesion_mask(lesion, shape)
        return cls(None, tissue, les, LesionTarget.make(les, tissue))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tissue.shape[0]), int(self.tissue.shape[1])

    @property
    def scorable(self) -> bool:
        """The lesion has a pixel inside the breast (else every metric is NaN)."""
        return bool(self.target.scorable)


def class_index(exp: Explanation, cls: str | None) -> int:
    classes = list(exp.classes)
    return classes.index(cls) if cls in classes else classes.index(exp.prediction)


def one_pass_maps(exp: Explanation, cls: str | None = None) -> dict[str, np.ndarray]:
    """CAM and probability map of class ``cls`` (None: the prediction), on the CAM grid."""
    from deepminer.evaluation.methods import one_pass_map

    i = class_index(exp, cls)
    return {m: one_pass_map(m, exp, i, None) for m in ("cam", "class_map")}


def baseline_maps(tissue: np.ndarray, grid: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """The random map (``seed``) and the tissue prior on ``grid`` (the engine's baselines)."""
    from deepminer.evaluation.methods import random_map, tissue_prior_map

    g = (int(grid[0]), int(grid[1]))
    return {"random": random_map(g, seed), "tissue_prior": tissue_prior_map(tissue, g)}


def seed_of(key: str) -> int:
    """A stable seed of an image (its digest or id) for the random baseline."""
    import hashlib

    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "little")


def score_maps(maps: Mapping[str, np.ndarray], scene: Scene) -> dict[str, dict[str, Any]]:
    """The engine's localization metrics (with the PR curve) of each cell map, at the scene's size."""
    from deepminer.evaluation.localization import localization_metrics, to_image

    return {m: localization_metrics(to_image(np.asarray(cell, np.float32), scene.shape), scene.target, pr=True)
            for m, cell in maps.items()}


def _key(value: float) -> float:
    return -value if math.isfinite(value) else math.inf


def ranked_rows(scores: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, best AUPRC first; the baselines after the methods (the floor), marked.
    A method below the better baseline's AUPRC says so."""
    floor = max((float(scores[b]["auprc"]) for b in BASELINES if b in scores
                 and math.isfinite(float(scores[b]["auprc"]))), default=math.nan)
    methods = sorted((m for m in scores if not is_baseline(m)), key=lambda m: _key(float(scores[m]["auprc"])))
    bases = sorted((m for m in scores if is_baseline(m)), key=lambda m: _key(float(scores[m]["auprc"])))
    rows = []
    for m in methods + bases:
        s = scores[m]
        a = float(s["auprc"])
        note = "baseline" if is_baseline(m) else ("below the baseline floor" if math.isfinite(floor) and a < floor
                                                  else "")
        rows.append({"method": method_name(m), "AUPRC": _round(a), "pointing": _hit(s["pointing"]),
                     "IoU": _round(float(s["iou"])), "baseline": is_baseline(m), "note": note, "key": m})
    return rows


def _round(v: float, nd: int = 3) -> float | None:
    return round(v, nd) if math.isfinite(v) else None


def _hit(v: Any) -> str:
    f = float(v)
    return "" if not math.isfinite(f) else ("hit" if f >= 0.5 else "miss")


# -- a set --------------------------------------------------------------------------------------------

@dataclass
class ImageRecord:
    """One image of a set: its id, label, prediction, the explained class and every method's metrics
    (``{method: {metric: float, "pr": array}}``), or why it was not scored."""

    image_id: str
    label: str | None
    prediction: str = ""
    target: str = ""
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    problem: str = ""
    seconds: float = 0.0


def load_pixels(path: Path) -> np.ndarray:
    """An image file decoded (the project's decoder) and scaled to at most :data:`EVAL_SIDE`."""
    from deepminer.data.io import load_image
    from deepminer.geometry import fit_image

    return fit_image(load_image(Path(path).read_bytes()).pixels, EVAL_SIDE)


def load_mask(path: Path, shape: Sequence[int]) -> np.ndarray:
    return decode_mask(Path(path).read_bytes(), shape)


def item_scene(item: Any, exp: Explanation) -> Scene:
    """The :class:`Scene` of a set's item (``.image``, ``.mask`` files) explained as ``exp``: from the
    breast region the server returned (the ``tissue_mask`` option; nothing decoded here), else from
    the image decoded here (its region computed as the server does)."""
    region = exp.tissue_region()
    if region is not None:
        return Scene.of_region(region, load_mask(item.mask, region.shape))
    pixels = load_pixels(item.image)
    return Scene.make(pixels, load_mask(item.mask, pixels.shape[:2]))


def evaluate_item(image_id: str, label: str | None, pixels: np.ndarray | None, lesion: np.ndarray, exp: Explanation,
                  extra: Mapping[str, np.ndarray] | None = None, *, cls: str | None = None,
                  scene: Scene | None = None) -> ImageRecord:
    """Score one image: CAM, probability map, ``extra`` maps (peers, on the CAM grid) and the two
    baselines, for class ``cls`` (None: the prediction). ``scene``: the image already prepared
    (then ``pixels`` may be None)."""
    if scene is None:
        if pixels is None:
            raise ValueError("evaluate_item: pixels or a scene")
        scene = Scene.make(pixels, lesion)
    i = class_index(exp, cls)
    rec = ImageRecord(image_id, label, exp.prediction, exp.classes[i])
    if not scene.scorable:
        rec.problem = "the outline has no pixel inside the breast"
        return rec
    maps = {**one_pass_maps(exp, exp.classes[i]), **dict(extra or {}),
            **baseline_maps(scene.tissue, exp.cam.shape[1:], seed_of(image_id))}
    rec.scores = score_maps(maps, scene)
    return rec


def methods_of(records: Iterable[ImageRecord]) -> list[str]:
    seen: list[str] = []
    for r in records:
        seen += [m for m in r.scores if m not in seen]
    return [m for m in seen if not is_baseline(m)] + [m for m in BASELINES if m in seen]


def summary_rows(records: Sequence[ImageRecord], *, n_resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per method and metric: mean and 95% percentile-bootstrap interval over the images
    (:func:`~deepminer.evaluation.stats.bootstrap_ci`, NaNs dropped), in the rows
    :func:`~deepminer.evaluation.figures.metric_bars` takes."""
    from deepminer.evaluation.stats import bootstrap_ci

    rows = []
    for m in methods_of(records):
        for metric in METRICS:
            values = [float(r.scores[m][metric]) for r in records if m in r.scores]
            ci = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
            rows.append({"method": m, "metric": metric, "mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "n": ci.n,
                         "baseline": is_baseline(m)})
    return rows


def summary_table(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The summary as one row per method (best mean AUPRC first, baselines last): ``mean [lo, hi]``."""
    by: dict[str, dict[str, Any]] = {}
    for r in summary:
        row = by.setdefault(r["method"], {"method": method_name(r["method"]), "baseline": bool(r["baseline"]),
                                          "n": r["n"]})
        row[r["metric"]] = _interval(r)
        if r["metric"] == "auprc":
            row["_sort"] = float(r["mean"])
    rows = sorted(by.values(), key=lambda r: (r["baseline"], _key(r.get("_sort", math.nan))))
    for r in rows:
        r.pop("_sort", None)
    return rows


def _interval(r: Mapping[str, Any]) -> str:
    if not math.isfinite(float(r["mean"])):
        return "n/a"
    return f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def pr_matrix(records: Sequence[ImageRecord]) -> dict[str, np.ndarray]:
    """Per method, the ``(n_images, len(RECALL_GRID))`` precision curves (for ``figures.pr_curves``)."""
    from deepminer.evaluation.localization import RECALL_GRID

    out = {}
    for m in methods_of(records):
        rows = [np.asarray(r.scores[m]["pr"], np.float64) for r in records if m in r.scores]
        out[m] = np.vstack(rows) if rows else np.zeros((0, RECALL_GRID.size))
    return out


def mean_pr(records: Sequence[ImageRecord]) -> dict[str, np.ndarray]:
    """The mean precision at each recall of the grid, per method (images with a NaN curve left out)."""
    out = {}
    for m, mat in pr_matrix(records).items():
        ok = mat[~np.isnan(mat).any(axis=1)] if mat.size else mat
        if len(ok):
            out[m] = ok.mean(axis=0)
    return out


def best_worst(records: Sequence[ImageRecord], method: str = "cam", metric: str = "auprc",
               k: int = 2) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The ``k`` images where ``method`` scores best and worst on ``metric`` (scored images only)."""
    scored = [r for r in records if method in r.scores and math.isfinite(float(r.scores[method][metric]))]
    scored.sort(key=lambda r: -float(r.scores[method][metric]))
    k = min(k, len(scored) // 2 if len(scored) > 1 else len(scored))
    return scored[:k], (scored[-k:][::-1] if k else [])


def per_image_csv(records: Sequence[ImageRecord]) -> str:
    """One row per image and method: id, label, prediction, explained class, method, the metrics
    (empty for an image that was not scored, with the reason)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "label", "prediction", "target", "method", "baseline", *METRICS, "problem"])
    for r in records:
        if not r.scores:
            w.writerow([r.image_id, r.label or "", r.prediction, r.target, "", "", *([""] * len(METRICS)), r.problem])
        for m, s in r.scores.items():
            w.writerow([r.image_id, r.label or "", r.prediction, r.target, m, int(is_baseline(m)),
                        *(_csv_num(s[k]) for k in METRICS), r.problem])
    return buf.getvalue()


def _csv_num(v: Any) -> str:
    f = float(v)
    return f"{f:.6g}" if math.isfinite(f) else ""


def _json_num(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def provenance(model: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the numbers are of: the model's weights hash and what it was trained on, with the
    warning that a phantom-trained model's numbers on real mammograms mean nothing."""
    m = dict(model or {})
    out = {"model": m.get("name"), "weights_sha256": m.get("weights_sha256"), "trained_on": m.get("trained_on")}
    if trained_on_phantoms(m):
        out["warning"] = ("This model was trained on synthetic phantoms only: on real mammograms these numbers "
                          "mean nothing.")
    return out


def report_json(summary: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """The JSON export: the settings (model, data set, methods, class, counts) and the summary."""
    rows = [{**{k: v for k, v in r.items() if k not in ("mean", "lo", "hi")}, "mean": _json_num(r["mean"]),
             "lo": _json_num(r["lo"]), "hi": _json_num(r["hi"])} for r in summary]
    return json.dumps({"settings": dict(settings), "summary": rows}, indent=1) + "\n"


def figures_zip(records: Sequence[ImageRecord], summary: Sequence[Mapping[str, Any]],
                cases: Sequence[Mapping[str, Any]], folder: Path) -> bytes:
    """The PNG figures (one bar chart per metric, the mean PR curves, the best/worst gallery) drawn
    by :mod:`deepminer.evaluation.figures` into ``folder``, zipped."""
    from deepminer.evaluation import figures
    from deepminer.evaluation.localization import RECALL_GRID

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in METRICS:
        p, _ = figures.metric_bars([dict(r) for r in summary], metric, folder / f"bars-{metric}.png",
                                   title=f"{metric} (mean, 95% bootstrap interval over images)")
        paths.append(p)
    paths.append(figures.pr_curves(pr_matrix(records), RECALL_GRID, folder / "pr-curves.png"))
    if cases:
        paths.append(figures.gallery([dict(c) for c in cases], folder / "best-worst.png", title="Best and worst cases (CAM)"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, Path(p).name)
    return buf.getvalue()


def eta_s(done: int, total: int, elapsed_s: float) -> float | None:
    """Seconds left at the mean pace so far (None before the first image)."""
    if done <= 0 or total <= done:
        return None if done <= 0 else 0.0
    return elapsed_s / done * (total - done)


# -- a set and its run (kept in the session across reruns) ------------------------------------------

@dataclass
class Thumb:
    """What the best/worst gallery needs of one image, small: grey pixels, the lesion, the CAM."""

    pixels: np.ndarray
    lesion: np.ndarray
    cam: np.ndarray


def thumb(pixels: np.ndarray, lesion: np.ndarray, cam: np.ndarray, side: int = 256) -> Thumb:
    """The gallery's small copy of an image (at most ``side`` long), its lesion and its CAM."""
    from deepminer.geometry import fit_image

    px = fit_image(np.asarray(pixels, np.float32), side)
    return Thumb(px, lesion_mask(lesion, px.shape[:2]), np.asarray(cam, np.float32))


def thumb_of(item: Any, cam: np.ndarray) -> Thumb:
    """:func:`thumb` of a set's item (its image and mask files decoded now)."""
    pixels = load_pixels(item.image)
    return thumb(pixels, load_mask(item.mask, pixels.shape[:2]), cam)


@dataclass
class EvalSet:
    """A set to evaluate: its items and what was skipped, where it came from (``source``: a line for
    the report; ``sha256`` of a zip), and the temporary folder a zip was extracted to (removed by
    :meth:`cleanup`, at the latest when the object is collected with its session)."""

    items: list[Any]
    skipped: list[Any]
    source: str
    kind: str  #: zip | folder | bundled
    sha256: str | None = None
    tmp: Path | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        import shutil
        import weakref

        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.tmp), True) if self.tmp else None

    def cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    @property
    def available(self) -> bool:
        """The files are there (a zip's folder is removed after a run)."""
        return self.tmp is None or self.tmp.is_dir()


@dataclass
class SetRun:
    """One run over a set, processed image by image across reruns: where it is, what it found."""

    items: list[Any]
    methods: tuple[str, ...]
    target: str  #: "prediction" or "label"
    dataset: dict[str, Any]
    records: list[ImageRecord] = field(default_factory=list)
    cams: dict[str, np.ndarray] = field(default_factory=dict)  #: the explained class's CAM of each scored image
    thumbs: dict[str, Thumb] = field(default_factory=dict)  #: made for the best/worst cases only, at the end
    model: dict[str, Any] = field(default_factory=dict)
    done: int = 0
    running: bool = True
    cancelled: bool = False
    error: str | None = None
    elapsed_s: float = 0.0
    request_s: float = 0.0  #: time spent waiting for the model server

    @property
    def total(self) -> int:
        return len(self.items)

    def settings(self) -> dict[str, Any]:
        return {"model": provenance(self.model), "dataset": self.dataset, "methods": list(self.methods),
                "baselines": list(BASELINES), "explained_class": self.target, "images": self.total,
                "evaluated": self.done, "scored": sum(1 for r in self.records if r.scores),
                "cancelled": self.cancelled, "error": self.error, "seconds": round(self.elapsed_s, 3),
                "interval": "95% percentile bootstrap over images (1000 resamples, seed 0)"}


def requests_for(methods: Sequence[str]) -> list[list[str]]:
    """The ``/explanations`` requests that fetch ``methods``' peers: at most 3 gradient methods each
    (an empty list: CAM and probability map only, one ``/predictions`` call)."""
    peers = [m for m in methods if m in PEERS]
    return [peers[i:i + 3] for i in range(0, len(peers), 3)]
