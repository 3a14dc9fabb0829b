"""The Evaluate page's logic: score the served model's saliency maps against a lesion outline, one
image or a set, and run a set image by image (:class:`SetScheduler`). No Streamlit here (the page
only lays the answers out; the tests call these).

Every metric is the engine's (:mod:`deepminer.evaluation.localization`), the baselines are
:mod:`deepminer.evaluation.methods`'s, masks are read by :mod:`deepminer.evaluation.masks`, a set's
images are :class:`~deepminer.evaluation.results.ImageRecord` s summarised by
:func:`~deepminer.evaluation.results.summary_rows` (as ``deepminer evaluate-explanations`` does) and
the PNG figures are :mod:`deepminer.evaluation.figures`'s: nothing is computed a second way here.
"""
from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deepminer.errors import DeepMinerError
from deepminer.evaluation.catalog import BASELINES, LOCALIZATION, PEERS
from deepminer.evaluation.masks import fit_mask, read_lesion
from deepminer.evaluation.results import ImageRecord, curves
from deepminer.evaluation.results import best_worst, summary_rows  # noqa: F401 - the page's, as the engine has them
from deepminer.explanation import Explanation
from deepminer.jobs import new_id
from ui.logic import trained_on_phantoms

ONE_PASS = ("cam", "class_map")  #: maps every explanation carries (no extra request)
PEERS_FAST = ("gradcam", "gradcam++", "guided_backprop")  #: one ``/explanations`` request
PEERS_SLOW = ("integrated_gradients", "smoothgrad")  #: a second request (seconds each)
METRICS = LOCALIZATION  #: what the page scores (no faithfulness or sanity: the CLI's full report has them)
METHOD_NAMES = {"cam": "CAM", "class_map": "probability map", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++",
                "guided_backprop": "guided backprop", "integrated_gradients": "integrated gradients",
                "smoothgrad": "SmoothGrad", "random": "random (baseline)", "tissue_prior": "tissue prior (baseline)"}
EVAL_SIDE = 1024  #: images are scored at most this long side (the preview the pages draw on)
#: the page's "explained class" choice -> the view of :class:`ImageRecord` it fills
VIEW_OF = {"prediction": "predicted", "label": "truth"}


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def is_baseline(method: str) -> bool:
    return method in BASELINES


# -- one image --------------------------------------------------------------------------------------

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
        les = fit_mask(lesion, px.shape[:2])
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
        tissue = fit_mask(region, shape)
        les = fit_mask(lesion, shape)
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

def load_pixels(path: Path) -> np.ndarray:
    """An image file decoded (the project's decoder) and scaled to at most :data:`EVAL_SIDE`."""
    from deepminer.data.io import load_image
    from deepminer.geometry import fit_image

    return fit_image(load_image(Path(path).read_bytes()).pixels, EVAL_SIDE)


def item_scene(item: Any, exp: Explanation) -> Scene:
    """The :class:`Scene` of a set's item (``.image``, ``.mask`` files) explained as ``exp``: from the
    breast region the server returned (the ``tissue_mask`` option; nothing decoded here), else from
    the image decoded here (its region computed as the server does)."""
    region = exp.tissue_region()
    if region is not None:
        return Scene.of_region(region, read_lesion(item.mask, region.shape, resize=True))
    pixels = load_pixels(item.image)
    return Scene.make(pixels, read_lesion(item.mask, pixels.shape[:2], resize=True))


def evaluate_item(image_id: str, label: str | None, pixels: np.ndarray | None, lesion: np.ndarray, exp: Explanation,
                  extra: Mapping[str, np.ndarray] | None = None, *, cls: str | None = None,
                  scene: Scene | None = None, view: str | None = None) -> ImageRecord:
    """Score one image: CAM, probability map, ``extra`` maps (peers, on the CAM grid) and the two
    baselines, for class ``cls`` (None: the prediction), as the record's ``view`` (default: ``truth``
    for a given class, else ``predicted``); the CAM is kept for the gallery. ``scene``: the image
    already prepared (then ``pixels`` may be None)."""
    if scene is None:
        if pixels is None:
            raise ValueError("evaluate_item: pixels or a scene")
        scene = Scene.make(pixels, lesion)
    i = class_index(exp, cls)
    view = view or ("truth" if cls is not None else "predicted")
    rec = ImageRecord(image_id, label, exp.prediction, targets={view: exp.classes[i]},
                      probabilities=dict(exp.probabilities))  # how right the model was (classification)
    if not scene.scorable:
        rec.problem = "the outline has no pixel inside the breast"
        return rec
    maps = {**one_pass_maps(exp, exp.classes[i]), **dict(extra or {}),
            **baseline_maps(scene.tissue, exp.cam.shape[1:], seed_of(image_id))}
    rec.scores = {m: {view: s} for m, s in score_maps(maps, scene).items()}
    rec.saliency = np.asarray(maps["cam"], np.float32)
    return rec


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

    return curves(records, "pr", width=RECALL_GRID.size)


