"""The explanation of one image: :class:`Explanation`, the one type the engine returns, the handler
encodes, the client decodes and the workbench reads.

``Explanation.to_json()`` is the HTTP body of ``POST /predictions/<model>`` (docs/api.md) and
``Explanation.from_json(body)`` its inverse (arrays travel float16: a round trip is exact to float16).
No torch here: the client and the workbench use this module without the model stack.

Names mean one thing everywhere (the engine, the API, the docs):

* ``class_maps`` ``(C, h, w)``: per-cell class **probabilities** (softmax over classes of the
  head's class-map logits at each cell);
* ``cam`` ``(C, h, w)``: raw class activation maps (FC weights x unit maps, no bias; a WILDCAT head's
  own class maps);
* ``unit_max`` ``[K]``; ``influence`` ``(C, K)`` = max activation x FC weight (DeepMiner);
* ``top_units`` ``{class: [unit ids]}``, by descending influence;
* ``unit_maps`` (:class:`UnitMaps`): the activation maps ``(h, w)`` of the units that were kept, by
  unit id (all, the top units of every class, or none: the ``unit_maps`` option);
* ``method_maps`` ``{method: (h, w)}``: saliency maps of ``target`` by the methods an
  ``POST /explanations/<model>`` request named (``cam``/``class_map`` rows of the pass above, the
  gradient peers of :mod:`deepminer.explain.peers` normalised to [0, 1]), ``method_ms`` their cost;
* ``ablation`` (:class:`Ablation`): with the ``ablate`` option, the probabilities and class maps
  with those units' activations set to zero, and the change per class.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepminer.encoding import decode_array, encode_array
from deepminer.errors import InputError

WIRE_DTYPE = "float16"  #: how the API's float arrays travel


def class_index(classes: Sequence[str], cls: str | int, *, what: str = "class") -> int:
    """The index of ``cls`` (a class name or an index) in ``classes``; a one-line :class:`InputError`
    naming ``what`` when it is neither."""
    if isinstance(cls, (int, np.integer)) and not isinstance(cls, bool):
        if not 0 <= int(cls) < len(classes):
            raise InputError(f"{what} index {cls} out of range 0..{len(classes) - 1}")
        return int(cls)
    if not isinstance(cls, str) or cls not in classes:
        raise InputError(f"{what} {cls!r} not in {'/'.join(classes)}")
    return list(classes).index(cls)


def normalize_map(a: Any, eps: float = 1e-8, *, dtype: Any = np.float32) -> np.ndarray:
    """Min-max normalise each trailing 2-D map to [0, 1] (torchcam's ``_normalize``: subtract the
    min, divide by the max of that + ``eps``; ``eps=0``: the exact min-max); a flat map is all
    zeros. Numpy arrays or torch tensors, computed in ``dtype``. The one min-max of a map."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    x = np.asarray(a, dtype=dtype)
    x = x - x.min(axis=(-2, -1), keepdims=True)
    span = x.max(axis=(-2, -1), keepdims=True) + eps
    return np.divide(x, span, out=np.zeros_like(x), where=span > 0)


def rank_by_influence(influence: Any, n: int | None = None) -> list[int]:
    """Unit ids by descending influence (ties: lower id first), the first ``n``."""
    order = np.argsort(-np.asarray(influence, dtype=np.float64), kind="stable")
    return [int(u) for u in (order if n is None else order[:n])]


