"""The request options of an explanation, declared once: :data:`OPTIONS_SCHEMA` (a JSON Schema,
published in docs/api.md) and :class:`ExplainOptions` (the typed, validated form).

The TorchServe handler parses the ``options`` part of a request with :meth:`ExplainOptions.parse`,
the CLI builds its flags from the same declaration (:data:`UNIT_MAPS`, :data:`DEFAULTS`,
:data:`~deepminer.geometry.MAX_SIDE_RANGE`) and checks them with the same call, and the client sends
:meth:`ExplainOptions.to_json`. Every error is one line naming the option, e.g.
``options.max_side: 10 is less than the minimum of 64`` (an :class:`~deepminer.errors.InputError`,
400 over HTTP). No torch here, and nothing heavy at import (the CLI's ``--help`` reads it).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepminer.errors import InputError
from deepminer.geometry import MAX_SIDE_RANGE
from deepminer.jobs import ID_PATTERN as JOB_ID_PATTERN

if TYPE_CHECKING:
    import numpy as np

UNIT_MAPS = ("none", "top", "all")  #: which unit maps an answer carries
#: the maps ``POST /explanations/<model>`` returns: these two come free with the explanation pass,
FREE_METHODS = ("cam", "class_map")
#: these are the gradient peers of :data:`deepminer.explain.peers.METHODS` (one or more backward passes each)
GRADIENT_METHODS = ("gradcam", "gradcam++", "guided_backprop", "integrated_gradients", "smoothgrad")
EXPLAIN_METHODS = FREE_METHODS + GRADIENT_METHODS
EXPLAIN_ONLY = ("methods", "target", "job")  #: options of ``POST /explanations/<model>`` only
#: at most this many unit ids in one ``ablate`` request (a whole concept's units fit: the demo's
#: largest label set is far below it; silencing more is no longer "these units")
MAX_ABLATE = 256
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

OPTIONS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://deepminer.studio/schemas/explain-options.json",
    "title": "options",
    "description": "Options of POST /predictions/<model> and POST /explanations/<model> (multipart part "
                   "'options', a JSON object).",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "top_units": {"type": "integer", "minimum": 1, "default": 8,
                      "description": "units listed per class in units.top (at most the model's number of units)"},
        "unit_maps": {"enum": list(UNIT_MAPS), "default": "top",
                      "description": "unit maps returned: none, the top units of every class, or all"},
        "sketch": {"type": ["string", "null"], "default": None, "contentEncoding": "base64",
                   "contentMediaType": "image/png",
                   "description": "a mask as a base64 PNG (grey, or its alpha channel; any size, "
                                  "resized to the image; > 127 = sketched): every unit's IoU with it"},
        "max_side": {"type": ["integer", "null"], "minimum": MAX_SIDE_RANGE[0], "maximum": MAX_SIDE_RANGE[1],
                     "default": None,
                     "description": "long side (px) the image is explained at, at most (null: the model's own scale; "
                                    "input.scale_source says which was used)"},
        "methods": {"type": "array", "items": {"enum": list(EXPLAIN_METHODS)}, "uniqueItems": True, "default": [],
                    "description": "POST /explanations/<model> only: the saliency maps returned for the target "
                                   "(empty: cam); cam and class_map come from the explanation pass, the others "
                                   "are gradient methods (at most the server's max_gradient_methods, default 3)"},
        "target": {"type": ["string", "null"], "default": None,
                   "description": "POST /explanations/<model> only: the class the maps explain "
                                  "(null: the prediction)"},
        "job": {"type": ["string", "null"], "pattern": JOB_ID_PATTERN, "default": None,
                "description": "POST /explanations/<model> only: a job id the client chose (8-64 letters, digits, "
                               "'-', '_'): the server writes the request's progress under it and stops it at its "
                               "next step when it is cancelled or its client stops waiting (docs/serving.md)"},
        "tissue_mask": {"type": "boolean", "default": False,
                        "description": "also return the breast region the image was explained in: input.tissue_mask, "
                                       "a base64 grey PNG at the image's size (255 = breast; null when the server "
                                       "does not mask tissue)"},
        "ablate": {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True,
                   "maxItems": MAX_ABLATE, "default": [],
                   "description": "unit ids (each below the model's number of units) whose activations are set "
                                  "to zero: the answer's 'ablation' holds the probabilities and class maps "
                                  "without them and the change per class (from the cached unit maps "
                                  "through the head, no second forward)"},
    },
}

#: option -> default, from the schema
DEFAULTS: dict[str, Any] = {k: v["default"] for k, v in OPTIONS_SCHEMA["properties"].items()}

_validator: Any = None


def _schema_validator() -> Any:
    global _validator
    if _validator is None:
        from jsonschema import Draft202012Validator

        Draft202012Validator.check_schema(OPTIONS_SCHEMA)
        _validator = Draft202012Validator(OPTIONS_SCHEMA)
    return _validator


def mask_to_png(mask: Any) -> bytes:
    """A bool ``(H, W)`` mask as an 8-bit grey PNG (0/255): the ``sketch`` encoding."""
    import numpy as np
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim != 2:
        raise InputError(f"sketch: expected a 2-D mask, got shape {m.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.where(m.astype(bool), 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def png_to_mask(png: bytes, shape: tuple[int, int], *, name: str = "options.sketch") -> np.ndarray:
    """A PNG mask (grey, or its alpha channel when it has one; any size, resized nearest) -> bool
    ``shape`` (``> 127``)."""
    import numpy as np
    from PIL import Image

    if not png.startswith(PNG_SIGNATURE):
        raise InputError(f"{name}: not a PNG image")
    try:
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            band = im.getchannel("A") if "A" in im.getbands() else im.convert("L")
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad sketch, said in one line
        raise InputError(f"{name}: unreadable PNG ({type(err).__name__}: {err})") from None
    h, w = shape
    if band.size != (w, h):
        band = band.resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(band) > 127


@dataclass(frozen=True)
class ExplainOptions:
    """Validated options of one explanation request (see :data:`OPTIONS_SCHEMA`).

    ``sketch``: the PNG bytes of a sketch mask (:func:`mask_to_png`), or None; decode it at the
    image's size with :meth:`sketch_mask`. ``max_side`` None: the model's own scale (the server's default). ``methods`` and
    ``target`` (the saliency maps and the class they explain) belong to ``POST /explanations`` only
    (:meth:`check_endpoint`).
    """

    top_units: int = DEFAULTS["top_units"]
    unit_maps: str = DEFAULTS["unit_maps"]
    sketch: bytes | None = None
    max_side: int | None = None
    methods: tuple[str, ...] = ()
    target: str | None = None
    ablate: tuple[int, ...] = ()
    tissue_mask: bool = False
    job: str | None = None

    @classmethod
    def parse(cls, raw: Any = None, *, num_units: int | None = None, flags: bool = False) -> ExplainOptions:
        """Validate ``raw`` (a JSON object: dict, str or UTF-8 bytes; None or empty: defaults).

        ``num_units`` bounds ``top_units``. ``flags``: name options as CLI flags (``--max-side``)
        in errors instead of ``options.max_side``.
        """
        data = _as_object(raw)
        errors = sorted(_schema_validator().iter_errors(data), key=lambda e: (len(e.path), list(e.path)))
        if errors:
            raise InputError(_one_line(errors[0], flags))
        top = data.get("top_units")
        top = DEFAULTS["top_units"] if top is None else int(top)
        if num_units is not None and top > num_units:
            raise InputError(f"{_name('top_units', flags)}: must be at most the model's {num_units} units, got {top}")
        sketch = data.get("sketch")
        png = None
        if sketch is not None:
            try:
                png = base64.b64decode(sketch, validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"{_name('sketch', flags)}: not valid base64") from None
            if not png.startswith(PNG_SIGNATURE):
                raise InputError(f"{_name('sketch', flags)}: not a PNG image")
        unit_maps = data.get("unit_maps")
        ablate = tuple(int(u) for u in data.get("ablate") or ())
        if num_units is not None:
            check_ablate(ablate, num_units, flags=flags)
        return cls(top_units=top, unit_maps=DEFAULTS["unit_maps"] if unit_maps is None else str(unit_maps),
                   sketch=png, max_side=data.get("max_side"), methods=tuple(data.get("methods") or ()),
                   target=data.get("target"), ablate=ablate, tissue_mask=bool(data.get("tissue_mask", False)),
                   job=data.get("job"))

    @classmethod
    def build(cls, *, top_units: int = DEFAULTS["top_units"], unit_maps: str = DEFAULTS["unit_maps"],
              sketch: Any = None, max_side: int | None = None, methods: Sequence[str] | None = None,
              target: str | None = None, ablate: Sequence[int] | None = None, tissue_mask: bool = False,
              num_units: int | None = None, flags: bool = False) -> ExplainOptions:
        """Options from Python values (``sketch`` a bool mask), validated like a request."""
        raw: dict[str, Any] = {"top_units": top_units, "unit_maps": unit_maps, "max_side": max_side}
        if sketch is not None:
            raw["sketch"] = base64.b64encode(mask_to_png(sketch)).decode("ascii")
        if methods is not None:
            raw["methods"] = [methods] if isinstance(methods, str) else list(methods)
        if target is not None:
            raw["target"] = target
        if tissue_mask:
            raw["tissue_mask"] = True
        if ablate is not None and len(ablate):
            # numpy integers too (jsonschema's 'integer' is Python's int)
            raw["ablate"] = [int(u) if hasattr(u, "__index__") and not isinstance(u, bool) else u for u in ablate]
        return cls.parse(raw, num_units=num_units, flags=flags)

    def check_endpoint(self, explain: bool) -> None:
        """``methods``/``target`` are options of ``POST /explanations/<model>`` only: a one-line
        :class:`InputError` when a ``/predictions`` request (``explain`` False) sends one."""
        if not explain:
            for option in EXPLAIN_ONLY:
                if getattr(self, option) not in ((), None):
                    raise InputError(f"options.{option}: only for POST /explanations/<model>")

    @property
    def gradient_methods(self) -> tuple[str, ...]:
        """The requested methods that need backward passes (not from the explanation pass)."""
        return tuple(m for m in self.methods if m in GRADIENT_METHODS)

    def to_json(self) -> dict[str, Any]:
        """The ``options`` JSON object of a request (defaults left out)."""
        out: dict[str, Any] = {"top_units": self.top_units, "unit_maps": self.unit_maps}
        if self.max_side is not None:
            out["max_side"] = self.max_side
        if self.sketch is not None:
            out["sketch"] = base64.b64encode(self.sketch).decode("ascii")
        if self.methods:
            out["methods"] = list(self.methods)
        if self.target is not None:
            out["target"] = self.target
        if self.ablate:
            out["ablate"] = list(self.ablate)
        if self.tissue_mask:
            out["tissue_mask"] = True
        if self.job is not None:
            out["job"] = self.job
        return out

    @property
    def is_default(self) -> bool:
        return self == ExplainOptions()

    def sketch_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The sketch as a bool mask of ``shape`` (the image's), or None without a sketch."""
        return None if self.sketch is None else png_to_mask(self.sketch, shape)


def check_ablate(units: Sequence[int], num_units: int, *, flags: bool = False) -> None:
    """``units`` (an ``ablate`` list, schema-valid) are unit ids of a model of ``num_units`` units:
    else a one-line :class:`InputError` naming the first id out of range."""
    bad = [int(u) for u in units if not 0 <= int(u) < num_units]
    if bad:
        raise InputError(f"{_name('ablate', flags)}: unit {bad[0]} out of range 0..{num_units - 1} "
                         f"(the model's {num_units} units)")


def parse_unit_list(text: str, *, name: str = "--ablate") -> tuple[int, ...]:
    """``"12,40 7"`` -> ``(12, 40, 7)`` (commas and/or spaces); a one-line :class:`InputError` on a
    token that is not a whole number. Range, duplicates and count are checked by :meth:`ExplainOptions.parse`."""
    out = []
    for tok in text.replace(",", " ").split():
        try:
            out.append(int(tok))
        except ValueError:
            raise InputError(f"{name}: {tok!r} is not a unit id (expected ids like 12,40)") from None
    return tuple(out)


def _as_object(raw: Any) -> dict[str, Any]:
    if raw is None or raw == b"" or raw == "":
        return {}
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("options: not UTF-8 text (expected a JSON object)") from None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputError(f"options: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(raw, dict):
        raise InputError(f"options: expected a JSON object, got {type(raw).__name__}")
    return raw


def _name(option: str, flags: bool) -> str:
    return f"--{option.replace('_', '-')}" if flags else f"options.{option}"


def _one_line(error: Any, flags: bool) -> str:
    """A jsonschema error as one line naming the option."""
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(OPTIONS_SCHEMA["properties"]))
        known = ", ".join(OPTIONS_SCHEMA["properties"])
        return f"options: unknown option(s) {', '.join(unknown)} (known: {known})"
    where = _name(str(error.path[0]), flags) if error.path else "options"
    if error.validator == "enum":
        return f"{where}: must be one of {'/'.join(map(str, error.validator_value))}, got {error.instance!r}"
    if error.validator == "maxItems":  # (the message would repeat the whole list)
        return f"{where}: at most {error.validator_value} items, got {len(error.instance)}"
    if error.validator == "uniqueItems":
        from collections import Counter

        dups = [v for v, n in Counter(map(repr, error.instance)).items() if n > 1]
        what = "duplicate ids" if error.path and error.path[0] == "ablate" else "non-unique items, duplicated"
        return f"{where}: {what} {', '.join(dups)}"
    return f"{where}: {' '.join(str(error.message).split())}"
