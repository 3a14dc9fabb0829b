"""The explanation engine. One pass explains: :func:`explain_image` -> :class:`~deepminer.explanation.Explanation`.

One forward of the features under ``torch.inference_mode()`` on the model's device; everything
else is computed on the small unit maps ``(K, h, w)``:

* ``class_maps`` ``(C, h, w)``: softmax over the head's class-map logits, per cell;
* ``cam`` ``(C, h, w)``: raw CAM, ``sum_k w[c, k] * f_k`` (FC weights x unit maps, no bias, as
  torchcam's CAM); for a WILDCAT head the head's class maps themselves;
* ``unit_max`` ``[K]``, ``influence`` ``(C, K)`` = max activation x FC weight (DeepMiner), and
  ``top_units`` per class (descending influence);
* ``probabilities``: the image-level rule (:func:`image_probabilities`);
* ``ablation`` (the ``ablate`` option): the same from the unit maps with some units set to zero,
  through the head only (:func:`ablate_features`; the cache keeps the float32 unit maps, so a new
  unit set on a cached image costs no forward).

Geometry: the image is resized (bilinear, antialiased) so its long side is at most ``max_side``,
or exactly ``input_side`` (the model's own scale, :func:`deepminer.model_scale.input_side`);
``scale`` = model-input px per original px. The ``h x w`` cells of every map tile the ORIGINAL
image uniformly: cell ``(i, j)`` covers rows ``[i*H/h, (i+1)*H/h)`` and columns
``[j*W/w, (j+1)*W/w)`` (:meth:`Explanation.cell_box`), the same convention as bilinear
``align_corners=False`` upsampling of a map onto the image.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepminer.errors import InputError
from deepminer.explain.method_base import as_image, resize_image
from deepminer.explain.sketch import sketch_iou
from deepminer.explain.units import QUANTILE, quantile_thresholds
from deepminer.explanation import Ablation, Explanation, UnitMaps, rank_by_influence
from deepminer.geometry import DEFAULT_MAX_SIDE
from deepminer.model_scale import model_scale
from deepminer.models.fcn import FCN, breast_cells
from deepminer.models.fcn import patch_px as model_patch_px
from deepminer.options import DEFAULTS, UNIT_MAPS

NOT_RECORDED = "not recorded in the checkpoint"  #: ``model.trained_on`` of a checkpoint that does not say


def cam_from_features(model: FCN, feats: torch.Tensor,
                      class_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Raw CAM ``(B, C, h, w)``: FC weights x unit maps (no bias); a WILDCAT head's class maps."""
    if getattr(model, "head_type", "gap") == "wildcat":
        return model.class_logits(feats) if class_logits is None else class_logits
    return torch.einsum("ck,bkhw->bchw", model.unit_weights.to(feats.dtype), feats)


def image_level(model: FCN) -> dict | None:
    """A whole-image model's ``meta["image_level"]`` (pool, temperature, mix), or None for a patch model."""
    level = (getattr(model, "meta", None) or {}).get("image_level")
    return level if isinstance(level, dict) else None


def calibration_mix(model: FCN) -> tuple[tuple[int, int] | None, float]:
    """``((a, b) class indices, rate)`` of a whole-image model's calibration mix
    (``meta["image_level"]["mix"]``, :func:`deepminer.metrics.calibrated_probabilities`), or
    ``(None, 0.0)`` when it has none (a temperature alone, or a checkpoint from before the mix)."""
    mix = (image_level(model) or {}).get("mix")
    if not isinstance(mix, dict) or not float(mix.get("rate") or 0.0):
        return None, 0.0
    names = list(model.classes)
    a, b = (str(c) for c in mix.get("classes") or ())
    if a not in names or b not in names:
        raise InputError(f"the checkpoint's calibration mixes {a!r} and {b!r}, which are not its classes")
    return (names.index(a), names.index(b)), float(mix["rate"])


