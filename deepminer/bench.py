"""``deepminer bench``: the costs of explaining, measured side by side in one run.

For each model and each case (a 224 px patch, a 1536 x 908 whole image) the same input goes through

* **forward**: ``model(x)`` under ``torch.inference_mode()`` (the bare classifier);
* **explain**: :func:`deepminer.explain.explain_image` at ``max_side`` = the case's long side (so
  no resize differs from the forward's input);
* **gradcam**: ``pytorch_grad_cam.GradCAM`` on the unit layer (``model.features``), target = the
  predicted class, used as its README shows (context manager, one call);
* **sketch IoU**: :func:`deepminer.explain.units.sketch_iou` of a rectangle sketch at the original
  image size with ALL units' maps at the case's feature resolution (thresholds: each unit's 0.99
  quantile over the image, what the engine uses without an atlas; computed once, not timed);
* **ablate**: :func:`deepminer.explain.engine.ablation_from_features`, the ``ablate`` option on a
  cached image: :data:`~deepminer.options.MAX_ABLATE` units (the most influential on the
  prediction, the largest set a request may silence) zeroed in the float32 unit maps, the head,
  the image rule, the delta per class (the cost does not depend on which units);
* **domain**: :meth:`deepminer.domain.DomainModel.verdict`, the out-of-domain score the server adds
  to every answer (``input.domain``), from the explanation's ``unit_max``: the model's own
  ``domain.pt`` when one lies beside it and matches its weights, else a stand-in of the default
  shape (:func:`deepminer.domain.stand_in`; the cost depends only on the shapes).

Repetitions are interleaved (forward, explain, gradcam, sketch IoU, forward, ...) so machine load
affects every method alike; medians are reported and every ratio is a ratio of medians.

**Dissection** throughput (items/s) of the atlas's per-batch step,
:func:`deepminer.atlas.profile_batch` (forward + streaming quantile tails, top-k heaps, influence
counts, embedding), is compared with the bare ``model(x)`` on the same in-memory batches of 224 px
phantom patches (read once before timing: no loading on either side), interleaved (profile, forward,
profile, ...). The value is per model; it is reported under both cases.

**Serving** (``--serve``): :func:`measure_serve` takes the HTTP client's round-trip function (the
library never imports ``serve/``) and compares its p50 for a 1024 x 1024 8-bit PNG with the bare
forward at that size, interleaved, with the local forward on as many torch threads as the server's
worker reports (a CPU server). Each request carries a different image (one pixel changed) so the
server's feature cache never answers instead of the model. The worker's own forward time of each
request gives a second, noise-free figure: round trip - own forward (``serve_overhead_ms``).

**Start-up** (:func:`measure_startup`): the wall time of fresh ``python -m deepminer --help`` and
``python -m deepminer inspect`` (of a generated 4500 x 3000 16-bit DICOM) subprocesses, medians.
"""
from __future__ import annotations

import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepminer import runtime
from deepminer.errors import InputError
from deepminer.models.fcn import FCN

CASES: dict[str, tuple[int, int]] = {"patch": (224, 224), "whole": (1536, 908)}  # (height, width)
SERVE_SIZE = (1024, 1024)
DEFAULT_MODEL = Path("model_store") / "demo" / "model.pt"
DEFAULT_ARCH = "efficientnet_lite0"
SKETCH_QUANTILE = 0.99
DISSECT_BATCHES = 3          # batches of patches per dissection pass (at least)
DISSECT_IMAGE_PX = 512       # height of the phantom images the patches come from
PATCHES_PER_IMAGE = 40       # about what a 512 px phantom gives (for sizing the data set)

# name -> (comparison, bound, cases it applies to)
TARGETS: dict[str, tuple[str, float, tuple[str, ...]]] = {
    "explain_vs_forward": ("<=", 1.15, ("patch", "whole")),
    "gradcam_vs_explain": (">=", 2.5, ("patch", "whole")),
    "sketch_iou_ms": ("<=", 20.0, ("whole",)),
    "ablate_ms": ("<=", 20.0, ("patch", "whole")),
    "domain_ms": ("<=", 5.0, ("patch", "whole")),
    "dissect_vs_forward": (">=", 0.8, ("patch", "whole")),
    "serve_vs_forward_ms": ("<=", 50.0, ()),
    "startup_help_s": ("<=", 0.4, ()),
    "dicom_results_ms": ("<=", 500.0, ()),
    "eval_cam_vs_forward": ("<=", 1.25, ()),
}


DICOM_RESULT_MB = 5.0  #: the SEG and the SC of a full-field source, each (RLE Lossless)


# -- small pieces ---------------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile ``q`` in [0, 100] (NumPy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def check(name: str, value: float | None, case: str | None = None) -> str | None:
    """``PASS``/``MISS`` of ``value`` against :data:`TARGETS`; None when no target applies."""
    if name not in TARGETS or value is None or not math.isfinite(value):
        return None
    op, bound, cases = TARGETS[name]
    if case is not None and case not in cases:
        return None
    ok = value <= bound if op == "<=" else value >= bound
    return "PASS" if ok else "MISS"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock milliseconds of ``fn()`` (the device synchronised before and after)."""
    return timed(fn, device)[0]


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """``(wall ms, process CPU ms)`` of ``fn()`` (the device synchronised before and after). CPU
    time sums all threads; with one torch thread on a loaded machine it is the steadier number."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, CPU count, torch threads, load, the device."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
           "load_average": load, "freed_memory_kept": runtime.is_applied()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# -- inputs ---------------------------------------------------------------------------------------

