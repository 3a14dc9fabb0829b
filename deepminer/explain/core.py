"""One pass explains: :func:`explain_image` -> :class:`Explanation`.

One forward of the features under ``torch.inference_mode()`` on the model's device; everything
else is computed on the small unit maps ``(K, h, w)``:

* ``class_maps`` ``(C, h, w)``: softmax over the head's class-map logits, per cell;
* ``cam`` ``(C, h, w)``: raw CAM, ``sum_k w[c, k] * f_k`` (FC weights x unit maps, no bias, as
  torchcam's CAM); for a WILDCAT head the head's class maps themselves;
* ``unit_max`` ``[K]``, ``influence`` ``(C, K)`` = max activation x FC weight (DeepMiner), and
  ``top_units`` per class (descending influence);
* ``probabilities``: the image-level rule (:func:`image_probabilities`).

Geometry: the image is resized (bilinear, antialiased) so its long side is at most ``max_side``;
``scale`` = model-input px per original px. The ``h x w`` cells of every map tile the ORIGINAL
image uniformly: cell ``(i, j)`` covers rows ``[i*H/h, (i+1)*H/h)`` and columns
``[j*W/w, (j+1)*W/w)`` (:meth:`Explanation.cell_box`), the same convention as bilinear
``align_corners=False`` upsampling of a map onto the image.
"""
from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepminer.encoding import encode_array
from deepminer.errors import InputError
from deepminer.explain.base import as_image, class_index, normalize_map, resize_image
from deepminer.explain.units import QUANTILE, quantile_thresholds, sketch_iou

PATCH_PX = 224  # default side (model-input px) of the patches a GAP model was trained on
UNIT_MAPS = ("none", "top", "all")


