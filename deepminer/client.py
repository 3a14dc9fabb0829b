"""The one client of the DeepMiner HTTP API (docs/api.md), whether the model is served or runs here;
used by the workbench, the CLI and the bench.

* :class:`Client` (``Client(url, model=..., token=... | key_file=...)``) talks to TorchServe: one
  ``requests.Session`` (keep-alive), timeouts, the bearer token (re-reading the key file, and asking
  TorchServe for a fresh key with the API key, when one is refused), :class:`~deepminer.options.ExplainOptions`
  sent, answers decoded into :class:`~deepminer.explanation.Explanation` (:meth:`Explanation.from_json`).
* :class:`LocalClient` has the same interface and runs the server's own request path
  (:class:`~deepminer.explain.service.ExplainService`) in this process, so its answers equal the
  served ones (:func:`local_explain`: one call of it).
* :func:`connect` decides, in one place, which of the two a setting (``backend`` = ``serve`` |
  ``local``) means.
* TorchServe's token authorization and management API: :func:`read_key_file` (the one reader of
  ``key_file.json``), :func:`bearer` (the one ``Authorization`` header), :func:`list_models`,
  :func:`describe_model`, :func:`model_ready`.

Talking to our own API over HTTP needs no TorchServe import: this module imports neither torch nor
TorchServe (the in-process path imports the engine when it is first used).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests

from deepminer.errors import DeepMinerError, InputError
from deepminer.explanation import Explanation
from deepminer.jobs import ENV_JOBS, check_id, heartbeat, new_id
from deepminer.options import DEFAULTS, ExplainOptions

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MODEL = "demo"
ENV_URL, ENV_MODEL, ENV_KEY_FILE, ENV_TOKEN, ENV_MANAGEMENT_URL = (
    "DEEPMINER_SERVE_URL", "DEEPMINER_MODEL", "DEEPMINER_KEY_FILE", "DEEPMINER_TOKEN", "DEEPMINER_MANAGEMENT_URL")
BACKENDS = ("serve", "local")  #: over HTTP to TorchServe, or in this process (:func:`connect`)


class ServeUnavailable(ConnectionError):
    """TorchServe does not answer (connection refused, DNS, timeout)."""


class ServeError(RuntimeError):
    """TorchServe answered 4xx/5xx; ``status``, ``type`` and ``message`` come from its JSON body."""

    def __init__(self, status: int, type: str, message: str):  # noqa: A002 - the API's field name
        super().__init__(f"{status} {type}: {message}")
        self.status = int(status)
        self.type = type
        self.message = message


# -- TorchServe's token authorization and management API ---------------------------------------------

def read_key_file(path: str | os.PathLike | None, kind: str = "inference") -> str | None:
    """The ``inference`` / ``management`` / ``API`` key in TorchServe's ``key_file.json``; None when
    there is no such file or key, or the file is being written (not JSON yet)."""
    if not path:
        return None
    try:
        key = json.loads(Path(path).read_text(encoding="utf-8"))[kind]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(key) if key else None


def bearer(key: str | None) -> dict[str, str]:
    """The ``Authorization`` header that sends ``key`` to TorchServe (nothing without a key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def _management_get(management_url: str, path: str, headers: Mapping[str, str] | None, timeout: float,
                    params: Mapping[str, str | int] | None = None) -> Any:
    """The JSON body of ``GET <management_url><path>``: :class:`ServeError` when it answers other than
    200, :class:`ServeUnavailable` when it does not answer, or not with JSON (the cause chained)."""
    try:
        r = requests.get(f"{management_url}{path}", params=dict(params or {}), headers=dict(headers or {}),
                         timeout=timeout)
        if r.status_code != 200:
            raise ServeError(r.status_code, "ManagementError", f"GET {path} answered {r.status_code}")
        return r.json()
    except (requests.RequestException, ValueError) as err:
        raise ServeUnavailable(f"the management API at {management_url} is not reachable "
                               f"({type(err).__name__})") from err


#: the second registration of a model's archive that does its heavy work (``POST /explanations``: peer
#: saliency; set evaluations) in its own worker, so ``/predictions`` never waits behind it
#: (``scripts/serve.sh`` and ``serve.launch.with_heavy_pools`` register it, docs/serving.md)
HEAVY_SUFFIX = "-heavy"


def heavy_pool(model: str) -> str:
    """The served name of ``model``'s heavy-work pool."""
    return model if model.endswith(HEAVY_SUFFIX) else model + HEAVY_SUFFIX


def list_models(management_url: str, headers: Mapping[str, str] | None = None, *, timeout: float = 5.0,
                pools: bool = False) -> list[str]:
    """The names of the models TorchServe hosts (management ``GET /models``, every page), sorted,
    without the heavy-work pools (:func:`heavy_pool`) unless ``pools``; errors as :func:`_management_get`."""
    names: list[str] = []
    token: str | None = None
    for _ in range(100):  # TorchServe pages the list (limit 100, nextPageToken)
        body = _management_get(management_url, "/models", headers, timeout,
                               {"limit": 100, **({"next_page_token": token} if token else {})})
        if not isinstance(body, dict):
            raise ServeUnavailable(f"the management API at {management_url} is not reachable (BadResponse)")
        names += [str(m["modelName"]) for m in body.get("models", []) if isinstance(m, dict) and "modelName" in m]
        token = body.get("nextPageToken")
        if not token:
            break
    return sorted(n for n in set(names) if pools or not n.endswith(HEAVY_SUFFIX))


def describe_model(management_url: str, name: str, headers: Mapping[str, str] | None = None, *,
                   timeout: float = 5.0) -> dict[str, Any]:
    """The management API's description of model ``name`` (workers with pid and status, batch size,
    ``minWorkers``...); errors as :func:`_management_get`."""
    body = _management_get(management_url, f"/models/{name}", headers, timeout)
    if not (isinstance(body, list) and body and isinstance(body[0], dict)):
        raise ServeUnavailable(f"the management API at {management_url} is not reachable (BadResponse)")
    return body[0]


def model_ready(management_url: str, name: str, headers: Mapping[str, str] | None = None, *,
                timeout: float = 5.0) -> bool:
    """True when model ``name`` has its minimum workers READY (``/ping`` is Healthy before that)."""
    try:
        info = describe_model(management_url, name, headers, timeout=timeout)
        ready = [w for w in info.get("workers", []) if isinstance(w, dict) and w.get("status") == "READY"]
        return len(ready) >= max(1, int(info.get("minWorkers", 1)))
    except (ServeError, ServeUnavailable, TypeError, ValueError):
        return False


def _read_image(image: bytes | str | os.PathLike) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    try:
        return Path(image).read_bytes()
    except OSError as err:
        raise InputError(f"{image}: {err.strerror or 'unreadable'}") from None


class Client:
    """HTTP client of one TorchServe model. ``token`` (a bearer key) or ``key_file`` (TorchServe's
    ``key_file.json``, re-read when a key is refused) when token authorization is on."""

    def __init__(self, url: str = DEFAULT_URL, *, model: str = DEFAULT_MODEL, token: str | None = None,
                 key_file: str | os.PathLike | None = None, timeout: float = 60,
                 management_url: str | None = None, jobs: str | os.PathLike | None = None):
        from deepminer.jobs import JobStore

        #: the server's job file (:mod:`deepminer.jobs`; ``jobs`` or ``DEEPMINER_JOBS``), or None: a
        #: client on another host then uses the lab proxy's jobs API when the server has it
        #: (:attr:`job_store`); without either it sends no job ids (no progress, no cancel)
        self.jobs = JobStore(jobs) if jobs else None
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.key_file = Path(key_file) if key_file else None
        self._token = token
        self.management_url = (management_url or _next_port(self.url)).rstrip("/")
        self.session = requests.Session()
        self._no_pool: set[str] = set()  #: models whose heavy pool the server does not have (a 404)
        self._remote: RemoteJobs | None | bool = None  #: the server's jobs API once asked (False: none)

    @classmethod
    def from_env(cls, **overrides: Any) -> "Client":
        """A client configured by ``DEEPMINER_SERVE_URL``, ``DEEPMINER_MODEL``, ``DEEPMINER_TOKEN``,
        ``DEEPMINER_KEY_FILE`` and ``DEEPMINER_MANAGEMENT_URL`` (what ``make run`` exports for the UI);
        keyword arguments that are not None win."""
        kw: dict[str, Any] = {"url": os.environ.get(ENV_URL) or DEFAULT_URL,
                              "model": os.environ.get(ENV_MODEL) or DEFAULT_MODEL,
                              "token": os.environ.get(ENV_TOKEN) or None,
                              "key_file": os.environ.get(ENV_KEY_FILE) or None,
                              "management_url": os.environ.get(ENV_MANAGEMENT_URL) or None,
                              "jobs": os.environ.get(ENV_JOBS) or None}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    # -- auth and management ------------------------------------------------------------------
    def key(self, kind: str = "inference") -> str | None:
        """The key sent with ``kind`` calls (``inference``, ``management``, ``API``): the token given
        (inference calls), else the key file's, read now (TorchServe rewrites it)."""
        if self._token and kind == "inference":
            return self._token
        return read_key_file(self.key_file, kind)

    def headers(self, kind: str = "inference") -> dict[str, str]:
        """The ``Authorization`` header of ``kind`` calls (empty without a key)."""
        return bearer(self.key(kind))

    def refresh_token(self) -> bool:
        """Ask TorchServe for a new inference key with the API key of the key file (the server writes
        it to the key file); True when a new key is in place."""
        api_key = self.key("API")
        if self._token or not api_key:
            return False
        before = self.key()
        try:
            r = self.session.get(f"{self.management_url}/token", params={"type": "inference"},
                                 headers=bearer(api_key), timeout=self.timeout)
        except requests.RequestException:
            return False
        for _ in range(20):  # the server rewrites the file
            if r.ok and self.key() != before:
                return True
            time.sleep(0.05)
        return False

    def models(self, *, timeout: float = 5.0) -> list[str]:
        """The models the server hosts (:func:`list_models` with the management key)."""
        return list_models(self.management_url, self.headers("management"), timeout=timeout)

    def model_ready(self, name: str | None = None) -> bool:
        """Whether model ``name`` (None: this client's) has its workers ready (:func:`model_ready`)."""
        return model_ready(self.management_url, name or self.model, self.headers("management"))

    @property
    def where(self) -> str:
        """Where the model runs, one line of Markdown for a page."""
        return f"Model server: {self.url} · model `{self.model}`"

    def warm_up(self) -> None:
        """Nothing to load here: the server holds the model."""

    # -- calls --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        url = f"{self.url}{path}"
        extra = kw.pop("headers", None) or {}
        for attempt in range(2):
            headers = self.headers()
            try:
                r = self.session.request(method, url, headers={**headers, **extra},
                                         timeout=self.timeout, **kw)
            except (requests.ConnectionError, requests.Timeout) as err:
                raise ServeUnavailable(f"TorchServe is not reachable at {self.url} ({type(err).__name__})") from None
            refused = r.status_code in (400, 401) and "InvalidKeyException" in r.text[:300]
            if refused and attempt == 0 and self.key_file is not None:
                if self.headers() != headers or self.refresh_token():  # key file rewritten, or renewed now
                    continue
            return r
        return r

    def ping(self) -> bool:
        """True when TorchServe answers ``/ping`` Healthy."""
        try:
            r = self._request("GET", "/ping")
        except ServeUnavailable:
            return False
        try:
            return r.status_code == 200 and r.json().get("status") == "Healthy"
        except ValueError:
            return False

    def explain_raw(self, image: bytes | str | os.PathLike, options: Mapping[str, Any] | None = None, *,
                    explanations: bool = False, heavy: bool = False) -> dict:
        """POST an image (+ options) to ``/predictions/<model>`` (``explanations``:
        ``/explanations/<model>``) and return the JSON body; raises :class:`ServeError` on 4xx/5xx.
        Explanations, and ``heavy`` work (a set evaluation), go to the model's heavy pool
        (:func:`heavy_pool`) when the server has one, else to the model itself."""
        data = _read_image(image)
        endpoint = "explanations" if explanations else "predictions"
        names = [self.model]
        if (explanations or heavy) and self.model not in self._no_pool:
            names.insert(0, heavy_pool(self.model))
        for name in names:
            path = f"/{endpoint}/{name}"
            if options:
                files = {"data": ("image", data, "application/octet-stream"),
                         "options": (None, json.dumps(dict(options)), "application/json")}
                r = self._request("POST", path, files=files)
            else:  # the bare body: TorchServe skips decoding a multipart form (about 3 ms for 200 KB)
                r = self._request("POST", path, data=data, headers={"Content-Type": "application/octet-stream"})
            if r.status_code == 404 and name != self.model and "ModelNotFound" in r.text[:300]:
                self._no_pool.add(self.model)  # a server without pools: the model itself from now on
                continue
            break
        return _body_or_raise(r)

    def explain_methods(self, image: bytes | str | os.PathLike, methods: Sequence[str], *, target: str | None = None,
                        options: ExplainOptions | None = None, job: str | None = None, group: str | None = None,
                        beat: bool = True) -> Explanation:
        """``POST /explanations/<model>``: the explanation plus the saliency map of each of
        ``methods`` (``cam``, ``class_map``, ``gradcam``, ``gradcam++``, ``guided_backprop``,
        ``integrated_gradients``, ``smoothgrad``) for ``target`` (None: the prediction) on the CAM
        grid, in :attr:`Explanation.method_maps` (cost in ``method_ms``). ``options`` carries the
        other options; ``methods``/``target`` given here win. Unknown names are refused before sending.

        A long job (:mod:`deepminer.jobs`) when the client knows the server's job file
        (:attr:`jobs`), or, on another machine, the server offers the lab proxy's jobs API
        (:attr:`job_store`, :class:`RemoteJobs`): under ``job`` (None: a fresh id), in ``group``; its row is written before
        sending and touched while waiting (``beat`` False: the caller touches it,
        :meth:`JobStore.touch <deepminer.jobs.JobStore.touch>`); read it with :meth:`job`, stop it
        with :meth:`cancel` (the call then raises :class:`ServeError` 409 ``Cancelled``). A call left
        by an exception here (a timeout, Ctrl-C) cancels its job; a killed process stops touching it."""
        opts = _with_methods(options, methods, target)
        store = self.job_store
        if store is None and job is None:
            return Explanation.from_json(self.explain_raw(image, opts.to_json(), explanations=True))
        if store is None:
            raise InputError("job: this client has no job file (pass jobs= or set DEEPMINER_JOBS) and the "
                             "server offers no jobs API (/jobs)")
        job_id = check_id(job) if job is not None else new_id()
        opts = dataclasses.replace(opts, job=job_id)
        return Explanation.from_json(_as_job(store, job_id, group, beat,
                                             lambda: self.explain_raw(image, opts.to_json(), explanations=True)))

    @property
    def job_store(self) -> Any:
        """Where this client's long jobs live: the job file (:attr:`jobs`, a client on the server's
        host), else the server's jobs API (:class:`RemoteJobs`: the lab proxy's ``/api/jobs``, asked once
        whether it is there), else None (no progress, no cancel)."""
        if self.jobs is not None:
            return self.jobs
        if self._remote is None:
            remote = RemoteJobs(self)
            offered = remote.offered()
            if offered is None:  # no answer now: ask again next time
                return None
            self._remote = remote if offered else False
        return self._remote or None

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The progress of job ``job_id`` (:meth:`JobStore.get <deepminer.jobs.JobStore.get>`), or None."""
        store = self.job_store
        return None if store is None else store.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Stop job ``job_id`` at its next step; False when there is no such job running (unknown,
        finished) or no job file: nothing done."""
        store = self.job_store
        return False if store is None else store.cancel(job_id)

    def cancel_group(self, group: str) -> int:
        """Stop every running job of ``group`` (e.g. a set run's); how many."""
        store = self.job_store
        return 0 if store is None else store.cancel_group(group)

    def explain(self, image: bytes | str | os.PathLike, options: ExplainOptions | None = None, *,
                top_units: int = DEFAULTS["top_units"], unit_maps: str = DEFAULTS["unit_maps"],
                sketch: np.ndarray | None = None, max_side: int | None = None,
                ablate: Sequence[int] | None = None, heavy: bool = False) -> Explanation:
        """Explain one image (bytes or a path): prediction, CAMs, unit influence, unit maps and, with
        a ``sketch`` (bool mask, any size), every unit's IoU with it; with ``ablate`` (unit ids),
        :attr:`Explanation.ablation`: the answer with those units silenced. ``options`` wins over the
        keyword arguments when given. ``heavy``: part of a long job (a set evaluation), sent to the
        model's heavy pool (:meth:`explain_raw`)."""
        if options is None:
            options = ExplainOptions.build(top_units=top_units, unit_maps=unit_maps, sketch=sketch, max_side=max_side,
                                           ablate=ablate)
        return Explanation.from_json(self.explain_raw(image, None if options.is_default else options.to_json(),
                                                      heavy=heavy))

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteJobs:
    """The client side of :class:`~deepminer.jobs.JobStore` (``create``, ``touch``, ``cancel``,
    ``cancel_group``, ``get``) over the lab proxy's jobs API (``<url>/jobs``, :func:`serve.auth.jobs_api`),
    for a client on another machine: its jobs are the signed-in user's, in the host's job file. It
    uses the client's session (its credentials, cookies and certificate) with a short timeout; a
    heartbeat that fails is skipped (the next one comes 2 s later)."""

    TIMEOUT_S = 10.0

    def __init__(self, client: Client):
        self.client = client
        self.url = f"{client.url}/jobs"

    def _call(self, method: str, path: str = "", **kw: Any) -> requests.Response:
        try:
            return self.client.session.request(method, self.url + path, timeout=self.TIMEOUT_S, **kw)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise ServeUnavailable(f"the jobs API is not reachable at {self.url} ({type(err).__name__})") from None

    def offered(self) -> bool | None:
        """Whether the server has the jobs API (``GET /jobs`` answers the user's list); None when it
        does not answer at all."""
        try:
            r = self._call("GET")
        except ServeUnavailable:
            return None
        try:
            return r.status_code == 200 and isinstance(r.json().get("jobs"), list)
        except (ValueError, AttributeError):
            return False

    def create(self, job_id: str, *, group: str | None = None) -> None:
        """``POST /jobs``: the ``queued`` row, ours (:class:`ServeError` when refused, e.g. 409: id taken)."""
        _body_or_raise(self._call("POST", json={"id": job_id, "group": group}))

    def touch(self, job_id: str) -> None:
        """``POST /jobs/<id>/heartbeat`` (a failure is skipped: the heartbeat thread goes on)."""
        try:
            self._call("POST", f"/{job_id}/heartbeat")
        except (ServeUnavailable, requests.RequestException):
            pass

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """``DELETE /jobs/<id>``: True when asked to stop; False for an unknown or finished job. (The
        server records who cancelled it; ``reason`` is the local store's.)"""
        return self._call("DELETE", f"/{job_id}").status_code == 200

    def cancel_group(self, group: str, reason: str = "cancelled") -> int:
        """``DELETE /jobs?group=``: how many of our jobs of ``group`` were asked to stop."""
        return int(_body_or_raise(self._call("DELETE", params={"group": group})).get("cancelled", 0))

    def get(self, job_id: str) -> dict[str, Any] | None:
        """``GET /jobs/<id>``: the row, or None (unknown, or another user's)."""
        r = self._call("GET", f"/{job_id}")
        return None if r.status_code == 404 else _body_or_raise(r)


def _body_or_raise(r: requests.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400:
        if isinstance(body, dict) and "message" in body:
            raise ServeError(r.status_code, str(body.get("type", "Error")), str(body["message"]))
        raise ServeError(r.status_code, "HTTPError", (r.text or r.reason or "").strip()[:300])
    if not isinstance(body, dict):
        raise ServeError(r.status_code, "BadResponse", "the server did not answer a JSON object")
    return body


def _as_job(store: Any, job_id: str, group: str | None, beat: bool, call: Any) -> Any:
    """``call()`` as job ``job_id``: its row written first, touched while it runs (``beat``), and
    cancelled when the call is left by anything but the server's answer (a timeout, Ctrl-C)."""
    import contextlib

    store.create(job_id, group=group)
    try:
        with heartbeat(store, job_id) if beat else contextlib.nullcontext():
            return call()
    except (ServeError, DeepMinerError):  # the server's (or the service's) answer: the job is over
        raise
    except BaseException:
        store.cancel(job_id, "client gone")
        raise


def _next_port(url: str) -> str:
    """TorchServe's default layout: management on the inference port + 1."""
    parts = urlsplit(url)
    port = (parts.port or (443 if parts.scheme == "https" else 80)) + 1
    return urlunsplit((parts.scheme, f"{parts.hostname}:{port}", "", "", ""))


# -- in-process -------------------------------------------------------------------------------------

_SERVICES: dict[tuple, Any] = {}
_SERVICES_LOCK = threading.Lock()


def local_service(model_path: str | os.PathLike, atlas: str | os.PathLike | None = None, *,
                  name: str | None = None) -> Any:
    """The :class:`~deepminer.explain.service.ExplainService` of ``model_path`` (+ atlas), loaded once
    per file version (one at a time; threads asking at once wait for the one load); it keeps its own
    cache, so a new sketch on the same image skips the forward pass here too."""
    from deepminer.explain.service import ExplainService

    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such model file")
    key = (str(model_path.resolve()), model_path.stat().st_mtime_ns, str(atlas) if atlas else None, name)
    with _SERVICES_LOCK:
        if key not in _SERVICES:
            _SERVICES.clear()
            _SERVICES[key] = ExplainService.load(model_path, atlas, name=name or model_path.stem, version="local")
        return _SERVICES[key]


def _with_methods(options: ExplainOptions | None, methods: Sequence[str] | None,
                  target: str | None) -> ExplainOptions:
    """``options`` with ``methods``/``target`` set (None: kept), validated like a request."""
    opts = options or ExplainOptions()
    if methods is not None:
        opts = dataclasses.replace(opts, methods=(methods,) if isinstance(methods, str) else tuple(methods))
    if target is not None:
        opts = dataclasses.replace(opts, target=target)
    return ExplainOptions.parse(opts.to_json())


class LocalClient:
    """:class:`Client`'s interface without a server: the server's own request path (the same option
    checks, sketch decoding, tissue mask and engine, :class:`~deepminer.explain.service.ExplainService`)
    on ``model_path`` in this process, answers passed through the API's encoding so that they equal
    the served ones. ``atlas``: default ``atlas/`` beside the model file when there is one; ``name``:
    the model's name in answers (default: the file's stem). The service is loaded on first use."""

    management_url: str | None = None  #: (no management API in process)

    def __init__(self, model_path: str | os.PathLike, *, name: str | None = None,
                 atlas: str | os.PathLike | None = None):
        from deepminer.model_folder import ModelFolder

        self.model_path = Path(model_path)
        self.atlas = atlas if atlas is not None else ModelFolder.of(self.model_path).atlas_or_none()
        self.name = name
        self.model = name or self.model_path.stem

    @property
    def service(self) -> Any:
        """The loaded :class:`~deepminer.explain.service.ExplainService` (:func:`local_service`)."""
        return local_service(self.model_path, self.atlas, name=self.name)

    def ping(self) -> bool:
        """True when the model file is there."""
        return self.model_path.is_file()

    def explain_raw(self, image: bytes | str | os.PathLike, options: Mapping[str, Any] | None = None, *,
                    explanations: bool = False, heavy: bool = False) -> dict:
        """The JSON body :meth:`Client.explain_raw` would return (``heavy``: no pools in one process)."""
        return self._answer(image, ExplainOptions.parse(dict(options or {}), num_units=self.service.num_units),
                            explanations).to_json()

    def explain_methods(self, image: bytes | str | os.PathLike, methods: Sequence[str] | None, *,
                        target: str | None = None, options: ExplainOptions | None = None, job: str | None = None,
                        group: str | None = None, beat: bool = True) -> Explanation:
        """As :meth:`Client.explain_methods` (``POST /explanations``). With ``job`` or ``group`` it is
        a job of :attr:`jobs` (progress, cancel: a cancelled one raises
        :class:`~deepminer.jobs.JobCancelled`); without, a plain call (in process, no client can leave it)."""
        opts = _with_methods(options, methods, target)
        if job is None and group is None:
            return self._decoded(image, opts, explanations=True)
        job_id = check_id(job) if job is not None else new_id()
        opts = dataclasses.replace(opts, job=job_id)
        return _as_job(self.jobs, job_id, group, beat, lambda: self._decoded(image, opts, explanations=True))

    @property
    def jobs(self) -> Any:
        """The job file the in-process service writes (:attr:`ExplainService.jobs`)."""
        return self.service.jobs

    def job(self, job_id: str) -> dict[str, Any] | None:
        """As :meth:`Client.job`."""
        return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """As :meth:`Client.cancel`."""
        return self.jobs.cancel(job_id)

    def cancel_group(self, group: str) -> int:
        """As :meth:`Client.cancel_group`."""
        return self.jobs.cancel_group(group)

    def explain(self, image: bytes | str | os.PathLike, options: ExplainOptions | None = None, *,
                top_units: int = DEFAULTS["top_units"], unit_maps: str = DEFAULTS["unit_maps"],
                sketch: np.ndarray | None = None, max_side: int | None = None,
                ablate: Sequence[int] | None = None, heavy: bool = False) -> Explanation:
        """As :meth:`Client.explain` (``POST /predictions``)."""
        if options is None:
            options = ExplainOptions.build(top_units=top_units, unit_maps=unit_maps, sketch=sketch, max_side=max_side,
                                           ablate=ablate, num_units=self.service.num_units)
        return self._decoded(image, options, explanations=False)

    def _answer(self, image: bytes | str | os.PathLike, options: ExplainOptions, explanations: bool) -> Explanation:
        label = "image" if isinstance(image, (bytes, bytearray, memoryview)) else str(image)
        call = self.service.explain_methods if explanations else self.service.explain
        return call(_read_image(image), options, name=label)

    def _decoded(self, image: bytes | str | os.PathLike, options: ExplainOptions, *, explanations: bool) -> Explanation:
        return Explanation.from_json(self._answer(image, options, explanations).to_json())

    def models(self, *, timeout: float = 5.0) -> list[str]:
        """This model and the other folders of its store that hold a ``model.pt`` (``model_store/<name>/``)."""
        from deepminer.model_folder import store_models

        folder = self.model_path.parent
        return sorted({self.model, *(m.name for m in store_models(folder.parent) if m.root != folder)})

    def model_ready(self, name: str | None = None) -> bool:
        """Whether model ``name`` (None: this one) has its weights file."""
        from deepminer.model_folder import ModelFolder

        if name in (None, self.model):
            return self.model_path.is_file()
        return ModelFolder(self.model_path.parent.parent / str(name)).model.is_file()

    @property
    def where(self) -> str:
        """Where the model runs, one line of Markdown for a page."""
        return f"Model: in-process ({self.model_path.parent.name}/{self.model_path.name})"

    def warm_up(self) -> None:
        """Load the model now (the first explanation then starts at once)."""
        if self.model_path.is_file():
            local_service(self.model_path, self.atlas, name=self.name)

    def close(self) -> None:
        """Nothing to close (the loaded service is shared, :func:`local_service`)."""

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(backend: str = "serve", *, model: str = DEFAULT_MODEL, url: str = DEFAULT_URL,
            model_dir: str | os.PathLike | None = None, key_file: str | os.PathLike | None = None,
            token: str | None = None, timeout: float = 60, management_url: str | None = None,
            jobs: str | os.PathLike | None = None) -> Client | LocalClient:
    """The client of ``model``: the one place that decides whether it is served or runs here.
    ``backend="serve"``: :class:`Client` of TorchServe at ``url`` (with ``key_file``/``token`` when
    token authorization is on); ``"local"``: :class:`LocalClient` of ``model_dir/model.pt`` (with
    its ``atlas/``), answering as ``model``. ``jobs``: the server's job file (None:
    ``DEEPMINER_JOBS`` when set; :meth:`Client.explain_methods`)."""
    if backend == "local":
        if model_dir is None:
            raise InputError("backend local: no model folder (model_dir) given")
        from deepminer.model_folder import ModelFolder

        return LocalClient(ModelFolder(model_dir).model, name=model)
    if backend != "serve":
        raise InputError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    return Client(url, model=model, key_file=key_file, token=token, timeout=timeout, management_url=management_url,
                  jobs=jobs or os.environ.get(ENV_JOBS) or None)


def local_explain(model_path: str | os.PathLike, image: bytes | str | os.PathLike,
                  options: ExplainOptions | None = None, *, top_units: int = DEFAULTS["top_units"],
                  unit_maps: str = DEFAULTS["unit_maps"], sketch: np.ndarray | None = None,
                  max_side: int | None = None, atlas: str | os.PathLike | None = None,
                  name: str | None = None, methods: Sequence[str] | None = None,
                  target: str | None = None, ablate: Sequence[int] | None = None) -> Explanation:
    """The same :class:`~deepminer.explanation.Explanation` as :meth:`Client.explain`, computed in
    this process (:class:`LocalClient`). ``atlas`` defaults to an ``atlas/`` folder beside the model
    file when there is one.

    ``methods`` (or ``target``, or options carrying them): the answer of :meth:`Client.explain_methods`
    (``POST /explanations``) instead, saliency maps included. ``ablate``: as :meth:`Client.explain`."""
    client = LocalClient(model_path, name=name, atlas=atlas)
    if options is None:
        options = ExplainOptions.build(top_units=top_units, unit_maps=unit_maps, sketch=sketch, max_side=max_side,
                                       ablate=ablate, num_units=client.service.num_units)
    if methods is not None or target is not None or options.methods or options.target is not None:
        return client.explain_methods(image, methods, target=target, options=options)
    return client.explain(image, options)