def bench_images(seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic grey images ``(H, W)`` float32 in [0, 1] for every case and the serve size: a
    phantom mammogram (rendered at 512 px, resized bilinearly) and a 224 px crop of it centred on
    the breast."""
    import torch.nn.functional as F

    from deepminer.data.phantoms import BITS, render_phantom

    ph = render_phantom(seed, 0, size=512)
    base = torch.from_numpy(ph.image.astype(np.float32) / float(2 ** BITS - 1))[None, None]

    def resized(h: int, w: int) -> np.ndarray:
        out = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return out[0, 0].clamp(0, 1).numpy().astype(np.float32)

    whole = resized(*CASES["whole"])
    ys, xs = np.nonzero(ph.breast)
    ph_h, ph_w = ph.breast.shape
    cy = int(ys.mean() / ph_h * whole.shape[0]) if ys.size else whole.shape[0] // 2
    cx = int(xs.mean() / ph_w * whole.shape[1]) if xs.size else whole.shape[1] // 2
    images = {"whole": whole, "serve": resized(*SERVE_SIZE)}
    for name, (h, w) in CASES.items():
        if name == "whole":
            continue
        if h <= whole.shape[0] and w <= whole.shape[1]:
            y0 = min(max(0, cy - h // 2), whole.shape[0] - h)
            x0 = min(max(0, cx - w // 2), whole.shape[1] - w)
            images[name] = np.ascontiguousarray(whole[y0:y0 + h, x0:x0 + w])
        else:
            images[name] = resized(h, w)
    return images


def rectangle_sketch(shape: tuple[int, int]) -> np.ndarray:
    """A rectangle sketch (bool ``(H, W)``): rows 40-60 %, columns 30-70 % of the image."""
    h, w = shape
    s = np.zeros((h, w), dtype=bool)
    s[int(0.4 * h):max(int(0.6 * h), int(0.4 * h) + 1), int(0.3 * w):max(int(0.7 * w), int(0.3 * w) + 1)] = True
    return s


def png8_variants(image: np.ndarray, n: int) -> list[bytes]:
    """``n`` 8-bit grey PNGs of ``image`` that differ in one pixel each: the lowest bit of one of the
    brightest pixels is flipped, so the change lies inside the breast and survives the tissue mask
    (a changed background pixel is zeroed by the mask and the server answers from its feature cache)."""
    from PIL import Image

    base = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    bright = np.argsort(base.reshape(-1), kind="stable")[::-1][:max(1, n)]
    out = []
    for i in range(n):
        a = base.copy()
        a.flat[bright[i % bright.size]] ^= 1
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")  # uint8 (H, W): 8-bit grey
        out.append(buf.getvalue())
    return out


# -- models ---------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """One model to bench: a checkpoint path (``kind='model'``) or an architecture (``'arch'``)."""

    kind: str
    value: str


def default_specs(root: Path | None = None) -> list[ModelSpec]:
    """``model_store/demo/model.pt`` (here or in the project checkout) if it exists, else
    :data:`DEFAULT_ARCH` with its pretrained weights."""
    here = Path.cwd() / DEFAULT_MODEL
    if here.is_file():
        return [ModelSpec("model", str(DEFAULT_MODEL))]
    root = root or Path(__file__).resolve().parents[1]
    if (root / DEFAULT_MODEL).is_file():
        return [ModelSpec("model", str(root / DEFAULT_MODEL))]
    return [ModelSpec("arch", DEFAULT_ARCH)]


def load_spec(spec: ModelSpec, device: torch.device) -> tuple[FCN, dict[str, Any]]:
    """The FCN of ``spec`` on ``device`` (eval mode) and what to say about it."""
    from deepminer.models import build_model, load_model

    if spec.kind == "model":
        path = Path(spec.value)
        if not path.is_file():
            raise InputError(f"{path}: no such model file")
        model = load_model(path)
        name = path.parent.name if path.stem == "model" else path.stem
        info: dict[str, Any] = {"name": name, "source": str(path), "weights": "checkpoint"}
    elif spec.kind == "arch":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model(spec.value, pretrained=True)
        random_init = any("initialised randomly" in str(w.message) for w in caught) or spec.value == "tiny"
        info = {"name": spec.value, "source": f"--arch {spec.value}",
                "weights": "random (no ImageNet weights ship here)" if random_init else "ImageNet"}
    else:
        raise InputError(f"model spec: unknown kind {spec.kind!r}")
    model = model.to(device).eval()
    model.requires_grad_(True)  # Grad-CAM needs a graph; forward/explain run under inference_mode
    info.update(arch=model.arch, layer=model.layer, head=model.head_type, units=int(model.num_units),
                classes=list(model.classes))
    return model, info


def _log_rep(log: Callable[[str], None] | None, label: str, i: int, warmup: int, repeats: int,
             got: dict[str, float]) -> None:
    """One progress line per repetition (stderr): what it measured."""
    if log is None:
        return
    tag = f"warm-up {i + 1}/{warmup}" if i < warmup else f"rep {i - warmup + 1}/{repeats}"
    log(f"  {label} {tag}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))


# -- one case -------------------------------------------------------------------------------------

def bench_domain(model: FCN, checkpoint: str | os.PathLike | None = None) -> Any:
    """The out-of-domain summary the ``domain`` step times: the ``domain.pt`` beside the model's
    ``checkpoint`` when there is one fitted for these weights, else a stand-in."""
    from deepminer.domain import FILE_NAME, DomainModel, stand_in
    from deepminer.errors import DeepMinerError
    from deepminer.models.checkpoints import weights_sha256

    if checkpoint:
        path = Path(checkpoint).parent / FILE_NAME
        if path.is_file():
            try:
                return DomainModel.load(path, weights_sha256=weights_sha256(model))
            except DeepMinerError:
                pass
    return stand_in(int(model.num_units))


def _gradcam(model: torch.nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """pytorch-grad-cam's GradCAM of class ``target`` on the unit layer, as its README uses it."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.features]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target))])
    return out


def measure_case(model: FCN, image: np.ndarray, device: torch.device, *, repeats: int,
                 warmup: int, log: Callable[[str], None] | None = None, label: str = "",
                 domain: Any = None) -> dict[str, Any]:
    """Forward, explain, Grad-CAM and sketch IoU on one image, interleaved; medians and ratios."""
    import pytorch_grad_cam  # noqa: F401 - imported before any timing (its import takes seconds)

    from deepminer.explain import explain_image, prepare_image, quantile_thresholds, sketch_iou
    from deepminer.explain.engine import ablation_from_features
    from deepminer.options import MAX_ABLATE

    domain = bench_domain(model) if domain is None else domain
    h, w = image.shape
    side = max(h, w)
    x, _ = prepare_image(image, side, device)
    if tuple(x.shape[-2:]) != (h, w):
        raise RuntimeError(f"bench: the model input {tuple(x.shape[-2:])} differs from the image {(h, w)}")
    with torch.inference_mode():
        pred = int(model(x)[0].argmax())
    # (K, h, w) float16: what the engine hands to sketch_iou
    full = explain_image(model, image, max_side=side, unit_maps="all")
    maps = full.unit_maps.stack
    with torch.inference_mode():  # the float32 unit maps the cache keeps for an ablation
        feats = model.forward_features(x)[0].float().cpu().numpy()
    silenced = full.ranked_units(full.prediction, min(MAX_ABLATE, int(maps.shape[0])))
    thr = quantile_thresholds(maps.reshape(maps.shape[0], -1).T.astype(np.float32), SKETCH_QUANTILE)
    sketch = rectangle_sketch((h, w))

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    steps: dict[str, Callable[[], Any]] = {
        "forward_ms": forward,
        "explain_ms": lambda: explain_image(model, image, max_side=side),
        "gradcam_ms": lambda: _gradcam(model, x, pred),
        "sketch_iou_ms": lambda: sketch_iou(sketch, maps, thr),
        "ablate_ms": lambda: ablation_from_features(model, feats, silenced, full, None),
        "domain_ms": lambda: domain.verdict(full.unit_max),
    }
    raw: dict[str, list[float]] = {k: [] for k in steps}
    raw_cpu: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + repeats):
        got = {key: timed(fn, device) for key, fn in steps.items()}
        model.zero_grad(set_to_none=True)  # free Grad-CAM's parameter gradients (not timed)
        if i >= warmup:
            for key, (ms, cpu_ms) in got.items():
                raw[key].append(ms)
                raw_cpu[key].append(cpu_ms)
        _log_rep(log, label, i, warmup, repeats, {k: v[0] for k, v in got.items()})
    med = {k: median(v) for k, v in raw.items()}
    cpu = {k: median(v) for k, v in raw_cpu.items()}
    return {
        "input": [h, w], "map": [int(maps.shape[1]), int(maps.shape[2])], "units": int(maps.shape[0]),
        "ablated_units": len(silenced),
        "prediction": model.classes[pred],
        **med,
        "explain_vs_forward": med["explain_ms"] / med["forward_ms"],
        "gradcam_vs_explain": med["gradcam_ms"] / med["explain_ms"],
        "domain_vs_forward": med["domain_ms"] / med["forward_ms"], "domain_source": domain.fit.get("source", "file"),
        "cpu": {**cpu, "explain_vs_forward": cpu["explain_ms"] / max(cpu["forward_ms"], 1e-9),
                "gradcam_vs_explain": cpu["gradcam_ms"] / max(cpu["explain_ms"], 1e-9)},
        "raw": raw, "raw_cpu": raw_cpu,
    }