def mean_pr(records: Sequence[ImageRecord]) -> dict[str, np.ndarray]:
    """The mean precision at each recall of the grid, per method (images with a NaN curve left out)."""
    out = {}
    for m, mat in pr_matrix(records).items():
        ok = mat[~np.isnan(mat).any(axis=1)] if mat.size else mat
        if len(ok):
            out[m] = ok.mean(axis=0)
    return out


def per_image_csv(records: Sequence[ImageRecord]) -> str:
    """One row per image and method: id, label, prediction, explained class, method, the metrics
    (empty for an image that was not scored, with the reason)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "label", "prediction", "target", "method", "baseline", *METRICS, "problem"])
    for r in records:
        view = r.view
        target = r.targets.get(view, "") if view else ""
        if not r.scores:
            w.writerow([r.image_id, r.label or "", r.prediction, target, "", "", *([""] * len(METRICS)), r.problem])
        for m in r.scores:
            w.writerow([r.image_id, r.label or "", r.prediction, target, m, int(is_baseline(m)),
                        *(_csv_num(r.score(m, view, k)) for k in METRICS), r.problem])
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


def report_json(summary: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                classification: Mapping[str, Any] | None = None) -> str:
    """The JSON export: the settings (model, data set, methods, class, counts), the summary and, when
    given, how right the model was (:func:`classification`)."""
    from deepminer.evaluation.results import clean_json

    rows = [{**{k: v for k, v in r.items() if k not in ("mean", "lo", "hi")}, "mean": _json_num(r["mean"]),
             "lo": _json_num(r["lo"]), "hi": _json_num(r["hi"])} for r in summary]
    body: dict[str, Any] = {"settings": dict(settings), "summary": rows}
    if classification is not None:
        body["classification"] = clean_json(dict(classification))
    return json.dumps(body, indent=1) + "\n"


def classification(records: Sequence[ImageRecord], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """How right the model was on the labelled images of the set (every record that kept its
    probabilities, scored or not): :func:`deepminer.evaluation.results.classification_summary`, as
    ``deepminer evaluate-explanations`` reports it; the classes in the model's order (the records'
    probabilities). None when no record has both a label and probabilities."""
    from deepminer.evaluation.results import classification_summary

    first = next((r for r in records if r.probabilities), None)
    if first is None:
        return None
    return classification_summary(records, list(first.probabilities), n_resamples=n_resamples, seed=seed)


def classification_rows(cl: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The page's two tables of :func:`classification`: ``(metrics, confusion)`` — per-class AUC,
    abnormal-vs-normal AUC, accuracy, ECE as ``value [95% CI]`` (no interval with fewer than 10
    images of a class), the ECE a perfectly calibrated model would show on as many images, and the
    confusion matrix (rows = truth, with the row totals)."""
    from deepminer.model_card import fmt_interval, fmt_number

    classes = list(cl["classes"])
    metrics = [{"metric": f"AUC {c} (one-vs-rest)", "value": fmt_interval(cl["auc"][c]), "images": cl["counts"][c]}
               for c in classes]
    metrics += [{"metric": "AUC abnormal vs normal", "value": fmt_interval(cl["abnormal_auc"]), "images": cl["n"]},
                {"metric": f"accuracy ({len(classes)} classes)", "value": fmt_interval(cl["accuracy"]), "images": cl["n"]},
                {"metric": "ECE (top-label, 15 bins)", "value": fmt_interval(cl.get("ece_interval") or {"value": cl["ece"]}),
                 "images": cl["n"]}]
    floor = cl.get("ece_if_calibrated") or {}
    if floor.get("draws"):  # binned ECE is biased upwards on few images: what a calibrated model would show
        metrics.append({"metric": "ECE if perfectly calibrated (mean; 95th pct)",
                        "value": f"{fmt_number(floor.get('mean'))}; {fmt_number(floor.get('q95'))}", "images": cl["n"]})
    confusion = [{"truth": c, **{f"predicted {k}": int(v) for k, v in zip(classes, row)}, "total": int(sum(row))}
                 for c, row in zip(classes, cl["confusion"])]
    return metrics, confusion