def image_probabilities(model: FCN, class_logits: torch.Tensor, input_hw: tuple[int, int],
                        patch_px: int | None = None, cells: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, str, tuple[int, int, int, int] | None]:
    """Image-level probabilities ``[C]`` from class-map logits ``(1, C, h, w)``.

    * A whole-image model (``deepminer train-whole``: ``meta["image_level"]``): its head's own pooling
      over the breast ``cells`` (bool ``(h, w)``, :func:`deepminer.models.fcn.breast_cells`; all cells
      when None), divided by the temperature fitted on validation, softmax, then benign and
      malignant mixed at the rate fitted with it (:func:`calibration_mix`; none in an older
      checkpoint): exactly what it was trained and calibrated on.

    * WILDCAT head: softmax of the head's own pooling (top-k + alpha x bottom-k) over the whole
      map, i.e. exactly ``softmax(model(x))``; it was made for maps of any size.
    * GAP head (DeepMiner, trained on patches): by linearity, the mean of the class-map logits
      over a window of cells is what the classifier gives a patch covering that window. The
      window is the training patch (``patch_px`` model-input px, default
      :func:`deepminer.models.fcn.patch_px`) in cells, clipped to the map; the
      image's probabilities are those of the most abnormal window, the one with the lowest
      probability of the first class (``normal``): an image is as suspicious as its most
      suspicious patch. When the input is at most one patch, there is one window and the result
      is exactly ``softmax(model(x))`` (the classifier's output at patch size).

    Returns ``(probabilities, rule, window)``; ``window`` = ``(i0, j0, i1, j1)`` cells or None.
    """
    level = image_level(model)
    if level is not None:
        h, w = class_logits.shape[-2:]
        c = cells if cells is not None else torch.ones((h, w), dtype=torch.bool, device=class_logits.device)
        temperature = float(level.get("temperature") or 1.0)
        pooled = model.pool(class_logits.float(), c[None].to(class_logits.device))[0]
        rule = (f"whole image: {level.get('pool', 'pooled')} over {int(c.sum())} of {h * w} cells, "
                f"/ temperature {temperature:.3g}, softmax")
        probs = torch.softmax(pooled / temperature, 0)
        pair, rate = calibration_mix(model)
        if pair is not None:
            a, b = pair
            mixed = probs.clone()
            mixed[a] = (1.0 - rate) * probs[a] + rate * probs[b]
            mixed[b] = (1.0 - rate) * probs[b] + rate * probs[a]
            probs = mixed
            rule += f", {model.classes[a]}/{model.classes[b]} mixed at {rate:.3g}"
        return probs, rule, None
    if getattr(model, "head_type", "gap") == "wildcat":
        probs = torch.softmax(model.pool(class_logits)[0].float(), 0)
        return probs, "wildcat: softmax of the head's pooling", None
    h, w = class_logits.shape[-2:]
    patch_px = model_patch_px(model, patch_px)
    wh = min(h, max(1, round(patch_px * h / input_hw[0])))
    ww = min(w, max(1, round(patch_px * w / input_hw[1])))
    win = F.avg_pool2d(class_logits.float(), (wh, ww), stride=1)[0]  # (C, h', w')
    probs = torch.softmax(win, 0)
    flat = int(torch.argmin(probs[0].reshape(-1)))
    i, j = divmod(flat, probs.shape[-1])
    rule = (f"gap: most abnormal {wh}x{ww}-cell window ({patch_px} px patch)"
            if (wh, ww) != (h, w) else "gap: softmax of the mean logits (one patch)")
    return probs[:, i, j], rule, (i, j, i + wh, j + ww)


