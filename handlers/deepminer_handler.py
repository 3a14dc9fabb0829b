"""TorchServe handler for DeepMiner Studio: a thin adapter, no math of its own.

request (image bytes as the body or multipart part ``data``, optional part ``options`` JSON)
-> :func:`deepminer.data.io.load_image` -> :func:`deepminer.data.tissue.tissue_mask` (background,
labels and film borders set to 0) -> :func:`deepminer.explain.explain_image` (the one-pass engine:
CAM, unit influence, unit maps, sketch IoU at the atlas thresholds, with a feature cache)
-> :meth:`Explanation.to_api` (arrays as float16 ``{"shape","dtype","data"}``) -> JSON.

Bad input answers its own 4xx JSON ``{"code","type","message"}`` (per request, also inside a batch)
and the worker keeps serving. The ``.mar`` ships the ``deepminer`` library next to this file, so the
host needs torch/torchvision and the third-party libraries in the archive's ``requirements.txt``, not
this project. Settings come from the ``handler:`` section of the per-model config
(``serve/model-config.yaml``). TorchServe requires exactly one class in this module.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import http
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OPTIONS = ("top_units", "unit_maps", "sketch", "max_side")
UNIT_MAPS = ("none", "top", "all")
MAX_SIDE_RANGE = (64, 4096)
DEFAULTS: dict[str, Any] = {"model_file": "model.pt", "atlas": "atlas", "max_pixels": 60_000_000,
                            "cache_mb": 256, "default_max_side": 1024, "torch_threads": 0, "tissue": True,
                            "keep_freed_memory": True}


def error_body(code: int, kind: str, message: str) -> dict:
    """The API's error JSON."""
    return {"code": int(code), "type": kind, "message": " ".join(str(message).split())}


def request_image(row: dict) -> bytes:
    """The image bytes of one request: the body, multipart part ``data``, or (KServe v1 envelope)
    a base64 string under ``data``/``b64``."""
    from deepminer.errors import InputError

    data = row.get("data")
    if data is None:
        data = row.get("body")
    if data is None and isinstance(row.get("b64"), str):
        data = row["b64"]
    if isinstance(data, (bytes, bytearray)):
        if not data:
            raise InputError("request: empty image body")
        return bytes(data)
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("request: a text body is not an image; send the image bytes (Content-Type "
                             "application/octet-stream or image/*) or multipart part 'data'") from None
    if isinstance(data, (dict, list)):
        raise InputError("request: a JSON body is not an image; send the image bytes (Content-Type "
                         "application/octet-stream or image/*) or multipart part 'data'")
    raise InputError("request: no image; send the image bytes as the body (Content-Type "
                     "application/octet-stream or image/*) or as multipart part 'data'")


