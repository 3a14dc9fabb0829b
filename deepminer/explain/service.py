"""One request, explained: :class:`ExplainService` turns image bytes + options into an
:class:`~deepminer.explanation.Explanation`, the same way in TorchServe's worker (the handler wraps
it) and in-process (:func:`deepminer.client.local_explain`).

bytes -> :func:`deepminer.data.io.load_image` -> :func:`deepminer.data.tissue.keep_tissue`
(background, labels and film borders set to 0) -> :func:`deepminer.explain.engine.explain_image`
(CAM, unit influence, unit maps, sketch IoU at the atlas thresholds, with a cache of whole
explanations) -> an Explanation carrying the model's name, version and weights hash, the input's
format and the server's timings.

:meth:`ExplainService.explain_methods` (``POST /explanations/<model>``) runs the same path and then
the saliency maps the request names (``methods``) for its ``target`` on the CAM grid: ``cam`` and
``class_map`` from the explanation, the gradient peers by :func:`deepminer.explain.peers.saliency`
(at most ``max_gradient_methods`` per request), leaving the model as it found it. With the ``job``
option it is a long job (:mod:`deepminer.jobs`): progress written and cancel read between steps (the
explanation pass, then each forward pass of each method), :class:`~deepminer.jobs.JobCancelled` (409)
when it was cancelled or its client stopped waiting.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from deepminer import model_folder
from deepminer.errors import DeepMinerError, InputError
from deepminer.explanation import Explanation
from deepminer.jobs import JobCancelled
from deepminer.model_folder import ModelFolder
from deepminer.options import ExplainOptions, check_ablate, mask_to_png

#: the service's settings (the ``handler:`` section of serve/model-config.yaml), with defaults;
#: ``default_max_side`` None: a request without ``max_side`` is explained at the model's own scale
#: (:func:`deepminer.model_scale.input_side`); a number: at a long side of at most that, whatever the model
SETTINGS: dict[str, Any] = {"model_file": model_folder.MODEL, "atlas": model_folder.ATLAS, "max_pixels": 60_000_000,
                            "cache_mb": 256, "default_max_side": None, "torch_threads": 0,
                            "tissue": True, "keep_freed_memory": True, "max_gradient_methods": 3,
                            "domain": model_folder.DOMAIN, "job_heartbeat_s": 15}


def method_passes(method: str) -> int:
    """The forward passes ``method`` makes with its defaults (the steps a job's progress counts):
    Integrated Gradients one per batch of steps, SmoothGrad one per batch of samples, the others one."""
    import inspect
    import math

    from deepminer.explain.peers import METHODS

    if method not in METHODS:
        return 1
    defaults = {k: p.default for k, p in inspect.signature(METHODS[method].__init__).parameters.items()}
    n = defaults.get("steps", defaults.get("samples"))
    return math.ceil(int(n) / int(defaults.get("batch", 1))) if n is not None else 1


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


#: inside a pass, a job's cancel is read at most this often (seconds) at the backbone's modules
INNER_CHECK_S = 0.5


def _inner_checks(features: Any, job: Any) -> list[Any]:
    """Hooks that read ``job``'s cancel inside a pass, at most every :data:`INNER_CHECK_S`: after
    each module of the backbone ``features`` in the forward pass, and when the gradient of its output
    is computed in the backward pass (a tensor hook that leaves the gradient as it is), so a cancel
    lands within a fraction of a pass, not after a whole batch of steps."""
    import torch

    last = [time.monotonic()]

    def check(*_: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= INNER_CHECK_S:
            last[0] = now
            job.check()

    def after(_module: Any, _inp: Any, out: Any) -> None:
        check()
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(check)

    return [m.register_forward_hook(after) for m in features.modules() if m is not features]


class ExplainService:
    """A loaded model (+ atlas thresholds) and its explanation cache, answering requests.

    ``ExplainService.load(model_file, atlas_dir, settings=..., device=..., name=..., version=...)``;
    then :meth:`explain` per request. Thread-safe as far as the engine and the cache are.
    """

    def __init__(self, model: Any, *, thresholds: Any = None, settings: dict[str, Any] | None = None,
                 name: str = "model", version: str = "1.0", domain: Any = None):
        from deepminer.explain.cache import ExplanationCache
        from deepminer.models.checkpoints import weights_sha256

        self.settings = {**SETTINGS, **(settings or {})}
        if os.environ.get("DEEPMINER_JOB_HEARTBEAT_S"):  # the host's word over the archive's (deepminer.jobs)
            self.settings["job_heartbeat_s"] = float(os.environ["DEEPMINER_JOB_HEARTBEAT_S"])
        self.model = model
        self.device = next(model.parameters()).device
        self.thresholds = thresholds
        self.name, self.version = name, version
        self.weights_sha256 = weights_sha256(model)  # the identity labels and atlases are keyed by
        self.cache = ExplanationCache(max_bytes=int(self.settings["cache_mb"]) << 20)
        self._jobs: Any = None  #: the job file, opened on the first request that names a job
        #: the out-of-domain guard (:class:`deepminer.domain.DomainGuard`, or the older unit-max
        #: :class:`deepminer.domain.DomainModel`) or None; ``domain_note`` says why there is none when
        #: a file was refused
        self.domain, self.domain_note = domain, ""
        if domain is not None:
            try:
                domain.check_model(self.weights_sha256, model=model)
            except InputError as err:
                self.domain, self.domain_note = None, str(err)

    @classmethod
    def load(cls, model_file: str | os.PathLike, atlas_dir: str | os.PathLike | None = None, *,
             settings: dict[str, Any] | None = None, device: str = "cpu", name: str = "model",
             version: str = "1.0", domain: str | os.PathLike | None | bool = True) -> ExplainService:
        """Load the model on ``device`` and the atlas thresholds (``atlas_dir`` None: none; sketch
        IoU then thresholds each unit on the image itself). ``domain``: the out-of-domain summary
        file (:mod:`deepminer.domain`); True: the settings' ``domain`` file beside the model when
        there is one; False/None: none (any kind: :func:`deepminer.domain.load_domain`). A file fitted
        for other weights (a guard: for other frozen layers) is refused (a warning in the log,
        :attr:`domain_note`, ``input.domain`` null), not fatal."""
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
        domain_model, note = None, ""
        if domain is True:
            beside = ModelFolder.of(model_file).root / str(settings.get("domain") or model_folder.DOMAIN)
            domain = beside if settings.get("domain") and beside.is_file() else None
        if domain:
            from deepminer.domain import load_domain

            try:
                domain_model = load_domain(domain)
            except InputError as err:
                note = str(err)
        service = cls(model, thresholds=thresholds, settings=settings, name=name, version=version, domain=domain_model)
        service.domain_note = service.domain_note or note
        if service.domain_note:
            logging.getLogger(__name__).warning("out-of-domain score off: %s", service.domain_note)
        return service

    @property
    def num_units(self) -> int:
        return int(self.model.num_units)

    def explain(self, image: bytes, options: Any = None, *, name: str = "image", batch: int = 1) -> Explanation:
        """Explain the image file ``image`` (PNG/JPEG/TIFF/DICOM bytes) with ``options`` (an
        :class:`ExplainOptions`, or the raw JSON object / text of a request's ``options`` part).
        Bad input raises a one-line :class:`~deepminer.errors.DeepMinerError`; ``name`` names the
        image in it. ``methods``/``target`` are refused here (:meth:`explain_methods` takes them)."""
        opts = self.options(options)
        opts.check_endpoint(explain=False)
        return self._explain(image, opts, name=name, batch=batch)[0]

    def options(self, options: Any) -> ExplainOptions:
        """``options`` (ExplainOptions, or a request's raw JSON) validated for this model."""
        if not isinstance(options, ExplainOptions):
            return ExplainOptions.parse(options, num_units=self.num_units)
        if options.top_units > self.num_units:
            raise InputError(f"options.top_units: must be at most the model's {self.num_units} units, "
                             f"got {options.top_units}")
        check_ablate(options.ablate, self.num_units)
        return options

    def explain_methods(self, image: bytes, options: Any = None, *, name: str = "image",
                        batch: int = 1, user: str | None = None) -> Explanation:
        """``POST /explanations/<model>``: :meth:`explain` (the cache applies), then the map of each
        of ``options.methods`` (none: ``cam``) for ``options.target`` (None: the prediction) on the
        CAM grid: ``cam``/``class_map`` the explanation's rows, the gradient methods normalised to
        [0, 1]. More than ``max_gradient_methods`` gradient methods, an unknown method or target:
        a one-line :class:`InputError` before any work. ``user``: the lab proxy's signed-in user
        (:data:`deepminer.jobs.USER_HEADER`); its ``options.job`` must be its own
        (:func:`deepminer.jobs.check_owner`: 404 before any work)."""
        import numpy as np

        from deepminer.evaluation.methods import one_pass_map

        opts = self.options(options)
        limit = int(self.settings["max_gradient_methods"])
        grads = opts.gradient_methods
        if len(grads) > limit:
            raise InputError(f"options.methods: at most {limit} gradient methods per request "
                             f"(the server's max_gradient_methods), got {len(grads)}: {', '.join(grads)}")
        classes = tuple(self.model.classes)
        if opts.target is not None and opts.target not in classes:
            raise InputError(f"options.target: {opts.target!r} is not a class of the model "
                             f"(known: {', '.join(classes)})")
        job = None
        if opts.job is not None:
            from deepminer.jobs import check_owner

            check_owner(self.jobs, opts.job, user)
            job = self.jobs.tracker(opts.job, heartbeat_s=float(self.settings["job_heartbeat_s"]))
        try:
            if job is not None:  # cancelled (or its client gone) while queued: no work at all
                job.begin(1 + sum(method_passes(m) for m in grads), step="explain")
            exp, pixels, side = self._explain(image, opts, name=name, batch=batch)
            if job is not None:
                job.step("explain")
            t0 = time.perf_counter()
            target = opts.target or exp.prediction
            t = classes.index(target)
            maps: dict[str, np.ndarray] = {}
            ms: dict[str, float] = {}
            for method in opts.methods or ("cam",):
                s = time.perf_counter()
                if method in ("cam", "class_map"):
                    maps[method] = one_pass_map(method, exp, t, None)
                else:
                    maps[method] = self._gradient_map(method, pixels, t, side, job)
                    if maps[method].shape != exp.map_size:
                        raise RuntimeError(f"{method}: map {maps[method].shape} is not on the CAM grid {exp.map_size}")
                ms[method] = round((time.perf_counter() - s) * 1000, 2)
        except JobCancelled as err:
            if job is not None:
                job.finish("cancelled", str(err))
            raise
        except BaseException as err:
            if job is not None:
                job.finish("failed", f"{type(err).__name__}: {err}")
            raise
        if job is not None:
            job.finish("done")
        # new objects, not edits: a cached explanation shares its dicts with this one
        exp.target, exp.method_maps, exp.method_ms = target, maps, ms
        methods_ms = (time.perf_counter() - t0) * 1000
        exp.timing_ms = {**exp.timing_ms, "methods": round(methods_ms, 2),
                         "handler": round(exp.timing_ms.get("handler", 0.0) + methods_ms, 2)}
        return exp

    @property
    def jobs(self) -> Any:
        """The job file (:class:`deepminer.jobs.JobStore`: ``DEEPMINER_JOBS``, read on first use)."""
        if self._jobs is None:
            from deepminer.jobs import JobStore

            self._jobs = JobStore()
        return self._jobs

    def _gradient_map(self, method: str, pixels: Any, target: int, side: int, job: Any = None) -> Any:
        """One gradient method's map, the model given back as found: eval/train mode and every
        parameter's ``requires_grad`` restored, gradients dropped (``.grad`` None), no autograd
        graph left (the map is a detached float32 array). ``job`` (a :class:`deepminer.jobs.Tracker`):
        each forward pass of the method is a step (checked before, counted after; a cancelled job
        raises :class:`~deepminer.jobs.JobCancelled` there, hooks removed)."""
        import numpy as np
        import torch

        from deepminer.explain.peers import saliency

        model = self.model
        training = model.training
        requires = [p.requires_grad for p in model.parameters()]
        hooks = []
        if job is not None:
            hooks = [model.register_forward_pre_hook(lambda *_: job.check()),
                     model.register_forward_hook(lambda *_: job.step(method)),
                     *_inner_checks(model.features, job)]
        try:
            with torch.enable_grad():
                return np.array(saliency(model, pixels, method, target, max_side=None, input_side=side),
                                dtype=np.float32)
        finally:
            for h in hooks:
                h.remove()
            model.train(training)
            for p, r in zip(model.parameters(), requires):
                p.requires_grad_(r)
            model.zero_grad(set_to_none=True)

    def _explain(self, image: bytes, opts: ExplainOptions, *, name: str, batch: int) -> tuple[Explanation, Any, int]:
        """The explanation, the (tissue-masked) pixels it was computed from and the model input's
        long side (:meth:`input_side`)."""
        import torch

        from deepminer.data.io import load_image
        from deepminer.data.tissue import tissue_region
        from deepminer.explain.engine import explain_image

        t0 = time.perf_counter()
        loaded = load_image(image, max_pixels=int(self.settings["max_pixels"]), name=name)
        sketch = opts.sketch_mask(loaded.pixels.shape)
        t1 = time.perf_counter()
        pixels, tissue, region = loaded.pixels, None, None
        use_tissue = bool(self.settings.get("tissue", True))
        if use_tissue:
            pixels, tissue, region = tissue_region(pixels)
        t2 = time.perf_counter()
        # the cache key hashes the request's file (0.6 ms for a 1024 x 1024 PNG) rather than the
        # decoded pixels (3.5 ms); the pixels follow from the file and the tissue setting
        content = f"{hashlib.sha1(image).hexdigest()}:tissue={use_tissue}"
        side = self.input_side(loaded.pixels, opts.max_side, spacing_mm=loaded.spacing_mm, tissue=region)
        exp = explain_image(self.model, pixels, max_side=None, input_side=side,
                            top_units=opts.top_units, unit_maps=opts.unit_maps, sketch=sketch,
                            thresholds=self.thresholds, cache=self.cache, cache_key=content,
                            ablate=opts.ablate)
        exp.model = {"name": self.name, "version": self.version, **exp.model, "weights_sha256": self.weights_sha256}
        t3 = time.perf_counter()
        # the guard judges the decoded pixels at the model's own scale (its own pass through the
        # frozen layers: independent of the explanation's max_side); a unit-max file reads unit_max
        domain = None if self.domain is None else self.domain.judge(
            model=self.model, pixels=loaded.pixels, region=region, tissue_fraction=tissue, unit_max=exp.unit_max,
            spacing_mm=getattr(loaded, "spacing_mm", None))
        exp.input = {**exp.input, "format": loaded.format, "bits_stored": loaded.bits_stored,
                     "tissue_fraction": None if tissue is None else round(tissue, 4), "domain": domain}
        if opts.tissue_mask:  # the region as the wire's PNG (a few KB; ~1 ms at 1024 px)
            exp.input["tissue_mask"] = None if region is None else base64.b64encode(mask_to_png(region)).decode("ascii")
        exp.timing_ms = {**exp.timing_ms, "decode": round((t1 - t0) * 1000, 2), "tissue": round((t2 - t1) * 1000, 2),
                         "domain": round((time.perf_counter() - t3) * 1000, 3),
                         "handler": round((time.perf_counter() - t0) * 1000, 2)}
        exp.server = {"device": str(self.device), "batch": batch, "pid": os.getpid(),
                      "threads": torch.get_num_threads(), "cache_hit": bool(exp.cache_hit)}
        return exp, pixels, side[0]

    def input_side(self, pixels: Any, max_side: int | None = None, *, spacing_mm: float | None = None,
                   tissue: Any = None) -> tuple[int, str]:
        """``(long side of the model input, how)`` for the grey image ``pixels`` (H, W): the request's
        ``max_side`` (at most), else the server's ``default_max_side`` when set, else the model's own
        scale (:func:`deepminer.model_scale.input_side`: the image's pixel spacing ``spacing_mm``, else
        the breast's extent in the ``tissue`` mask (computed from ``pixels`` when None and needed),
        else the model's long side; a model that records no scale: at most
        :data:`~deepminer.geometry.DEFAULT_MAX_SIDE`)."""
        from deepminer.model_scale import input_side, model_scale

        h, w = int(pixels.shape[0]), int(pixels.shape[1])
        default = self.settings.get("default_max_side")
        if max_side is None and default:
            side, _ = input_side(self.model, h, w, max_side=int(default))
            return side, f"server default_max_side: long side at most {int(default)} px"
        if max_side is None and tissue is None and spacing_mm is None and model_scale(self.model):
            from deepminer.data.tissue import tissue_mask

            tissue = tissue_mask(pixels)
        return input_side(self.model, h, w, max_side=max_side, spacing_mm=spacing_mm, tissue=tissue)

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
                f"atlas {'yes' if self.thresholds is not None else 'no'}, "
                f"domain {'yes' if self.domain is not None else self.domain_note or 'no'}, freed memory kept "
                f"{'yes' if is_applied() else 'no'}, library {Path(deepminer.__file__).parent}")