def ablate_features(model: FCN, feats: torch.Tensor, units: Any, input_hw: tuple[int, int],
                    patch_px: int | None = None, cells: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, str, tuple[int, int, int, int] | None]:
    """The model with ``units`` silenced, from its unit maps ``feats`` ``(1, K, h, w)``: those
    channels set to zero, then the head (``class_logits``) and the image rule
    (:func:`image_probabilities`), exactly as the forward pass does after the backbone; either head
    (GAP or WILDCAT). Returns ``(probabilities [C], class_maps (C, h, w), rule, window)``."""
    ids = [int(u) for u in units]
    k = int(feats.shape[1])
    if any(not 0 <= u < k for u in ids):
        raise InputError(f"ablate: unit ids must be in 0..{k - 1}, got {ids}")
    with torch.inference_mode():
        f = feats.clone()
        if ids:
            f[:, ids] = 0
        logits = model.class_logits(f)
        probs, rule, window = image_probabilities(model, logits, input_hw, patch_px, cells)
        return probs, torch.softmax(logits.float(), 1)[0], rule, window


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On CPU, torch's intra-op threads set to 1 inside (restored after). The head on cached unit
    maps is a few small kernels (~1 ms on one thread at 1024 px); split over threads on a loaded
    machine each of them can stall for tens of ms (measured: 1.5 ms on one thread, 150-250 ms on two
    with the load average at 5x the cores). A concurrent forward in another Python thread of the
    process may run on fewer threads meanwhile (slower, never wrong)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ablation_from_features(model: FCN, feats: np.ndarray | torch.Tensor, units: Any, core: Explanation,
                           patch_px: int | None) -> Ablation:
    """:func:`ablate_features` on the float32 unit maps ``(K, h, w)`` of ``core``'s pass -> :class:`Ablation`."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    if isinstance(feats, np.ndarray):
        with warnings.catch_warnings():  # read-only (shared with the cache): ablate_features clones it
            warnings.simplefilter("ignore", UserWarning)
            feats = torch.from_numpy(feats)
    f = feats.to(device)[None]
    hw = (int(core.input["model_height"]), int(core.input["model_width"]))
    cells = None if core.breast_cells is None else torch.from_numpy(np.ascontiguousarray(core.breast_cells))
    with _one_cpu_thread(device):
        probs, maps, _, window = ablate_features(model, f, units, hw, patch_px, cells)
    p = probs.float().cpu().numpy()
    classes = core.classes
    after = {c: float(v) for c, v in zip(classes, p)}
    return Ablation(units=tuple(int(u) for u in units), probabilities=after,
                    prediction=classes[int(np.argmax(p))], class_maps=maps.float().cpu().numpy(),
                    delta={c: after[c] - float(core.probabilities[c]) for c in classes}, window=window,
                    ms=round((time.perf_counter() - t0) * 1000, 3))


def _image_key(image: torch.Tensor, max_side: Any, model: FCN, patch_px: int | None,
               content: str | None = None) -> str:
    h = hashlib.sha1()
    if content is None:
        h.update(image.contiguous().numpy().data)  # the buffer itself, no copy
    else:
        h.update(b"content:" + content.encode())
    h.update(repr((tuple(image.shape), max_side, patch_px, id(model), getattr(model, "arch", ""),
                   getattr(model, "num_units", 0))).encode())
    return h.hexdigest()


def explain_image(model: FCN, image: Any, *, max_side: int | None = DEFAULT_MAX_SIDE,
                  top_units: int = DEFAULTS["top_units"], unit_maps: str = DEFAULTS["unit_maps"],
                  sketch: Any = None, thresholds: Any = None, cache: Any = None, patch_px: int | None = None,
                  cache_key: str | None = None, ablate: Any = (),
                  input_side: tuple[int, str] | int | None = None) -> Explanation:
    """Explain one grey image ``(H, W)`` float in [0, 1] with one forward pass of ``model`` (FCN).

    ``max_side``: long side of the model input at most (None: as is; never enlarged).
    ``input_side``: the model input's exact long side instead (enlarging too), as
    :func:`deepminer.model_scale.input_side` answers it: ``(side, how)`` (``how`` becomes
    ``input.scale_source``) or a bare side; it overrides ``max_side``. ``top_units``: units listed per class
    in ``top_units``. ``unit_maps`` (:data:`~deepminer.options.UNIT_MAPS`): the unit maps kept in the
    result: ``all``, the ``top`` units of every class, or ``none``. ``sketch``: bool ``(H, W)`` in original
    pixels -> ``sketch_iou`` [K] (:func:`deepminer.explain.sketch.sketch_iou`) against the unit
    masks at ``thresholds`` [K] (the atlas's per-unit quantiles; without them, each unit's
    :data:`~deepminer.explain.units.QUANTILE` over this image's own cells, reported in
    ``thresholds_source``). ``cache``: an :class:`~deepminer.explain.cache.ExplanationCache`; a hit
    skips the forward pass; its key hashes the pixels (about 3 ms for 1024 x 1024) unless
    ``cache_key`` names the content already (a hash of the file the pixels were decoded from, as
    the server does; it must change whenever the pixels do). ``patch_px``: see
    :func:`image_probabilities`. ``ablate``: unit ids silenced in ``ablation``
    (:func:`ablate_features`, from the pass's float32 unit maps, cached with it).
    """
    t0 = time.perf_counter()
    if unit_maps not in UNIT_MAPS:
        raise InputError(f"unit_maps: must be one of {', '.join(UNIT_MAPS)}, got {unit_maps!r}")
    if isinstance(top_units, bool) or not isinstance(top_units, (int, np.integer)) or top_units < 0:
        raise InputError(f"top_units: must be a whole number >= 0, got {top_units!r}")
    img = as_image(image)
    sk = _check_sketch(sketch, (int(img.shape[0]), int(img.shape[1]))) if sketch is not None else None
    side, how = _side_of(input_side, max_side)
    key = _image_key(img, (max_side, side), model, patch_px, cache_key) if cache is not None else ""
    cached: tuple[Explanation, np.ndarray] | None = cache.get(key) if cache is not None else None
    hit = cached is not None
    timing: dict[str, float] = {"preprocess": 0.0, "forward": 0.0, "maps": 0.0}
    if cached is not None:
        core, feats = cached
    else:
        core, feats = _forward(model, img, max_side, patch_px, timing, input_side=side)
        if cache is not None:
            cache.put(key, (core, feats))  # the float32 unit maps too: an ablation needs no forward
    ablation = ablation_from_features(model, feats, ablate, core, patch_px) if len(ablate) else None
    t1 = time.perf_counter()
    iou, source = None, None
    if sk is not None:
        maps = core.unit_maps.stack  # the engine keeps every unit's map
        if thresholds is None:
            thr = quantile_thresholds(maps.reshape(maps.shape[0], -1).T.astype(np.float32), QUANTILE)
            source = f"image (q={QUANTILE})"
        else:
            thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
            if thr.shape[0] != maps.shape[0]:
                raise InputError(f"thresholds: {thr.shape[0]} values for {maps.shape[0]} units")
            source = "given"
        iou = sketch_iou(sk, maps, thr)
    timing["sketch"] = (time.perf_counter() - t1) * 1000
    timing["total"] = (time.perf_counter() - t0) * 1000
    out = copy.copy(core) if cache is not None else core  # a cached core stays untouched
    out.top_units = {c: rank_by_influence(core.influence[i], int(top_units)) for i, c in enumerate(core.classes)}
    out.unit_maps = _kept_maps(core.unit_maps, unit_maps, out.top_units)
    out.sketch_iou, out.thresholds_source, out.timing_ms, out.cache_hit = iou, source, timing, hit
    out.ablation = ablation
    out.input = {**core.input, "scale_source": how, "model_scale": model_scale(model)}
    if ablation is not None:
        timing["ablate"] = ablation.ms
    return out


def _side_of(input_side: tuple[int, str] | int | None, max_side: int | None) -> tuple[int | None, str]:
    """``(exact long side or None, how)`` of :func:`explain_image`'s ``input_side``/``max_side``."""
    if input_side is None:
        return None, "as is" if max_side is None else f"max_side: long side at most {int(max_side)} px"
    if isinstance(input_side, tuple):
        return int(input_side[0]), str(input_side[1])
    return int(input_side), f"asked: long side {int(input_side)} px"


def _kept_maps(maps: UnitMaps, which: str, top_units: dict[str, list[int]]) -> UnitMaps:
    """The unit maps an explanation keeps: ``all``, the ``top`` units of every class, or ``none``."""
    if which == "all":
        return maps
    if which == "top":
        return maps.select([u for ids in top_units.values() for u in ids])
    return maps.select([])


def _check_sketch(sketch: Any, shape: tuple[int, int]) -> np.ndarray:
    s = np.asarray(sketch.detach().cpu() if isinstance(sketch, torch.Tensor) else sketch)
    if s.ndim != 2:
        raise InputError(f"sketch: expected a 2-D (H, W) mask, got shape {s.shape}")
    if s.shape != shape:
        raise InputError(f"sketch: shape {s.shape[0]}x{s.shape[1]} does not match the image "
                         f"{shape[0]}x{shape[1]}")
    return s.astype(bool)


def _forward(model: FCN, img: torch.Tensor, max_side: int | None, patch_px: int | None,
             timing: dict[str, float], *, input_side: int | None = None) -> tuple[Explanation, np.ndarray]:
    """The one forward pass and the maths on the unit maps; top units and sketch left empty. Also
    returns the unit maps ``(K, h, w)`` float32 (read-only; what an ablation starts from)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    x, scale = resize_image(img, max_side, device, input_side=input_side)
    t1 = time.perf_counter()
    was_training = model.training
    if was_training:  # (toggling walks every module: skipped when already in eval mode)
        model.eval()
    try:
        with torch.inference_mode():
            feats = model.forward_features(x)  # (1, K, h, w)
            logits = model.class_logits(feats)  # (1, C, h, w)
            if logits.is_cuda:  # honest timing: wait for the kernels
                torch.cuda.synchronize(logits.device)
            t2 = time.perf_counter()
            class_maps = torch.softmax(logits.float(), 1)[0]
            cam = cam_from_features(model, feats, logits)[0]
            unit_max = feats[0].flatten(1).amax(1)
            influence = model.unit_weights.float() * unit_max.float()[None, :]
            cells = breast_cells(x, (int(logits.shape[-2]), int(logits.shape[-1])))[0] if image_level(model) is not None else None
            probs, rule, window = image_probabilities(model, logits, (int(x.shape[-2]), int(x.shape[-1])), patch_px,
                                                      cells)
            arrays = [a.float().cpu().numpy() for a in (class_maps, cam, unit_max, influence, probs)]
            maps_np = feats[0].to(torch.float16).cpu().numpy()
            feats_np = feats[0].float().cpu().numpy()
    finally:
        if was_training:
            model.train()
    class_maps_np, cam_np, unit_max_np, influence_np, probs_np = arrays
    for a in (*arrays, maps_np, feats_np):
        a.flags.writeable = False  # shared with the cache
    classes = tuple(model.classes)
    timing.update(preprocess=(t1 - t0) * 1000, forward=(t2 - t1) * 1000,
                  maps=(time.perf_counter() - t2) * 1000)
    return Explanation(
        classes=classes,
        probabilities={c: float(p) for c, p in zip(classes, probs_np)},
        prediction=classes[int(np.argmax(probs_np))],
        class_maps=class_maps_np, cam=cam_np, unit_max=unit_max_np, influence=influence_np, top_units={},
        unit_maps=UnitMaps(maps_np), sketch_iou=None,
        input={"height": int(img.shape[0]), "width": int(img.shape[1]), "scale": float(scale),
               "model_height": int(x.shape[-2]), "model_width": int(x.shape[-1]),
               "map_height": int(cam_np.shape[-2]), "map_width": int(cam_np.shape[-1])},
        timing_ms={},
        model={"arch": getattr(model, "arch", type(model).__name__),
               "layer": getattr(model, "layer", ""), "head": getattr(model, "head_type", "gap"),
               "units": int(unit_max_np.shape[0]),
               "trained_on": str((getattr(model, "meta", None) or {}).get("trained_on") or NOT_RECORDED)},
        probability_rule=rule, window=window,
        breast_cells=None if cells is None else cells.cpu().numpy(),
    ), feats_np