@dataclass
class Explanation:
    """Everything one forward pass says about one image (numpy arrays on CPU).

    ``input``: ``height``, ``width`` (original px), ``scale`` (model-input px per original px),
    ``model_height``, ``model_width`` (model input), ``map_height``, ``map_width`` (cells).
    ``unit_maps_``: the unit maps ``(K, h, w)`` float16 (None when ``unit_maps="none"``).
    ``probability_rule`` says how ``probabilities`` were obtained; ``window`` the cells
    ``(i0, j0, i1, j1)`` (end exclusive) of the window the rule picked, when it picks one.
    """

    classes: tuple[str, ...]
    probabilities: dict[str, float]
    prediction: str
    class_maps: np.ndarray
    cam: np.ndarray
    unit_max: np.ndarray
    influence: np.ndarray
    top_units: dict[str, list[int]]
    unit_maps_: np.ndarray | None
    sketch_iou: np.ndarray | None
    input: dict[str, Any]
    timing_ms: dict[str, float]
    model_info: dict[str, Any] = field(default_factory=dict)
    probability_rule: str = ""
    window: tuple[int, int, int, int] | None = None
    thresholds_source: str | None = None
    cache_hit: bool = False

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def map_size(self) -> tuple[int, int]:
        return int(self.cam.shape[-2]), int(self.cam.shape[-1])

    @property
    def cell_size(self) -> tuple[float, float]:
        """(height, width) of one map cell in ORIGINAL pixels."""
        h, w = self.map_size
        return self.input["height"] / h, self.input["width"] / w

    def cell_box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """``(y0, x0, y1, x1)`` in original pixels (end exclusive) covered by cell ``(i, j)``."""
        ch, cw = self.cell_size
        return i * ch, j * cw, (i + 1) * ch, (j + 1) * cw

    def cell_of(self, y: float, x: float) -> tuple[int, int]:
        """The cell holding original pixel ``(y, x)``."""
        ch, cw = self.cell_size
        h, w = self.map_size
        return min(h - 1, max(0, int(y // ch))), min(w - 1, max(0, int(x // cw)))

    def cam_normalized(self, cls: str | int | None = None) -> np.ndarray:
        """CAM min-max normalised to [0, 1] per class (torchcam's normalisation); one class
        ``(h, w)`` when ``cls`` is given, else ``(C, h, w)``."""
        cam = self.cam if cls is None else self.cam[self.class_index(cls)]
        return normalize_map(cam)

    def class_index(self, cls: str | int) -> int:
        return class_index(self.classes, cls)

    def ranked_units(self, cls: str | int, n: int | None = None) -> list[int]:
        """Unit ids by descending influence on ``cls`` (DeepMiner), the first ``n``."""
        return rank_units(self.influence[self.class_index(cls)], n)

    # -- the HTTP API -----------------------------------------------------------------------------
    def to_api(self, model_name: str, model_version: str, *, unit_maps: str = "top",
               top_units: int = 8) -> dict:
        """The JSON body of ``POST /predictions/<model>`` (DESIGN.md); arrays float16-encoded.

        ``unit_maps``: ``none`` (no maps), ``top`` (the maps of each class's ``top_units`` most
        influential units) or ``all``; maps need ``unit_maps_`` (kept unless explained with
        ``unit_maps="none"``).
        """
        if unit_maps not in UNIT_MAPS:
            raise InputError(f"options.unit_maps: must be one of {', '.join(UNIT_MAPS)}, got {unit_maps!r}")
        if isinstance(top_units, bool) or not isinstance(top_units, (int, np.integer)) or top_units < 0:
            raise InputError(f"options.top_units: must be a whole number >= 0, got {top_units!r}")
        top = {c: self.ranked_units(c, int(top_units)) for c in self.classes}
        if unit_maps == "all":
            wanted = list(range(len(self.unit_max)))
        elif unit_maps == "top":
            wanted = list(dict.fromkeys(u for ids in top.values() for u in ids))
        else:
            wanted = []
        maps = {} if self.unit_maps_ is None else {
            str(u): encode_array(self.unit_maps_[u], dtype="float16") for u in wanted}
        out = {
            "model": {"name": model_name, "version": model_version, **self.model_info,
                      "classes": list(self.classes)},
            "input": dict(self.input),
            "probabilities": dict(self.probabilities),
            "prediction": self.prediction,
            "probability_rule": self.probability_rule,
            "class_maps": encode_array(self.class_maps, dtype="float16"),
            "cam": encode_array(self.cam, dtype="float16"),
            "units": {
                "max_activation": encode_array(self.unit_max, dtype="float16"),
                "influence": {c: encode_array(self.influence[i], dtype="float16")
                              for i, c in enumerate(self.classes)},
                "top": top,
                "maps": maps,
            },
            "timing_ms": dict(self.timing_ms),
        }
        if self.sketch_iou is not None:
            out["sketch_iou"] = encode_array(self.sketch_iou, dtype="float16")
        return out


def rank_units(influence: np.ndarray, n: int | None = None) -> list[int]:
    """Unit ids by descending value (ties: lower id first), the first ``n``."""
    order = np.argsort(-np.asarray(influence, dtype=np.float64), kind="stable")
    return [int(u) for u in (order if n is None else order[:n])]


def cam_from_features(model: torch.nn.Module, feats: torch.Tensor,
                      class_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Raw CAM ``(B, C, h, w)``: FC weights x unit maps (no bias); a WILDCAT head's class maps."""
    if getattr(model, "head_type", "gap") == "wildcat":
        return model.class_maps(feats) if class_logits is None else class_logits
    return torch.einsum("ck,bkhw->bchw", model.unit_weights.to(feats.dtype), feats)


def image_probabilities(model: torch.nn.Module, class_logits: torch.Tensor, input_hw: tuple[int, int],
                        patch_px: int | None = None
                        ) -> tuple[torch.Tensor, str, tuple[int, int, int, int] | None]:
    """Image-level probabilities ``[C]`` from class-map logits ``(1, C, h, w)``.

    * WILDCAT head: softmax of the head's own pooling (top-k + alpha x bottom-k) over the whole
      map, i.e. exactly ``softmax(model(x))``; it was made for maps of any size.
    * GAP head (DeepMiner, trained on patches): by linearity, the mean of the class-map logits
      over a window of cells is what the classifier gives a patch covering that window. The
      window is the training patch (``patch_px`` model-input px, default
      ``model.meta["patch_size"]`` or :data:`PATCH_PX`) in cells, clipped to the map; the
      image's probabilities are those of the most abnormal window, the one with the lowest
      probability of the first class (``normal``): an image is as suspicious as its most
      suspicious patch. When the input is at most one patch, there is one window and the result
      is exactly ``softmax(model(x))`` (the classifier's output at patch size).

    Returns ``(probabilities, rule, window)``; ``window`` = ``(i0, j0, i1, j1)`` cells or None.
    """
    if getattr(model, "head_type", "gap") == "wildcat":
        probs = torch.softmax(model.pool(class_logits)[0].float(), 0)
        return probs, "wildcat: softmax of the head's pooling", None
    h, w = class_logits.shape[-2:]
    if patch_px is None:
        patch_px = int((getattr(model, "meta", None) or {}).get("patch_size") or PATCH_PX)
    wh = min(h, max(1, round(patch_px * h / input_hw[0])))
    ww = min(w, max(1, round(patch_px * w / input_hw[1])))
    win = F.avg_pool2d(class_logits.float(), (wh, ww), stride=1)[0]  # (C, h', w')
    probs = torch.softmax(win, 0)
    flat = int(torch.argmin(probs[0].reshape(-1)))
    i, j = divmod(flat, probs.shape[-1])
    rule = (f"gap: most abnormal {wh}x{ww}-cell window ({patch_px} px patch)"
            if (wh, ww) != (h, w) else "gap: softmax of the mean logits (one patch)")
    return probs[:, i, j], rule, (i, j, i + wh, j + ww)


def _image_key(image: torch.Tensor, max_side: int | None, model: torch.nn.Module, patch_px: int | None,
               content: str | None = None) -> str:
    h = hashlib.sha1()
    if content is None:
        h.update(memoryview(image.contiguous().numpy()).cast("B"))
    else:
        h.update(b"content:" + content.encode())
    h.update(repr((tuple(image.shape), max_side, patch_px, id(model), getattr(model, "arch", ""),
                   getattr(model, "num_units", 0))).encode())
    return h.hexdigest()


def explain_image(model: torch.nn.Module, image: Any, *, max_side: int | None = 1024, top_k: int = 8,
                  unit_maps: str = "top", sketch: Any = None, thresholds: Any = None,
                  cache: Any = None, patch_px: int | None = None, cache_key: str | None = None) -> Explanation:
    """Explain one grey image ``(H, W)`` float in [0, 1] with one forward pass of ``model`` (FCN).

    ``max_side``: long side of the model input (None: as is). ``top_k``: units kept per class in
    ``top_units``. ``unit_maps``: ``none`` drops the unit maps from the result (``top``/``all``
    keep all of them; :meth:`Explanation.to_api` picks). ``sketch``: bool ``(H, W)`` in original
    pixels -> ``sketch_iou`` [K] (:func:`deepminer.explain.units.sketch_iou`) against the unit
    masks at ``thresholds`` [K] (the atlas's per-unit quantiles; without them, each unit's
    :data:`~deepminer.explain.units.QUANTILE` over this image's own cells, reported in
    ``thresholds_source``). ``cache``: a :class:`~deepminer.explain.cache.FeatureCache`; a hit
    skips the forward pass; its key hashes the pixels (about 3 ms for 1024 x 1024) unless
    ``cache_key`` names the content already (a hash of the file the pixels were decoded from, as
    the server does; it must change whenever the pixels do). ``patch_px``: see
    :func:`image_probabilities`.
    """
    t0 = time.perf_counter()
    if unit_maps not in UNIT_MAPS:
        raise InputError(f"unit_maps: must be one of {', '.join(UNIT_MAPS)}, got {unit_maps!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InputError(f"top_k: must be a whole number >= 0, got {top_k!r}")
    img = as_image(image)
    sk = _check_sketch(sketch, tuple(img.shape)) if sketch is not None else None
    key = _image_key(img, max_side, model, patch_px, cache_key) if cache is not None else None
    core = cache.get(key) if cache is not None else None
    hit = core is not None
    timing: dict[str, float] = {"preprocess": 0.0, "forward": 0.0, "maps": 0.0}
    if not hit:
        core = _forward(model, img, max_side, patch_px, timing)
        if cache is not None:
            cache.put(key, core)
    t1 = time.perf_counter()
    iou, source = None, None
    if sk is not None:
        maps = core.unit_maps_
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
    out.top_units = {c: rank_units(core.influence[i], int(top_k)) for i, c in enumerate(core.classes)}
    out.unit_maps_ = None if unit_maps == "none" else core.unit_maps_
    out.sketch_iou, out.thresholds_source, out.timing_ms, out.cache_hit = iou, source, timing, hit
    return out


def _check_sketch(sketch: Any, shape: tuple[int, int]) -> np.ndarray:
    s = np.asarray(sketch.detach().cpu() if isinstance(sketch, torch.Tensor) else sketch)
    if s.ndim != 2:
        raise InputError(f"sketch: expected a 2-D (H, W) mask, got shape {s.shape}")
    if s.shape != shape:
        raise InputError(f"sketch: shape {s.shape[0]}x{s.shape[1]} does not match the image "
                         f"{shape[0]}x{shape[1]}")
    return s.astype(bool)


def _forward(model: torch.nn.Module, img: torch.Tensor, max_side: int | None, patch_px: int | None,
             timing: dict[str, float]) -> Explanation:
    """The one forward pass and the maths on the unit maps; top units and sketch left empty."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    x, scale = resize_image(img, max_side, device)
    t1 = time.perf_counter()
    was_training = model.training
    if was_training:  # (toggling walks every module: skipped when already in eval mode)
        model.eval()
    try:
        with torch.inference_mode():
            feats = model.forward_features(x)  # (1, K, h, w)
            logits = model.class_maps(feats)  # (1, C, h, w)
            if logits.is_cuda:  # honest timing: wait for the kernels
                torch.cuda.synchronize(logits.device)
            t2 = time.perf_counter()
            class_maps = torch.softmax(logits.float(), 1)[0]
            cam = cam_from_features(model, feats, logits)[0]
            unit_max = feats[0].flatten(1).amax(1)
            influence = model.unit_weights.float() * unit_max.float()[None, :]
            probs, rule, window = image_probabilities(model, logits, tuple(x.shape[-2:]), patch_px)
            arrays = [a.float().cpu().numpy() for a in (class_maps, cam, unit_max, influence, probs)]
            unit_maps = feats[0].to(torch.float16).cpu().numpy()
    finally:
        if was_training:
            model.train()
    class_maps, cam, unit_max, influence, probs = arrays
    for a in (*arrays, unit_maps):
        a.flags.writeable = False  # shared with the cache
    classes = tuple(model.classes)
    timing.update(preprocess=(t1 - t0) * 1000, forward=(t2 - t1) * 1000,
                  maps=(time.perf_counter() - t2) * 1000)
    return Explanation(
        classes=classes,
        probabilities={c: float(p) for c, p in zip(classes, probs)},
        prediction=classes[int(np.argmax(probs))],
        class_maps=class_maps, cam=cam, unit_max=unit_max, influence=influence, top_units={},
        unit_maps_=unit_maps, sketch_iou=None,
        input={"height": int(img.shape[0]), "width": int(img.shape[1]), "scale": float(scale),
               "model_height": int(x.shape[-2]), "model_width": int(x.shape[-1]),
               "map_height": int(cam.shape[-2]), "map_width": int(cam.shape[-1])},
        timing_ms={},
        model_info={"arch": getattr(model, "arch", type(model).__name__),
                    "layer": getattr(model, "layer", ""), "head": getattr(model, "head_type", "gap"),
                    "units": int(unit_max.shape[0])},
        probability_rule=rule, window=window,
    )