class UnitMaps(Mapping[int, np.ndarray]):
    """The activation maps of some units, by unit id: ``maps[u]`` is ``(h, w)``.

    Backed by one stack ``(n, h, w)`` (:attr:`stack`) and the ids of its rows (:attr:`ids`); the
    engine keeps every unit's map (``ids`` = 0..K-1, float16), a decoded API answer the ones that
    were sent.
    """

    def __init__(self, stack: np.ndarray, ids: Sequence[int] | np.ndarray | None = None):
        self.stack = np.asarray(stack)
        if self.stack.ndim != 3:
            raise ValueError(f"unit maps: expected a (n, h, w) stack, got shape {self.stack.shape}")
        self.ids = (np.arange(self.stack.shape[0]) if ids is None else np.asarray(ids, dtype=np.int64)).reshape(-1)
        if self.ids.shape[0] != self.stack.shape[0]:
            raise ValueError(f"unit maps: {self.ids.shape[0]} ids for {self.stack.shape[0]} maps")
        self._row = {int(u): i for i, u in enumerate(self.ids)}

    @classmethod
    def empty(cls, map_size: tuple[int, int] = (0, 0)) -> UnitMaps:
        return cls(np.zeros((0, *map_size), dtype=np.float16), [])

    @property
    def complete(self) -> bool:
        """True when every unit 0..n-1 is here, in order (the engine's full stack)."""
        return bool(np.array_equal(self.ids, np.arange(self.stack.shape[0])))

    def __getitem__(self, unit: int) -> np.ndarray:
        return self.stack[self._row[int(unit)]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, unit: object) -> bool:
        return isinstance(unit, (int, np.integer)) and int(unit) in self._row

    def select(self, units: Sequence[int]) -> UnitMaps:
        """The maps of ``units`` that are here, in the order given (duplicates dropped)."""
        keep = [int(u) for u in dict.fromkeys(int(u) for u in units) if int(u) in self._row]
        return UnitMaps(self.stack[[self._row[u] for u in keep]], keep)


@dataclass
class Ablation:
    """What the model says with some units silenced (their activations set to zero before the
    head): the ``ablate`` option's answer. ``probabilities``/``prediction``/``class_maps``/``window``
    as in :class:`Explanation`, for the silenced model; ``delta`` per class = probability after -
    before; ``ms`` its cost (from the unit maps through the head, no backbone pass)."""

    units: tuple[int, ...]
    probabilities: dict[str, float]
    prediction: str
    class_maps: np.ndarray
    delta: dict[str, float]
    window: tuple[int, int, int, int] | None = None
    ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"units": [int(u) for u in self.units],
                "probabilities": {c: float(p) for c, p in self.probabilities.items()},
                "prediction": self.prediction, "delta": {c: float(d) for c, d in self.delta.items()},
                "class_maps": encode_array(self.class_maps, dtype=WIRE_DTYPE),
                "window": None if self.window is None else [int(v) for v in self.window], "ms": float(self.ms)}

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Ablation:
        window = body.get("window")
        return cls(units=tuple(int(u) for u in body["units"]),
                   probabilities={str(c): float(p) for c, p in body["probabilities"].items()},
                   prediction=str(body["prediction"]),
                   class_maps=decode_array(body["class_maps"]).astype(np.float32, copy=False),
                   delta={str(c): float(d) for c, d in body["delta"].items()},
                   window=None if window is None else (int(window[0]), int(window[1]), int(window[2]), int(window[3])),
                   ms=float(body.get("ms", 0.0)))


