"""TorchServe handler for DeepMiner Studio: a thin adapter, no math of its own.

request (image bytes as the body or multipart part ``data``, optional part ``options`` JSON)
-> :class:`deepminer.explain.service.ExplainService` (decode, tissue mask, the one-pass engine with
its cache, options validated by :class:`deepminer.options.ExplainOptions`) ->
:meth:`deepminer.explanation.Explanation.to_json` (arrays as float16 ``{"shape","dtype","data"}``).

``POST /explanations/<model>`` reaches the same handler with the request header ``explain`` =
``"True"`` (set by TorchServe's frontend, per request): such a request goes to
:meth:`~deepminer.explain.service.ExplainService.explain_methods` (the ``methods``/``target``
options: saliency maps on the CAM grid), any other to ``explain``.

A request with the ``job`` option (``/explanations`` only) is a long job (:mod:`deepminer.jobs`): the
worker writes its progress to the host's job file (``DEEPMINER_JOBS``) between steps and stops it
there when it is cancelled or its client stopped touching it (``job_heartbeat_s``;
``DEEPMINER_JOB_HEARTBEAT_S`` overrides it): ``409 Cancelled``, and the worker takes the next request.

Bad input answers its own 4xx JSON ``{"code","type","message"}``
(:func:`deepminer.explain.service.error_json`; per request, also inside a batch) and the worker keeps
serving. The ``.mar`` ships the ``deepminer`` library next to this file, so the host needs
torch/torchvision and the third-party libraries in the archive's ``requirements.txt``, not this
project. Settings come from the ``handler:`` section of the per-model config
(``serve/model-config.yaml``). TorchServe requires exactly one class in this module.
"""
from __future__ import annotations

import base64
import binascii
import http
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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


class DeepMinerHandler:
    """``initialize`` builds the :class:`~deepminer.explain.service.ExplainService` (the model on
    ``cuda:<gpu_id>`` when TorchServe assigns a GPU, else the CPU; the atlas thresholds; the cache);
    ``handle`` answers one JSON per request."""

    def __init__(self) -> None:
        self.initialized = False
        self.service: Any = None

    def initialize(self, context: Any) -> None:
        """TorchServe's entry: settings from the model's yaml, the GPU it assigns, the files of the
        extracted archive."""
        props = context.system_properties
        model_dir = Path(props.get("model_dir") or ".")
        if str(model_dir) not in sys.path:  # the deepminer copy shipped in the .mar (TorchServe's layout)
            sys.path.insert(0, str(model_dir))
        import torch

        from deepminer import model_folder
        from deepminer.explain.service import SETTINGS, ExplainService

        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        settings = {**SETTINGS, **(yaml_cfg.get("handler") or {})}
        gpu_id = props.get("gpu_id")
        device = "cpu"
        if torch.cuda.is_available() and gpu_id is not None:
            device = f"cuda:{int(gpu_id)}"
            torch.cuda.set_device(device)
        atlas_dir = model_dir / str(settings.get("atlas") or model_folder.ATLAS)
        version = str(((context.manifest or {}).get("model") or {}).get("modelVersion", "1.0"))
        self.service = ExplainService.load(model_dir / settings["model_file"],
                                           atlas_dir if model_folder.is_atlas(atlas_dir) else None,
                                           settings=settings, device=device, name=context.model_name,
                                           version=version)
        try:
            self.service.warm_up()
        except Exception:  # noqa: BLE001 - a failed warm-up must not stop the worker; the log says why
            logger.warning("warm-up explanation failed", exc_info=True)
        self.initialized = True
        logger.info("deepminer handler: %s", self.service.describe())

    def handle(self, data: list, context: Any) -> list:
        """One JSON answer per request of the batch, each with its own HTTP status."""
        from deepminer.explain.service import error_json

        rows = data or []
        out: list[dict] = []
        for idx, row in enumerate(rows):
            status = 200
            row = row if isinstance(row, dict) else {"data": row}
            try:
                if self._is_explain(context, idx):
                    exp = self.service.explain_methods(request_image(row), row.get("options"), batch=len(rows),
                                                       user=self._user(context, idx))
                else:
                    exp = self.service.explain(request_image(row), row.get("options"), batch=len(rows))
                body = exp.to_json()
            except Exception as err:  # noqa: BLE001 - every failure becomes this request's answer; the worker keeps serving
                status, body = error_json(err)
                if status >= 500:
                    logger.exception("request %d failed", idx)
                else:
                    logger.info("request %d: %d %s: %s", idx, status, body["type"], body["message"])
            self._respond(context, idx, status)
            out.append(body)
        return out

    @staticmethod
    def _header(context: Any, idx: int, key: str) -> str | None:
        """Request ``idx``'s header ``key`` (TorchServe hands the worker its name as sent, value
        decoded), or None."""
        try:
            return context.get_request_header(idx, key)
        except (AttributeError, IndexError, KeyError, TypeError):  # no request headers (e.g. an envelope's rows)
            return None

    def _is_explain(self, context: Any, idx: int) -> bool:
        """Request ``idx`` came to ``/explanations/<model>`` (header ``explain: True``, as
        TorchServe's own ``BaseHandler._is_explain`` reads it, but per request of the batch)."""
        return self._header(context, idx, "explain") == "True"

    def _user(self, context: Any, idx: int) -> str | None:
        """The signed-in user the lab proxy put in request ``idx`` (:data:`deepminer.jobs.USER_HEADER`;
        nginx sets it on every request it passes, so a client cannot), or None (no proxy)."""
        from deepminer.jobs import USER_HEADER

        return self._header(context, idx, USER_HEADER) or None

    @staticmethod
    def _respond(context: Any, idx: int, status: int) -> None:
        """Per-request status and content type (skipped where an envelope packs several answers)."""
        processors = getattr(context, "request_processor", None) or []
        if idx < len(processors):
            context.set_response_content_type(idx, "application/json")
            if status != 200:
                context.set_response_status(status, http.HTTPStatus(status).phrase, idx)
