"""What every row of ``deepminer bench`` shares: the cases and the targets (:data:`TARGETS`, the one
place the speed targets are written), medians and timers, the inputs, and the models to bench."""
from __future__ import annotations

import io
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    "decode_mask_s": ("<=", 2.0, ()),
    "word_vectors_load_s": ("<=", 10.0, ()),
}
DICOM_RESULT_MB = 5.0  #: the SEG and the SC of a full-field source, each (RLE Lossless, JPEG-LS Lossless)


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
    root = root or Path(__file__).resolve().parents[2]
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


def log_rep(log: Callable[[str], None] | None, label: str, i: int, warmup: int, repeats: int,
             got: dict[str, float]) -> None:
    """One progress line per repetition (stderr): what it measured."""
    if log is None:
        return
    tag = f"warm-up {i + 1}/{warmup}" if i < warmup else f"rep {i - warmup + 1}/{repeats}"
    log(f"  {label} {tag}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))