@dataclass
class Explanation:
    """Everything one forward pass says about one image (numpy arrays; see the module docstring).

    ``input``: ``height``, ``width`` (original px), ``scale`` (model-input px per original px),
    ``model_height``, ``model_width`` (model input), ``map_height``, ``map_width`` (cells); the
    server adds ``format``, ``bits_stored``, ``tissue_fraction``, ``domain`` (:attr:`domain`) and, when asked,
    ``tissue_mask`` (:meth:`tissue_region`). ``model``: ``name``, ``version``,
    ``arch``, ``layer``, ``head``, ``units``, ``classes``, ``weights_sha256`` (as far as known).
    ``probability_rule`` says how ``probabilities`` were obtained; ``window`` the cells
    ``(i0, j0, i1, j1)`` (end exclusive) of the window the rule picked, when it picks one.
    ``sketch_iou`` [K]: every unit's IoU with a sketch, at the thresholds ``thresholds_source`` names.
    ``server``: who answered (device, batch, pid, threads, cache_hit), when it came over HTTP.
    ``target``, ``method_maps``, ``method_ms``: the class and the saliency maps ``(h, w)`` on the
    CAM grid (with their cost in ms) of an explanations request; None and empty otherwise.
    ``ablation``: the answer of the ``ablate`` option (:class:`Ablation`), else None.

    Geometry: the ``h x w`` cells of every map tile the ORIGINAL image uniformly: cell ``(i, j)``
    covers rows ``[i*H/h, (i+1)*H/h)`` and columns ``[j*W/w, (j+1)*W/w)`` (:meth:`cell_box`), the
    convention of bilinear ``align_corners=False`` upsampling of a map onto the image.
    """

    classes: tuple[str, ...]
    probabilities: dict[str, float]
    prediction: str
    class_maps: np.ndarray
    cam: np.ndarray
    unit_max: np.ndarray
    influence: np.ndarray
    top_units: dict[str, list[int]]
    unit_maps: UnitMaps
    input: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    sketch_iou: np.ndarray | None = None
    timing_ms: dict[str, float] = field(default_factory=dict)
    probability_rule: str = ""
    window: tuple[int, int, int, int] | None = None
    thresholds_source: str | None = None
    server: dict[str, Any] = field(default_factory=dict)
    cache_hit: bool = False
    target: str | None = None
    method_maps: dict[str, np.ndarray] = field(default_factory=dict)
    method_ms: dict[str, float] = field(default_factory=dict)
    ablation: Ablation | None = None
    #: bool ``(h, w)``: the breast cells a whole-image model pooled over (None for a patch model's rule)
    breast_cells: np.ndarray | None = None

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

    @property
    def domain(self) -> dict[str, Any] | None:
        """``input.domain``: how far the image lies from the model's training images
        (:mod:`deepminer.domain`): ``method``, ``score``, ``threshold``, ``percentile``, ``in_domain``;
        None when the model has no domain summary."""
        d = self.input.get("domain")
        return dict(d) if isinstance(d, Mapping) else None

    def tissue_region(self) -> np.ndarray | None:
        """``input.tissue_mask`` (the ``tissue_mask`` option) decoded: the breast region the image
        was explained in, bool ``(height, width)`` of the original image; None when not asked for or
        the server does not mask tissue."""
        import base64

        from deepminer.options import png_to_mask

        png = self.input.get("tissue_mask")
        if not isinstance(png, str):
            return None
        return png_to_mask(base64.b64decode(png), (int(self.input["height"]), int(self.input["width"])),
                           name="input.tissue_mask")

    # -- classes and units ------------------------------------------------------------------------
    def class_index(self, cls: str | int) -> int:
        return class_index(self.classes, cls)

    def cam_normalized(self, cls: str | int | None = None) -> np.ndarray:
        """CAM min-max normalised to [0, 1] per class (torchcam's normalisation); one class
        ``(h, w)`` when ``cls`` is given, else ``(C, h, w)``."""
        return normalize_map(self.cam if cls is None else self.cam[self.class_index(cls)])

    def influence_of(self, cls: str | int) -> np.ndarray:
        """Every unit's influence ``[K]`` on ``cls``."""
        return self.influence[self.class_index(cls)]

    def ranked_units(self, cls: str | int, n: int | None = None) -> list[int]:
        """Unit ids by descending influence on ``cls`` (DeepMiner), the first ``n``: the ranking in
        ``top_units`` when it is long enough (it was made from the unrounded influence), else
        ranked from :attr:`influence`."""
        top = self.top_units.get(self.classes[self.class_index(cls)], [])
        if n is not None and n <= len(top):
            return list(top[:n])
        return rank_by_influence(self.influence_of(cls), n)

    # -- the HTTP API -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON body of ``POST /predictions/<model>`` (docs/api.md); arrays float16-encoded."""
        out: dict[str, Any] = {
            "model": {**self.model, "classes": list(self.classes)},
            "input": dict(self.input),
            "probabilities": {c: float(self.probabilities[c]) for c in self.classes},
            "prediction": self.prediction,
            "probability_rule": self.probability_rule,
            "window": None if self.window is None else [int(v) for v in self.window],
            "class_maps": encode_array(self.class_maps, dtype=WIRE_DTYPE),
            "cam": encode_array(self.cam, dtype=WIRE_DTYPE),
            "units": {
                "max_activation": encode_array(self.unit_max, dtype=WIRE_DTYPE),
                "influence": {c: encode_array(self.influence[i], dtype=WIRE_DTYPE)
                              for i, c in enumerate(self.classes)},
                "top": {c: [int(u) for u in self.top_units.get(c, [])] for c in self.classes},
                "maps": {str(int(u)): encode_array(m, dtype=WIRE_DTYPE) for u, m in self.unit_maps.items()},
            },
            "timing_ms": dict(self.timing_ms),
        }
        if self.sketch_iou is not None:
            out["sketch_iou"] = encode_array(self.sketch_iou, dtype=WIRE_DTYPE)
            out["thresholds_source"] = self.thresholds_source
        if self.server:
            out["server"] = dict(self.server)
        if self.target is not None:
            out["target"] = self.target
        if self.method_maps:
            out["methods"] = {m: {"map": encode_array(a, dtype=WIRE_DTYPE), "ms": float(self.method_ms.get(m, 0.0))}
                              for m, a in self.method_maps.items()}
        if self.ablation is not None:
            out["ablation"] = self.ablation.to_json()
        return out

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Explanation:
        """Decode an API body (:meth:`to_json`); arrays come back float32. A malformed body is a
        one-line :class:`InputError`."""
        try:
            return cls._from_json(body)
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"malformed explanation body: {type(err).__name__}: {err}") from None

    @classmethod
    def _from_json(cls, body: Mapping[str, Any]) -> Explanation:
        def arr(obj: Any) -> np.ndarray:
            return decode_array(obj).astype(np.float32, copy=False)

        model = dict(body.get("model") or {})
        probabilities = {str(k): float(v) for k, v in (body.get("probabilities") or {}).items()}
        classes = tuple(str(c) for c in (model.get("classes") or probabilities))
        units = body["units"]
        cam = arr(body["cam"])
        sent = {int(k): arr(v) for k, v in (units.get("maps") or {}).items()}
        ids = sorted(sent)
        maps = (UnitMaps(np.stack([sent[u] for u in ids]), ids) if ids
                else UnitMaps.empty((int(cam.shape[-2]), int(cam.shape[-1]))))
        influence = units.get("influence") or {}
        iou = body.get("sketch_iou")
        window = body.get("window")
        methods = body.get("methods") or {}
        target = body.get("target")
        ablation = body.get("ablation")
        return cls(
            classes=classes,
            probabilities=probabilities,
            prediction=str(body["prediction"]),
            class_maps=arr(body["class_maps"]),
            cam=cam,
            unit_max=arr(units["max_activation"]),
            influence=np.stack([arr(influence[c]) for c in classes]) if classes else np.zeros((0, 0), np.float32),
            top_units={str(c): [int(u) for u in v] for c, v in (units.get("top") or {}).items()},
            unit_maps=maps,
            input=dict(body.get("input") or {}),
            model=model,
            sketch_iou=arr(iou) if iou is not None else None,
            timing_ms={k: float(v) for k, v in (body.get("timing_ms") or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)},
            probability_rule=str(body.get("probability_rule") or ""),
            window=None if window is None else (int(window[0]), int(window[1]), int(window[2]), int(window[3])),
            thresholds_source=body.get("thresholds_source"),
            server=dict(body.get("server") or {}),
            cache_hit=bool((body.get("server") or {}).get("cache_hit", False)),
            target=None if target is None else str(target),
            method_maps={str(m): arr(v["map"]) for m, v in methods.items()},
            method_ms={str(m): float(v.get("ms", 0.0)) for m, v in methods.items()},
            ablation=None if ablation is None else Ablation.from_json(ablation),
        )