# -- dissection -----------------------------------------------------------------------------------

@dataclass
class PhantomPatches:
    """A temporary phantom data set (every image in split ``test``) with its ``patches.csv``."""

    folder: Path
    items: int
    images: int
    _tmp: Any = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def phantom_patches(min_items: int, *, image_px: int = DISSECT_IMAGE_PX, seed: int = 0,
                    workdir: str | os.PathLike | None = None) -> PhantomPatches:
    """Write a phantom data set into a temporary folder and a patch table of its first
    ``min_items`` patches (fewer only when three tries at more images do not give that many)."""
    from deepminer.data.patches import PATCHES_CSV, extract_patches
    from deepminer.data.phantoms import generate_dataset

    tmp = tempfile.TemporaryDirectory(prefix="deepminer-bench-", dir=workdir)
    count = max(1, math.ceil(min_items / PATCHES_PER_IMAGE))
    for attempt in range(3):
        folder = Path(tmp.name) / f"data{attempt}"
        generate_dataset(folder, count, seed, image_px, splits={"test": 1.0})
        table = extract_patches(folder, progress=False)
        if len(table) >= min_items or attempt == 2:
            break
        count = math.ceil(count * min_items / max(1, len(table))) + 1
    if table.empty:
        tmp.cleanup()
        raise InputError("bench: the phantom data set gave no patches")
    table = table.iloc[:max(1, min_items)]  # exactly the batches asked for (rows are grouped by image)
    table.to_csv(folder / PATCHES_CSV, index=False, lineterminator="\n")
    return PhantomPatches(folder, len(table), int(table["image_id"].nunique()), tmp)


