"""One request, explained: :class:`ExplainService` turns image bytes + options into an
:class:`~deepminer.explanation.Explanation`, the same way in TorchServe's worker (the handler wraps
it) and in-process (:func:`deepminer.client.local_explain`).

bytes -> :func:`deepminer.data.io.load_image` -> :func:`deepminer.data.tissue.keep_tissue`
(background, labels and film borders set to 0) -> :func:`deepminer.explain.engine.explain_image`
(CAM, unit influence, unit maps, sketch IoU at the atlas thresholds, with a cache of whole
explanations) -> an Explanation carrying the model's name, version and weights hash, the input's
format and the server's timings.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from deepminer.errors import DeepMinerError, InputError
from deepminer.explanation import Explanation
from deepminer.geometry import DEFAULT_MAX_SIDE
from deepminer.options import ExplainOptions

#: the service's settings (the ``handler:`` section of serve/model-config.yaml), with defaults
SETTINGS: dict[str, Any] = {"model_file": "model.pt", "atlas": "atlas", "max_pixels": 60_000_000,
                            "cache_mb": 256, "default_max_side": DEFAULT_MAX_SIDE, "torch_threads": 0,
                            "tissue": True, "keep_freed_memory": True}


def error_json(err: BaseException) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` of the API's error answer ``{"code", "type", "message"}`` for ``err``:
    a :class:`DeepMinerError` keeps its status and kind; MemoryError is 507; anything else 500."""
    if isinstance(err, DeepMinerError):
        status, kind = err.status, err.kind
    elif isinstance(err, MemoryError):
        status, kind, err = 507, "OutOfMemory", MemoryError("not enough memory for this image")
    else:
        status, kind = 500, "InternalError"
    message = str(err) if status != 500 else f"{type(err).__name__}: {err}"
    return status, {"code": int(status), "type": kind, "message": " ".join(message.split())}


class ExplainService:
    """A loaded model (+ atlas thresholds) and its explanation cache, answering requests.

    ``ExplainService.load(model_file, atlas_dir, settings=..., device=..., name=..., version=...)``;
    then :meth:`explain` per request. Thread-safe as far as the engine and the cache are.
    """

    def __init__(self, model: Any, *, thresholds: Any = None, settings: dict[str, Any] | None = None,
                 name: str = "model", version: str = "1.0"):
        from deepminer.explain.cache import ExplanationCache
        from deepminer.models.checkpoints import weights_sha256

        self.settings = {**SETTINGS, **(settings or {})}
        self.model = model
        self.device = next(model.parameters()).device
        self.thresholds = thresholds
        self.name, self.version = name, version
        self.weights_sha256 = weights_sha256(model)  # the identity labels and atlases are keyed by
        self.cache = ExplanationCache(max_bytes=int(self.settings["cache_mb"]) << 20)

    @classmethod
    def load(cls, model_file: str | os.PathLike, atlas_dir: str | os.PathLike | None = None, *,
             settings: dict[str, Any] | None = None, device: str = "cpu", name: str = "model",
             version: str = "1.0") -> ExplainService:
        """Load the model on ``device`` and the atlas thresholds (``atlas_dir`` None: none; sketch
        IoU then thresholds each unit on the image itself)."""
        import torch

        from deepminer.models import load_model
        from deepminer.runtime import keep_freed_memory

        settings = {**SETTINGS, **(settings or {})}
        if settings.get("keep_freed_memory", True):
            keep_freed_memory()  # no page faults for every activation of every request: 2-3x faster on CPU
        if int(settings["torch_threads"]) > 0:
            torch.set_num_threads(int(settings["torch_threads"]))
        model = load_model(model_file, map_location=torch.device(device)).eval()
        thresholds = None
        if atlas_dir is not None:
            from deepminer.atlas import Atlas

            thresholds = Atlas.load(atlas_dir).thresholds
        return cls(model, thresholds=thresholds, settings=settings, name=name, version=version)

    @property
    def num_units(self) -> int:
        return int(self.model.num_units)

    def explain(self, image: bytes, options: Any = None, *, name: str = "image", batch: int = 1) -> Explanation:
        """Explain the image file ``image`` (PNG/JPEG/TIFF/DICOM bytes) with ``options`` (an
        :class:`ExplainOptions`, or the raw JSON object / text of a request's ``options`` part).
        Bad input raises a one-line :class:`~deepminer.errors.DeepMinerError`; ``name`` names the
        image in it."""
        import torch

        from deepminer.data.io import load_image
        from deepminer.data.tissue import keep_tissue
        from deepminer.explain.engine import explain_image

        t0 = time.perf_counter()
        if isinstance(options, ExplainOptions):
            opts = options
            if opts.top_units > self.num_units:
                raise InputError(f"options.top_units: must be at most the model's {self.num_units} units, "
                                 f"got {opts.top_units}")
        else:
            opts = ExplainOptions.parse(options, num_units=self.num_units)
        loaded = load_image(image, max_pixels=int(self.settings["max_pixels"]), name=name)
        sketch = opts.sketch_mask(loaded.pixels.shape)
        t1 = time.perf_counter()
        pixels, tissue = loaded.pixels, None
        use_tissue = bool(self.settings.get("tissue", True))
        if use_tissue:
            pixels, tissue = keep_tissue(pixels)
        t2 = time.perf_counter()
        # the cache key hashes the request's file (0.6 ms for a 1024 x 1024 PNG) rather than the
        # decoded pixels (3.5 ms); the pixels follow from the file and the tissue setting
        content = f"{hashlib.sha1(image).hexdigest()}:tissue={use_tissue}"
        exp = explain_image(self.model, pixels, max_side=opts.max_side or int(self.settings["default_max_side"]),
                            top_units=opts.top_units, unit_maps=opts.unit_maps, sketch=sketch,
                            thresholds=self.thresholds, cache=self.cache, cache_key=content)
        exp.model = {"name": self.name, "version": self.version, **exp.model, "weights_sha256": self.weights_sha256}
        exp.input = {**exp.input, "format": loaded.format, "bits_stored": loaded.bits_stored,
                     "tissue_fraction": None if tissue is None else round(tissue, 4)}
        exp.timing_ms = {**exp.timing_ms, "decode": round((t1 - t0) * 1000, 2), "tissue": round((t2 - t1) * 1000, 2),
                         "handler": round((time.perf_counter() - t0) * 1000, 2)}
        exp.server = {"device": str(self.device), "batch": batch, "pid": os.getpid(),
                      "threads": torch.get_num_threads(), "cache_hit": bool(exp.cache_hit)}
        return exp

    def warm_up(self) -> None:
        """One explanation of a synthetic image, so the first real request does not pay for lazy
        imports and allocator warm-up (a failure is raised: the caller decides)."""
        import io

        import numpy as np
        from PIL import Image

        buf = io.BytesIO()
        ramp = np.linspace(0, 255, 256 * 192, dtype=np.float32).reshape(256, 192).astype(np.uint8)
        Image.fromarray(ramp).save(buf, format="PNG")
        self.explain(buf.getvalue())

    def describe(self) -> str:
        """One line for the log: model, device, atlas, library."""
        import deepminer
        from deepminer.runtime import is_applied

        return (f"model {self.name} v{self.version} ({self.model.arch}, {self.num_units} units) on {self.device}, "
                f"atlas {'yes' if self.thresholds is not None else 'no'}, freed memory kept "
                f"{'yes' if is_applied() else 'no'}, library {Path(deepminer.__file__).parent}")