def parse_options(raw: Any, num_units: int) -> dict[str, Any]:
    """Validate the ``options`` part (JSON object) -> ``{top_units, unit_maps, sketch, max_side}``;
    a one-line :class:`InputError` naming the option on anything wrong."""
    from deepminer.errors import InputError

    opts: dict[str, Any] = {"top_units": 8, "unit_maps": "top", "sketch": None, "max_side": None}
    if raw is None or raw == b"" or raw == "":
        return opts
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
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise InputError(f"options: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    if raw.get("top_units") is not None:
        k = raw["top_units"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_units:
            raise InputError(f"options.top_units: must be an integer in 1..{num_units}, got {k!r}")
        opts["top_units"] = k
    if raw.get("unit_maps") is not None:
        if raw["unit_maps"] not in UNIT_MAPS:
            raise InputError(f"options.unit_maps: must be one of {'/'.join(UNIT_MAPS)}, got {raw['unit_maps']!r}")
        opts["unit_maps"] = raw["unit_maps"]
    if raw.get("max_side") is not None:
        s = raw["max_side"]
        lo, hi = MAX_SIDE_RANGE
        if isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi:
            raise InputError(f"options.max_side: must be an integer in {lo}..{hi}, got {s!r}")
        opts["max_side"] = s
    if raw.get("sketch") is not None:
        if not isinstance(raw["sketch"], str):
            raise InputError("options.sketch: must be a base64 PNG string")
        opts["sketch"] = raw["sketch"]
    return opts


def decode_sketch(b64: str, shape: tuple[int, int]):
    """A base64 PNG mask (any size; grey, or the alpha channel when it has one) -> bool ``shape``."""
    import io

    import numpy as np
    from PIL import Image

    from deepminer.errors import InputError

    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("options.sketch: not valid base64") from None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise InputError("options.sketch: not a PNG image")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            band = im.getchannel("A") if "A" in im.getbands() else im.convert("L")
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad sketch
        raise InputError(f"options.sketch: unreadable PNG ({type(err).__name__}: {err})") from None
    h, w = shape
    if band.size != (w, h):
        band = band.resize((w, h), Image.NEAREST)
    return np.asarray(band) > 127


class DeepMinerHandler:
    """``initialize`` loads the model (on ``cuda:<gpu_id>`` when TorchServe assigns a GPU, else the
    CPU), the atlas thresholds and a feature cache; ``handle`` answers one JSON per request."""

    def __init__(self) -> None:
        self.initialized = False
        self.model = None
        self.weights_sha256 = ""
        self.thresholds = None
        self.cache = None
        self.device = None
        self.settings: dict[str, Any] = dict(DEFAULTS)
        self.name = "model"
        self.version = "1.0"

    def initialize(self, context) -> None:
        """TorchServe's entry: settings from the model's yaml, the GPU it assigns, the files of the
        extracted archive."""
        props = context.system_properties
        model_dir = Path(props.get("model_dir") or ".")
        if str(model_dir) not in sys.path:  # the deepminer copy shipped in the .mar
            sys.path.insert(0, str(model_dir))
        import torch

        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        settings = {**DEFAULTS, **(yaml_cfg.get("handler") or {})}
        gpu_id = props.get("gpu_id")
        device = "cpu"
        if torch.cuda.is_available() and gpu_id is not None:
            device = f"cuda:{int(gpu_id)}"
            torch.cuda.set_device(device)
        atlas_dir = model_dir / str(settings.get("atlas") or "atlas")
        version = str(((context.manifest or {}).get("model") or {}).get("modelVersion", "1.0"))
        self.setup(model_dir / settings["model_file"], atlas_dir if (atlas_dir / "atlas.json").is_file() else None,
                   settings=settings, device=device, name=context.model_name, version=version)
        self._warm_up()
        import deepminer

        from deepminer.runtime import is_applied

        logger.info("deepminer handler: model %s v%s (%s, %d units) on %s, atlas %s, freed memory kept %s, "
                    "library %s", self.name, self.version, self.model.arch, self.model.num_units, self.device,
                    "yes" if self.thresholds is not None else "no", "yes" if is_applied() else "no",
                    Path(deepminer.__file__).parent)

    def setup(self, model_file: str | os.PathLike, atlas_dir: str | os.PathLike | None = None, *,
              settings: dict | None = None, device: str = "cpu", name: str = "model", version: str = "1.0") -> None:
        """Load the model, the atlas thresholds and a feature cache (shared by TorchServe's
        :meth:`initialize` and the in-process :meth:`from_files`)."""
        import torch

        from deepminer.explain import FeatureCache
        from deepminer.models import load_model
        from deepminer.runtime import keep_freed_memory

        self.settings = {**DEFAULTS, **(settings or {})}
        if self.settings.get("keep_freed_memory", True):
            keep_freed_memory()  # no page faults for every activation of every request: 2-3x faster on CPU
        self.device = torch.device(device)
        if int(self.settings["torch_threads"]) > 0:
            torch.set_num_threads(int(self.settings["torch_threads"]))
        self.model = load_model(model_file, map_location=self.device).eval()
        from deepminer.atlas.dissect import state_sha256

        self.weights_sha256 = state_sha256(self.model)  # the identity labels and atlases are keyed by
        self.thresholds = None
        if atlas_dir is not None:
            from deepminer.atlas import Atlas

            self.thresholds = Atlas.load(atlas_dir).thresholds
        self.cache = FeatureCache(max_bytes=int(self.settings["cache_mb"]) << 20)
        self.name, self.version = name, version
        self.initialized = True

    @classmethod
    def from_files(cls, model_file: str | os.PathLike, atlas_dir: str | os.PathLike | None = None, *,
                   name: str = "model", version: str = "local", settings: dict | None = None) -> "DeepMinerHandler":
        """This adapter without TorchServe, on the CPU: ``serve.client.local_explain`` runs requests
        through it so the in-process answer is the served one."""
        handler = cls()
        handler.setup(model_file, atlas_dir, settings=settings, name=name, version=version)
        return handler

    def _warm_up(self) -> None:
        """One explanation of a synthetic image, so the first real request does not pay for lazy
        imports and allocator warm-up."""
        import io

        import numpy as np
        from PIL import Image

        buf = io.BytesIO()
        ramp = np.linspace(0, 255, 256 * 192, dtype=np.float32).reshape(256, 192).astype(np.uint8)
        Image.fromarray(ramp).save(buf, format="PNG")
        try:
            self.explain_one({"data": buf.getvalue()}, 1)
        except Exception:  # noqa: BLE001 - a failed warm-up must not stop the worker
            logger.warning("warm-up explanation failed", exc_info=True)

    def explain_one(self, row: dict, batch: int = 1, *, name: str = "image") -> dict:
        """One request -> the API JSON body (raises :class:`DeepMinerError` on bad input).
        ``name`` names the image in error messages."""
        import torch

        from deepminer.data.io import load_image
        from deepminer.data.tissue import keep_tissue
        from deepminer.explain import explain_image

        t0 = time.perf_counter()
        image = request_image(row)
        opts = parse_options(row.get("options"), self.model.num_units)
        loaded = load_image(image, max_pixels=int(self.settings["max_pixels"]), name=name)
        sketch = decode_sketch(opts["sketch"], loaded.pixels.shape) if opts["sketch"] else None
        t1 = time.perf_counter()
        pixels, tissue = loaded.pixels, None
        if self.settings.get("tissue", True):
            pixels, tissue = keep_tissue(pixels)
        t2 = time.perf_counter()
        # the cache key hashes the request's file (0.6 ms for a 1024 x 1024 PNG) rather than the
        # decoded pixels (3.5 ms); the pixels follow from the file and the tissue setting
        content = f"{hashlib.sha1(image).hexdigest()}:tissue={bool(self.settings.get('tissue', True))}"
        exp = explain_image(self.model, pixels,
                            max_side=opts["max_side"] or int(self.settings["default_max_side"]),
                            top_k=opts["top_units"], unit_maps=opts["unit_maps"], sketch=sketch,
                            thresholds=self.thresholds, cache=self.cache, cache_key=content)
        body = exp.to_api(self.name, self.version, unit_maps=opts["unit_maps"], top_units=opts["top_units"])
        body["model"]["weights_sha256"] = self.weights_sha256
        body.setdefault("input", {}).update({"format": loaded.format, "bits_stored": loaded.bits_stored,
                                             "tissue_fraction": None if tissue is None else round(tissue, 4)})
        timing = body.setdefault("timing_ms", {})
        timing.update(decode=round((t1 - t0) * 1000, 2), tissue=round((t2 - t1) * 1000, 2))
        timing["handler"] = round((time.perf_counter() - t0) * 1000, 2)
        body["server"] = {"device": str(self.device), "batch": batch, "pid": os.getpid(),
                          "threads": torch.get_num_threads(),
                          "cache_hit": bool(getattr(exp, "cache_hit", False))}
        return body

    def handle(self, data: list, context) -> list:
        """One JSON answer per request of the batch, each with its own HTTP status."""
        from deepminer.errors import DeepMinerError

        rows = data or []
        out: list[dict] = []
        for idx, row in enumerate(rows):
            status = 200
            try:
                body = self.explain_one(row if isinstance(row, dict) else {"data": row}, len(rows))
            except DeepMinerError as err:
                status, body = err.status, error_body(err.status, err.kind, str(err))
                logger.info("request %d: %d %s: %s", idx, status, err.kind, err)
            except MemoryError:
                status, body = 507, error_body(507, "OutOfMemory", "not enough memory for this image")
            except Exception as err:  # noqa: BLE001 - answer, log, keep serving
                logger.exception("request %d failed", idx)
                status, body = 500, error_body(500, "InternalError", f"{type(err).__name__}: {err}")
            self._respond(context, idx, status)
            out.append(body)
        return out

    @staticmethod
    def _respond(context, idx: int, status: int) -> None:
        """Per-request status and content type (skipped where an envelope packs several answers)."""
        processors = getattr(context, "request_processor", None) or []
        if idx < len(processors):
            context.set_response_content_type(idx, "application/json")
            if status != 200:
                context.set_response_status(status, http.HTTPStatus(status).phrase, idx)