def ece_note(cl: Mapping[str, Any]) -> str | None:
    """One sentence that puts the measured ECE beside the ECE a perfectly calibrated model would show
    on as many images (``ece_if_calibrated``), or None without that floor (too few images)."""
    from deepminer.model_card import fmt_number

    floor = cl.get("ece_if_calibrated") or {}
    if not floor.get("draws"):
        return None
    verdict = ("more than the noise of this many images" if floor.get("share_at_least", 1.0) < 0.05
               else "within the noise of this many images")
    return (f"ECE {fmt_number(cl.get('ece'))}: a perfectly calibrated model would show {fmt_number(floor.get('mean'))} "
            f"on average on {cl['n']} images ({fmt_number(floor.get('q95'))} at the 95th percentile), so the "
            f"miscalibration measured here is {verdict}.")


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
    return Thumb(px, fit_mask(lesion, px.shape[:2]), np.asarray(cam, np.float32))


def thumb_of(item: Any, cam: np.ndarray) -> Thumb:
    """:func:`thumb` of a set's item (its image and mask files decoded now)."""
    pixels = load_pixels(item.image)
    return thumb(pixels, read_lesion(item.mask, pixels.shape[:2], resize=True), cam)


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
    records: list[ImageRecord] = field(default_factory=list)  #: in item order (a scored one keeps its CAM)
    thumbs: dict[str, Thumb] = field(default_factory=dict)  #: made for the best/worst cases only, at the end
    model: dict[str, Any] = field(default_factory=dict)
    done: int = 0
    running: bool = True
    cancelled: bool = False
    error: str | None = None
    elapsed_s: float = 0.0
    request_s: float = 0.0  #: time spent waiting for the model server
    #: the job group of its ``/explanations`` calls (:mod:`deepminer.jobs`): Cancel stops the one in flight too
    group: str = field(default_factory=lambda: "set-" + new_id())

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def view(self) -> str:
        """The view of :class:`ImageRecord` this run fills (:data:`VIEW_OF` its explained class)."""
        return VIEW_OF[self.target]

    def cancel(self) -> None:
        """Stop: no more images are asked for (what was done stays); the caller also cancels the
        calls in flight at the server (their job :attr:`group`)."""
        if self.running:
            self.cancelled, self.running = True, False

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


# -- running a set (image by image, on worker threads) -----------------------------------------------

LOOKAHEAD = 3  #: calls of a run waiting at the server at once, whether or not earlier answers are scored yet
AHEAD = 8  #: images between the one the run waits for and the last one asked for (worker threads)


class Answer(NamedTuple):
    """One image of a set run: its record, the model's identity as the answer gave it, and the
    seconds spent waiting for the model's calls."""

    record: ImageRecord
    model: dict[str, Any]
    waited_s: float


def score_item(item: Any, methods: Sequence[str], target: str, predict: Callable[[bytes], Explanation],
               explain_methods: Callable[[bytes, list[str], str | None], Explanation],
               answered: Callable[[], None]) -> Answer:
    """One image of a set: its calls (``predict(data)``, or ``explain_methods(data, peers, class)``
    per request of :func:`requests_for`), then its scores (:func:`evaluate_item`, as the view
    ``target`` names). ``answered()`` is called once the calls are back, before the scoring, so the
    next call may go out while this image is scored. No Streamlit: runs in a worker thread."""
    t0 = time.perf_counter()
    extra: dict[str, np.ndarray] = {}
    wanted = item.label if target == "label" and item.label else None  # None: the prediction
    exp: Explanation | None = None
    try:
        data = Path(item.image).read_bytes()
        for batch in requests_for(methods):  # the peers of the explained class (the server refuses a label it does not know)
            got = explain_methods(data, batch, wanted)
            exp = exp or got
            extra.update({m: got.method_maps[m] for m in batch if m in got.method_maps})
        if exp is None:
            exp = predict(data)
    finally:
        answered()
    waited = time.perf_counter() - t0
    scene = item_scene(item, exp)
    cls = wanted if wanted in exp.classes else None
    rec = evaluate_item(item.image_id, item.label, None, scene.lesion, exp, extra, cls=cls, scene=scene,
                        view=VIEW_OF[target])
    rec.seconds = time.perf_counter() - t0
    return Answer(rec, dict(exp.model or {}), waited)