def _patch_batches(folder: Path, batch_size: int, patch_px: int, device: torch.device
                   ) -> tuple[list[torch.Tensor], np.ndarray]:
    """The ``test`` patches of ``folder`` in dissection order (grouped by image), read once and kept
    on ``device`` as batches of ``batch_size``, and the image index of each patch."""
    from deepminer.data.patches import PATCHES_CSV, PatchDataset, read_patches, split_table

    refs = split_table(read_patches(folder / PATCHES_CSV), "test")
    codes = refs["image_id"].map({v: j for j, v in enumerate(dict.fromkeys(refs["image_id"]))}).to_numpy()
    order = np.argsort(codes, kind="stable")
    ds = PatchDataset(folder, refs.iloc[order].reset_index(drop=True), size=patch_px, augment=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
    return list(x.split(batch_size)), codes[order].astype(np.int64)


def _profile_all(model: torch.nn.Module, batches: Sequence[torch.Tensor], state: Any) -> None:
    from deepminer.atlas import profile_batch

    for xb in batches:
        profile_batch(model, xb, state)


def _forward_all(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> None:
    with torch.inference_mode():
        for xb in batches:
            model(xb)


def measure_dissect(model: torch.nn.Module, device: torch.device, *, batch_size: int, repeats: int,
                    warmup: int, patch_px: int = 224, image_px: int = DISSECT_IMAGE_PX,
                    batches: int = DISSECT_BATCHES, log: Callable[[str], None] | None = None, label: str = "",
                    workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Dissection's per-batch step (:func:`deepminer.atlas.profile_batch`) vs the bare forward
    ``model(x)``, items/s over the same in-memory batches of phantom patches, interleaved (a fresh
    :class:`~deepminer.atlas.ProfileState` each repetition, made before the clock starts); see the
    module docstring."""
    from functools import partial

    from deepminer.atlas import ProfileState

    data = phantom_patches(batch_size * batches, image_px=image_px, workdir=workdir)
    try:
        xs, image_index = _patch_batches(data.folder, batch_size, patch_px, device)
    finally:
        data.cleanup()
    n = sum(int(xb.shape[0]) for xb in xs)
    raw: dict[str, list[float]] = {"dissect_items_per_s": [], "forward_items_per_s": []}
    raw_cpu: dict[str, list[float]] = {"dissect_ms": [], "forward_ms": []}
    for i in range(warmup + repeats):
        state = ProfileState(model, n, image_index, device=device)
        d_ms, d_cpu = timed(partial(_profile_all, model, xs, state), device)
        f_ms, f_cpu = timed(partial(_forward_all, model, xs), device)
        got = {"dissect_items_per_s": n / max(d_ms / 1000.0, 1e-12),
               "forward_items_per_s": n / max(f_ms / 1000.0, 1e-12)}
        if i >= warmup:
            for key, v in got.items():
                raw[key].append(v)
            raw_cpu["dissect_ms"].append(d_cpu)
            raw_cpu["forward_ms"].append(f_cpu)
        _log_rep(log, f"{label} dissection", i, warmup, repeats, got)
    med = {k: median(v) for k, v in raw.items()}
    cpu = {k: median(v) for k, v in raw_cpu.items()}
    return {
        "method": "deepminer.atlas.profile_batch (forward + streaming quantile tails, top-k heaps, influence "
                  "counts, embedding) vs model(x), on the same in-memory batches",
        "items": n, "images": data.images, "batch_size": batch_size, "patch_px": patch_px,
        **med,
        "dissect_vs_forward": med["dissect_items_per_s"] / med["forward_items_per_s"],
        "cpu": {**cpu, "dissect_vs_forward": cpu["forward_ms"] / max(cpu["dissect_ms"], 1e-9)},
        "raw": raw, "raw_cpu": raw_cpu,
    }


# -- serving --------------------------------------------------------------------------------------

def _serve_sample(answer: Any) -> dict[str, Any]:
    """A round trip's answer -> ``{"ms", "server_forward_ms", "threads", "device"}`` (a bare number
    is the milliseconds alone)."""
    if isinstance(answer, Mapping):
        return {"ms": float(answer["ms"]), "server_forward_ms": answer.get("server_forward_ms"),
                "threads": answer.get("threads"), "device": answer.get("device")}
    return {"ms": float(answer), "server_forward_ms": None, "threads": None, "device": None}


SERVE_JIT_WARMUP = 200


def measure_serve(model: torch.nn.Module, image: np.ndarray, round_trip: Callable[[bytes], Any],
                  device: torch.device, *, repeats: int, warmup: int, jit_warmup: int = SERVE_JIT_WARMUP,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """p50/p90 of ``round_trip(png_bytes)`` for a 1024 x 1024 8-bit PNG, interleaved with the bare
    forward of ``model`` at that size; ``serve_vs_forward_ms`` = p50 - median forward.

    ``round_trip`` returns the milliseconds, or a mapping with ``ms`` and what the server said of
    itself: ``server_forward_ms`` (the worker's own forward of this request), ``threads`` (its torch
    threads) and ``device``. When the server is on the CPU and names its threads, the local forward
    runs with as many (the side-by-side compares the same work on the same cores; restored
    afterwards), and ``serve_overhead_ms`` = median over requests of round trip - the worker's own
    forward: what serving adds, free of how fast the forward ran at that moment.

    First, ``jit_warmup`` untimed requests of one image (the first a forward, the rest answered from
    the server's feature cache, ~40 ms each): TorchServe's frontend is Java, and its request path
    runs 5-6 ms per request slower until the JIT has compiled it (measured on the demo model: 14 ms
    of TorchServe + HTTP per request over the first 50 requests, 9 ms after 250), so the p50 is that
    of a server that has been up a while, not of one just started."""
    from deepminer.explain import prepare_image

    h, w = image.shape
    x, _ = prepare_image(image, max(h, w), device)
    pngs = png8_variants(image, warmup + repeats + 1)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    before = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    fwd: list[float] = []
    server: dict[str, Any] = {}

    def ask(png: bytes) -> dict[str, Any]:
        sample = _serve_sample(round_trip(png))
        if not server:  # the first answer says how the server runs: match its threads from here on
            server.update(threads=sample["threads"], device=sample["device"])
            if (device.type == "cpu" and isinstance(sample["threads"], int) and sample["threads"] > 0
                    and str(sample["device"] or "cpu").startswith("cpu")):
                torch.set_num_threads(sample["threads"])
        return sample

    try:
        for i in range(max(0, jit_warmup)):
            ask(pngs[-1])
            if log is not None and (i + 1) % 50 == 0:
                log(f"  serve JIT warm-up {i + 1}/{jit_warmup} (one image, cached by the server)")
        for i in range(warmup + repeats):
            f_ms = timed_ms(forward, device)
            sample = ask(pngs[i])
            if i >= warmup:
                fwd.append(f_ms)
                rows.append(sample)
            _log_rep(log, "serve", i, warmup, repeats, {"forward_ms": f_ms, "serve_ms": sample["ms"]})
        forward_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    rt = [r["ms"] for r in rows]
    p50, fmed = median(rt), median(fwd)
    own = [r["ms"] - r["server_forward_ms"] for r in rows if r["server_forward_ms"] is not None]
    overhead = median(own) if len(own) == len(rows) else None
    return {"image": f"{w}x{h} 8-bit grey PNG ({len(pngs[0])} bytes), a different pixel per request",
            "jit_warmup": max(0, jit_warmup),
            "serve_p50_ms": p50, "serve_p90_ms": percentile(rt, 90), "forward_ms": fmed,
            "serve_vs_forward_ms": p50 - fmed, "serve_overhead_ms": overhead,
            "server_forward_ms": median([r["server_forward_ms"] for r in rows]) if overhead is not None else None,
            "forward_threads": forward_threads, "server_threads": server.get("threads"),
            "server_device": server.get("device"),
            "check": {"serve_vs_forward_ms": check("serve_vs_forward_ms", p50 - fmed)},
            "raw": {"serve_ms": rt, "forward_ms": fwd,
                    "server_forward_ms": [r["server_forward_ms"] for r in rows]}}


# -- the whole run --------------------------------------------------------------------------------

def run_bench(specs: Sequence[ModelSpec], *, cases: Sequence[str] = tuple(CASES), repeats: int = 5,
              warmup: int = 1, batch_size: int = 32, device: str = "auto", threads: int | None = None,
              round_trip: Callable[[bytes], float] | None = None, serve_url: str | None = None,
              dissect: bool = True, progress: bool = True, dissect_image_px: int = DISSECT_IMAGE_PX,
              serve_warmup: int = SERVE_JIT_WARMUP,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Bench every model of ``specs`` on every case; the JSON-ready report (see docs/bench.md).
    Applies :func:`deepminer.runtime.keep_freed_memory` (process-wide, as every ``deepminer``
    command and the server do). ``threads``: torch CPU threads during the run (restored afterwards). ``serve_warmup``: untimed
    requests before the serve measurement (:func:`measure_serve`'s ``jit_warmup``)."""
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise InputError(f"--cases: unknown case {unknown[0]!r}; known: {', '.join(CASES)}" if unknown
                         else "--cases: no case given")
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise InputError("--repeats and --batch-size must be >= 1, --warmup >= 0")
    if threads is not None and threads < 1:
        raise InputError(f"--threads: must be >= 1, got {threads}")
    if serve_warmup < 0:
        raise InputError(f"--serve-warmup: must be >= 0, got {serve_warmup}")
    runtime.keep_freed_memory()  # measure what the CLI and the server run with (deepminer/runtime.py)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _bench(specs, cases=cases, repeats=repeats, warmup=warmup, batch_size=batch_size, device=device,
                      round_trip=round_trip, serve_url=serve_url, dissect=dissect, progress=progress,
                      dissect_image_px=dissect_image_px, serve_warmup=serve_warmup, log=log)
    finally:
        torch.set_num_threads(before)  # a library call leaves the process as it found it


def _bench(specs: Sequence[ModelSpec], *, cases: Sequence[str], repeats: int, warmup: int, batch_size: int,
           device: str, round_trip: Callable[[bytes], float] | None, serve_url: str | None, dissect: bool,
           progress: bool, dissect_image_px: int, serve_warmup: int,
           log: Callable[[str], None] | None) -> dict[str, Any]:
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rep_log = say if progress else None
    dev = runtime.resolve_device(device)  # a one-line InputError for an unknown or absent device
    env = environment(dev)  # the load average as the run starts
    if env["load_average"] and env["load_average"][0] > (env["cpu_count"] or 1) and torch.get_num_threads() > 1:
        say(f"bench: note: load average {env['load_average'][0]} on {env['cpu_count']} CPUs with "
            f"{torch.get_num_threads()} torch threads; parallel kernels stall under oversubscription, "
            "--threads 1 gives steadier numbers")
    say("bench: preparing inputs")
    images = bench_images()
    models: dict[str, Any] = {}
    loaded = []
    for spec in specs:  # load every model first: a bad path fails before any long work
        loaded.append(load_spec(spec, dev))
    for model, info in loaded:
        name = info["name"]
        n = 2
        while name in models:
            name, n = f"{info['name']}#{n}", n + 1
        entry: dict[str, Any] = {**info, "cases": {}}
        domain = bench_domain(model, info["source"] if info.get("weights") == "checkpoint" else None)
        for case in cases:
            say(f"bench: {name} {case} {CASES[case][0]}x{CASES[case][1]}")
            entry["cases"][case] = measure_case(model, images[case], dev, repeats=repeats, warmup=warmup,
                                                log=rep_log, label=f"{name}/{case}", domain=domain)
        if dissect:
            say(f"bench: {name} dissection, batch {batch_size}")
            d = measure_dissect(model, dev, batch_size=batch_size, repeats=repeats, warmup=warmup,
                                image_px=dissect_image_px, log=rep_log, label=name)
            entry["dissect"] = d
            for res in entry["cases"].values():
                res.update(dissect_items_per_s=d["dissect_items_per_s"],
                           forward_items_per_s=d["forward_items_per_s"],
                           dissect_vs_forward=d["dissect_vs_forward"])
        for case, res in entry["cases"].items():
            res["check"] = {k: check(k, res.get(k), case) for k in TARGETS if k in res}
        models[name] = entry
    report: dict[str, Any] = {
        "environment": env,
        "settings": {"cases": {c: list(CASES[c]) for c in cases}, "repeats": repeats, "warmup": warmup,
                     "batch_size": batch_size, "dissect": bool(dissect), "sketch": "rectangle, rows 40-60 %, columns 30-70 %",
                     "sketch_thresholds": f"per-unit {SKETCH_QUANTILE} quantile over the image",
                     "statistic": "median of interleaved repetitions; ratios of medians"},
        "targets": {k: {"op": op, "bound": b, "cases": list(cs)} for k, (op, b, cs) in TARGETS.items()},
        "models": models,
    }
    if "whole" in cases:  # a whole-image row: with the whole case
        say(f"bench: DICOM results (SEG + SR + SC) of a {STARTUP_DICOM[0]}x{STARTUP_DICOM[1]} DICOM, "
            f"{loaded[0][1]['name']}")
        report["dicom_results"] = measure_dicom_results(loaded[0][0], repeats=repeats, warmup=warmup)
    if round_trip is not None:
        model, info = loaded[0]
        say(f"bench: serve round trip {serve_url or ''} vs {info['name']} forward at "
            f"{SERVE_SIZE[0]}x{SERVE_SIZE[1]}")
        report["serve"] = {"url": serve_url, "local_model": info["name"],
                           **measure_serve(model, images["serve"], round_trip, dev, repeats=repeats,
                                           warmup=max(1, warmup), jit_warmup=serve_warmup, log=rep_log)}
    report["environment"]["load_average_end"] = environment(dev)["load_average"]
    return report


# -- start-up: `deepminer --help` and `deepminer inspect` as subprocesses ---------------------------

STARTUP_DICOM = (4500, 3000)  # (rows, columns) of the generated 16-bit DICOM that `inspect` reads
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"  # SOP class: Digital Mammography, for presentation


def command_wall_s(argv: Sequence[str], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``repeats`` runs of ``argv`` as a subprocess (output discarded), after
    ``warmup`` untimed runs (the OS file cache, Python's bytecode cache). A run that fails raises
    :class:`InputError` with the last line it wrote to stderr."""
    import subprocess

    if repeats < 1 or warmup < 0:
        raise InputError("--repeats must be >= 1, --warmup >= 0")
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise InputError(f"start-up: `{' '.join(argv)}` failed: {last}")
        if i >= warmup:
            times.append(wall)
    return times


def startup_dicom(path: str | os.PathLike, shape: tuple[int, int] = STARTUP_DICOM, seed: int = 0) -> Path:
    """Write a mammogram-like 16-bit MONOCHROME2 DICOM of ``shape`` (rows, columns), uncompressed: a
    bright half ellipse (the breast) against the left edge on a dark background, with noise."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    rows, cols = shape
    yy, xx = np.ogrid[0:rows, 0:cols]
    breast = (xx / cols) ** 2 + ((yy - rows / 2) / (rows / 2)) ** 2 < 0.8
    pixels = np.where(breast, 30000, 500).astype(np.uint16)
    pixels += np.random.default_rng(seed).integers(0, 2000, size=(rows, cols), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MG_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = UID(MG_FOR_PRESENTATION), meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "MG", "ANON", "Bench^Startup"
    ds.ImageLaterality, ds.ViewPosition = "L", "CC"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def measure_startup(*, repeats: int = 5, warmup: int = 1, python: str = sys.executable,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start-up wall time of ``python -m deepminer --help`` and of ``python -m deepminer inspect`` on
    a generated :data:`STARTUP_DICOM` 16-bit DICOM, each run as a fresh subprocess (medians of
    ``repeats`` after ``warmup``). ``startup_help_s`` is checked against :data:`TARGETS`."""
    with tempfile.TemporaryDirectory(prefix="deepminer-bench-startup-") as tmp:
        dicom = startup_dicom(Path(tmp) / "startup.dcm")
        commands = {"startup_help_s": [python, "-m", "deepminer", "--help"],
                    "startup_inspect_s": [python, "-m", "deepminer", "inspect", str(dicom)]}
        raw: dict[str, list[float]] = {}
        for key, argv in commands.items():
            if log:
                log(f"bench: start-up: {' '.join(['deepminer', *argv[3:]])} x {warmup} + {repeats}")
            raw[key] = command_wall_s(argv, repeats=repeats, warmup=warmup)
    res: dict[str, Any] = {k: median(v) for k, v in raw.items()}
    return {"command": f"{python} -m deepminer", "inspect_image": f"{STARTUP_DICOM[0]} x {STARTUP_DICOM[1]} "
            "(rows x columns) 16-bit DICOM, uncompressed", "repeats": repeats, "warmup": warmup, **res,
            "check": {"startup_help_s": check("startup_help_s", res["startup_help_s"])}, "raw": raw}


def format_startup(s: Mapping[str, Any]) -> list[str]:
    """The start-up rows of a :func:`measure_startup` result."""
    bound = TARGETS["startup_help_s"][1]
    return [f"start-up (fresh `python -m deepminer` subprocesses, wall s, median of {s['repeats']} "
            f"after {s['warmup']} warm-up):",
            f"  deepminer --help                                   {s['startup_help_s']:6.2f} s "
            f"{s['check']['startup_help_s']} (target <= {bound} s)",
            f"  deepminer inspect {STARTUP_DICOM[0]}x{STARTUP_DICOM[1]} 16-bit DICOM           "
            f"{s['startup_inspect_s']:6.2f} s"]


# -- DICOM results: SEG + SR + SC of one explained image -----------------------------------------

def measure_dicom_results(model: FCN, *, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Wall ms of :func:`deepminer.dicom_results.build_results` + serialising the three objects
    (``DicomResults.to_bytes``) for a :data:`STARTUP_DICOM` 16-bit DICOM explained by ``model``
    (max side 1024, top unit maps), the decoded pixels given (as the CLI and the workbench have them);
    the decode itself is reported apart (``decode_ms``). ``dicom_results_ms`` is checked."""
    from deepminer.dicom_results import build_results, decode_pixels, read_source
    from deepminer.explain import explain_image

    with tempfile.TemporaryDirectory(prefix="deepminer-bench-dicom-") as tmp:
        source = read_source(startup_dicom(Path(tmp) / "results.dcm"))
    t0 = time.perf_counter()
    pixels = decode_pixels(source)
    decode_ms = (time.perf_counter() - t0) * 1000.0
    expl = explain_image(model, pixels, max_side=1024, unit_maps="top")
    times, cpu, sizes = [], [], {}
    for i in range(warmup + repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        sizes = {k: len(v) for k, v in build_results(source, expl, pixels=pixels).to_bytes().items()}
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
            cpu.append((time.process_time() - c0) * 1000.0)
    ms = median(times)
    return {"image": f"{STARTUP_DICOM[0]} x {STARTUP_DICOM[1]} (rows x columns) 16-bit DICOM, uncompressed",
            "dicom_results_ms": ms, "cpu_ms": median(cpu), "decode_ms": decode_ms, "bytes": sizes,
            "repeats": repeats, "check": {"dicom_results_ms": check("dicom_results_ms", ms)},
            "raw": {"dicom_results_ms": times, "cpu_ms": cpu}}


# -- output ---------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "nan"
    return str(v)


def _mark(value: float | None, verdict: str | None, digits: int = 2) -> str:
    return _fmt(value, digits) + ("" if verdict is None else f" {verdict}")


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table of a :func:`run_bench` report."""
    env = report["environment"]
    head = ["model", "case", "input", "fwd ms", "explain ms", "gradcam ms", "iou ms", "ablate ms", "domain ms",
            "dissect it/s",
            "fwd it/s", "explain/fwd", "gradcam/explain", "dissect/fwd"]
    rows = []
    for name, entry in report["models"].items():
        for case, r in entry["cases"].items():
            c = r.get("check", {})
            rows.append([name, case, f"{r['input'][0]}x{r['input'][1]}", _fmt(r["forward_ms"]),
                         _fmt(r["explain_ms"]), _fmt(r["gradcam_ms"]),
                         _mark(r["sketch_iou_ms"], c.get("sketch_iou_ms"), 1),
                         _mark(r.get("ablate_ms"), c.get("ablate_ms"), 1),
                         _mark(r.get("domain_ms"), c.get("domain_ms"), 2),
                         _fmt(r.get("dissect_items_per_s")), _fmt(r.get("forward_items_per_s")),
                         _mark(r["explain_vs_forward"], c.get("explain_vs_forward")),
                         _mark(r["gradcam_vs_explain"], c.get("gradcam_vs_explain")),
                         _mark(r.get("dissect_vs_forward"), c.get("dissect_vs_forward"))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(v).ljust(wd) if i < 3 else str(v).rjust(wd) for i, (v, wd) in enumerate(zip(cells, widths)))

    out = [f"deepminer bench: torch {env['torch']}, device {env['device']}"
           + (f" ({env['gpu']})" if env.get("gpu") else "")
           + f", {env['torch_threads']} threads, {env['cpu_count']} CPUs, load average "
           f"{env['load_average']} -> {env.get('load_average_end')}",
           f"medians of {report['settings']['repeats']} interleaved repetitions "
           f"(+{report['settings']['warmup']} warm-up)"
           + (f"; dissection at batch {report['settings']['batch_size']} on 224 px patches"
              if report["settings"].get("dissect", True) else ""),
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append("process CPU ms, medians (all threads; steadier than wall time on a loaded machine):")
    out.extend(f"  {name}/{case}: fwd {_fmt(r['cpu']['forward_ms'])}, explain {_fmt(r['cpu']['explain_ms'])}, "
               f"gradcam {_fmt(r['cpu']['gradcam_ms'])}, iou {_fmt(r['cpu']['sketch_iou_ms'])}, "
               f"ablate {_fmt(r['cpu'].get('ablate_ms'))}, domain {_fmt(r['cpu'].get('domain_ms'), 2)}, "
               f"explain/fwd {_fmt(r['cpu']['explain_vs_forward'], 2)}, "
               f"gradcam/explain {_fmt(r['cpu']['gradcam_vs_explain'], 2)}"
               for name, entry in report["models"].items() for case, r in entry["cases"].items())
    t = report["targets"]
    out.append("targets: explain/fwd <= {0}, gradcam/explain >= {1}, sketch IoU <= {2} ms (whole image), "
               "ablate <= {4} ms, domain <= {5} ms, dissect/fwd >= {3}".format(
                   t["explain_vs_forward"]["bound"], t["gradcam_vs_explain"]["bound"], t["sketch_iou_ms"]["bound"],
                   t["dissect_vs_forward"]["bound"], t["ablate_ms"]["bound"], t["domain_ms"]["bound"]))
    for name, entry in report["models"].items():
        out.append(f"  {name}: {entry['arch']}, {entry['units']} units at {entry['layer']}, "
                   f"weights {entry['weights']}")
    s = report.get("serve")
    if s:
        out.append(f"serve {s['url']}: {s['image']}: p50 {s['serve_p50_ms']:.1f} ms, p90 {s['serve_p90_ms']:.1f} ms; "
                   f"forward of {s['local_model']} {s['forward_ms']:.1f} ms ({s.get('forward_threads')} threads); "
                   f"p50 - forward {s['serve_vs_forward_ms']:.1f} ms "
                   f"{s['check']['serve_vs_forward_ms']} (target <= {t['serve_vs_forward_ms']['bound']:.0f} ms)")
        if s.get("serve_overhead_ms") is not None:
            out.append(f"  server {s.get('server_device')}, {s.get('server_threads')} threads: its own forward "
                       f"{s['server_forward_ms']:.1f} ms; round trip - own forward, median "
                       f"{s['serve_overhead_ms']:.1f} ms (decode, tissue mask, encoding, TorchServe, HTTP)")
    if report.get("eval"):
        from deepminer.evaluation.cost import format_eval_cost

        out += format_eval_cost(report["eval"], report["eval"]["check"]["eval_cam_vs_forward"])
    d = report.get("dicom_results")
    if d:
        out.append(f"DICOM results (SEG + SR + SC, built and serialised) of a {d['image']}: "
                   f"{d['dicom_results_ms']:.0f} ms {d['check']['dicom_results_ms']} "
                   f"(target <= {TARGETS['dicom_results_ms'][1]:.0f} ms; process CPU {d['cpu_ms']:.0f} ms, all "
                   f"threads); decoding the source {d['decode_ms']:.0f} ms; sizes "
                   + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in d["bytes"].items())
                   + f" (SEG and SC target <= {DICOM_RESULT_MB:.0f} MB each)")
    if report.get("startup"):
        out += format_startup(report["startup"])
    return "\n".join(out)


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report with floats rounded to 4 decimals (ms, items/s, ratios) and non-finite values
    as null."""
    def rnd(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4) if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rnd(x) for x in v]
        return v

    return rnd(report)