def stop_reason(err: Exception) -> str | None:
    """Whether an image's error stops the whole run, and why: a :class:`DeepMinerError` (the image is
    bad) is that image's problem (None); anything else stops the run."""
    if isinstance(err, DeepMinerError):
        return None
    return f"The run stopped: {type(err).__name__}: {err}"


class _Answered:
    """How many of a run's calls came back (counted by the worker threads)."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.n += 1


class SetScheduler:
    """Takes a :class:`SetRun` forward image by image on ``pool``'s threads: at most ``lookahead``
    calls waiting at the model server at once (a call goes out as soon as one comes back, while its
    answer is scored), at most ``ahead`` images asked for past the one the run waits for, the answers
    taken in item order. ``work(item, answered)`` does one image (:func:`score_item` with the run's
    methods and calls); ``stop_reason(err)`` words an error that stops the whole run (None: the
    error is that image's problem, kept in its record). No Streamlit here."""

    def __init__(self, pool: Executor, work: Callable[[Any, Callable[[], None]], Answer], *,
                 lookahead: int = LOOKAHEAD, ahead: int = AHEAD,
                 stop_reason: Callable[[Exception], str | None] = stop_reason,
                 progress_every_s: float = 0.25, poll_s: float = 0.02) -> None:
        self.pool, self.work = pool, work
        self.lookahead, self.ahead = max(1, lookahead), max(1, ahead)
        self.stop_reason = stop_reason
        self.progress_every_s, self.poll_s = progress_every_s, poll_s

    def advance(self, run: SetRun, progress: Callable[[SetRun], None] | None = None) -> None:
        """Process the rest of ``run`` until it is done, cancelled (:meth:`SetRun.cancel`: after the
        image the run waits for now) or stopped by an error. ``progress(run)`` after an image, at most every
        ``progress_every_s`` and after the last. ``run`` only ever holds whole images: whatever
        ``progress`` raises (Streamlit's rerun when a widget is clicked) leaves it consistent, the
        calls not taken yet are dropped, and the next :meth:`advance` carries on."""
        if not run.running:
            return
        t_start = time.perf_counter() - run.elapsed_s
        pending: dict[int, Future[Answer]] = {}
        answered, first, nxt = _Answered(), run.done, run.done
        shown = 0.0  # when progress was last called (each call may cost a browser redraw)

        def ask() -> None:  # the calls that may go out now
            nonlocal nxt
            while nxt < run.total and nxt - run.done < self.ahead and (nxt - first) - answered.n < self.lookahead:
                pending[nxt] = self.pool.submit(self.work, run.items[nxt], answered)
                nxt += 1

        try:
            while run.done < run.total:
                ask()
                while not pending[run.done].done():
                    wait([pending[run.done]], timeout=self.poll_s)  # then look again whether a call may go out
                    ask()
                run.records.append(self._take(pending.pop(run.done), run))
                run.done += 1
                run.elapsed_s = time.perf_counter() - t_start
                if progress is not None and (run.elapsed_s - shown >= self.progress_every_s or run.done == run.total):
                    shown = run.elapsed_s
                    progress(run)
                if not run.running:  # cancelled: after the image just taken
                    break
            else:
                run.running = False
        except _Stop as stop:
            run.error, run.running = stop.reason, False
        except Exception as err:  # noqa: BLE001 - the run stops with a message, never a traceback (a click's
            # rerun is a BaseException: it passes, and the next advance carries on)
            run.error, run.running = self.stop_reason(err) or f"The run stopped: {type(err).__name__}: {err}", False
        finally:
            for f in pending.values():
                f.cancel()

    def _take(self, fut: Future[Answer], run: SetRun) -> ImageRecord:
        """The record of the image the run waits for (its error as its problem), the run's totals
        updated; :class:`_Stop` when the error stops the run."""
        item = run.items[run.done]
        try:
            answer = fut.result()
        except Exception as err:  # noqa: BLE001 - worded by stop_reason, or kept as this image's problem
            reason = self.stop_reason(err)
            if reason is not None:
                raise _Stop(reason) from err
            return ImageRecord(item.image_id, item.label, problem=str(err).splitlines()[0] if str(err) else
                               type(err).__name__)
        run.model = run.model or answer.model
        run.request_s += answer.waited_s
        return answer.record


class _Stop(Exception):
    """An image's error that stops the whole run (``reason``: the words for the page)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
