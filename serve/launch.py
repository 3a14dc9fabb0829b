"""Start and stop a real TorchServe from a config profile, on chosen (or free loopback) ports.

Used by the tests and by ``deepminer bench --serve``; ``make run`` uses ``scripts/serve.sh`` (same
profiles). Each instance gets its own work folder: TorchServe writes ``key_file.json`` to its working
directory, logs under ``logs/``, and its pid file and worker sockets under ``$TMPDIR``, so several
instances never collide. :meth:`TorchServe.stop` always ends the whole process group (launcher, the
Java frontend and its Python workers).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Mapping

import requests

# the header the sign-in proxy sets to the signed-in user (deepminer.jobs: the handler checks a named
# job's owner against it); the workbench takes the annotator from it (``DEEPMINER_USER_HEADER``, from
# :func:`profile_env`)
from deepminer.jobs import USER_HEADER

SERVE_DIR = Path(__file__).resolve().parent
PROFILES = {"demo": SERVE_DIR / "config.properties", "lab": SERVE_DIR / "config.lab.properties"}
PORT_KEYS = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
#: THE upload limit, in MiB: written into TorchServe's ``max_request_size`` (the profiles hold the same
#: number, checked by tests/test_lab_security.py; :class:`TorchServe` writes it), Streamlit's
#: ``server.maxUploadSize`` (``DEEPMINER_UPLOAD_MB`` from ``profile_env``, used by the Procfile) and the
#: lab proxy's ``client_max_body_size`` (serve/proxy.py). ``DEEPMINER_UPLOAD_MB`` overrides it.
UPLOAD_LIMIT_MB = 64


def upload_limit_mb(env: Mapping[str, str] | None = None) -> int:
    """The upload limit in MiB: ``DEEPMINER_UPLOAD_MB`` when set (a positive integer), else
    :data:`UPLOAD_LIMIT_MB`."""
    value = (os.environ if env is None else env).get("DEEPMINER_UPLOAD_MB", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else UPLOAD_LIMIT_MB


def upload_limit_message(mb: int) -> str:
    """The one message whichever layer refuses an upload over the limit."""
    return (f"The upload is larger than the {mb} MB limit of this deployment: send a smaller image "
            "(or ask the administrator to raise DEEPMINER_UPLOAD_MB).")


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blank lines skipped)."""
    props: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_properties(path: str | os.PathLike, props: Mapping[str, str], header: str = "") -> Path:
    path = Path(path)
    lines = [f"# {header}"] if header else []
    lines += [f"{k}={v}" for k, v in props.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def with_heavy_pools(models: Mapping[str, str]) -> dict[str, str]:
    """``models`` (name -> archive) plus each archive registered again as the model's heavy pool
    (:func:`deepminer.client.heavy_pool`: its own worker for ``/explanations`` and set evaluations),
    as ``scripts/serve.sh`` does."""
    from deepminer.client import heavy_pool

    return {**models, **{heavy_pool(name): mar for name, mar in models.items()}}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TorchServe:
    """One TorchServe started from a profile with its ports rewritten (free loopback ports unless
    ``ports`` is given). ``python`` is the interpreter that runs TorchServe and therefore its workers:
    pass another venv's python to serve from a host without this project installed.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, model_store: str | os.PathLike, models: Mapping[str, str], workdir: str | os.PathLike,
                 *, profile: str | os.PathLike = "demo", python: str = sys.executable,
                 ports: Mapping[str, int] | None = None, overrides: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, host: str = "127.0.0.1"):
        self.model_store = Path(model_store).resolve()
        self.models = dict(models)
        self.workdir = Path(workdir).resolve()
        self.profile = Path(PROFILES.get(str(profile), profile))
        self.python = python
        self.ports = dict(ports) if ports else {k: free_port(host) for k in PORT_KEYS}
        self.overrides = dict(overrides or {})
        self.env = dict(env) if env is not None else None
        self.host = host
        self.proc: subprocess.Popen | None = None
        self.config_path = self.workdir / "config.properties"
        self.log_path = self.workdir / "torchserve.log"
        self.started_s: float | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}"

    @property
    def key_file(self) -> Path:
        """Where TorchServe writes its keys when token authorization is on."""
        return self.workdir / "key_file.json"

    @property
    def jobs_path(self) -> Path:
        """The job file its workers write progress to and read cancels from (:mod:`deepminer.jobs`):
        give it to a client (``Client(..., jobs=ts.jobs_path)``) on this host."""
        return self.workdir / "jobs.sqlite"

    @property
    def token_auth(self) -> bool:
        props = {**read_properties(self.profile), **self.overrides}
        return props.get("disable_token_authorization", "false").lower() != "true"

    def _headers(self, kind: str) -> dict[str, str]:
        """The ``Authorization`` header of ``kind`` calls (none while the key file is being written)."""
        from deepminer.client import bearer, read_key_file

        return bearer(read_key_file(self.key_file, kind)) if self.token_auth else {}

    # -- life cycle --------------------------------------------------------------------------
    def write_config(self) -> Path:
        """The profile with this instance's addresses and overrides."""
        props = read_properties(self.profile)
        props.update({
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_address": self.host,
            "grpc_management_address": self.host,
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(self.model_store),
        })
        props.pop("load_models", None)
        props["max_request_size"] = str(upload_limit_mb() * 1024 * 1024)
        props.update(self.overrides)
        return write_properties(self.config_path, props, header=f"generated from {self.profile.name}")

    def start(self, timeout: float = 180.0) -> "TorchServe":
        """Start TorchServe and wait until every model has its workers ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        self.write_config()
        env = dict(os.environ if self.env is None else self.env)
        env.update({"TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(self.workdir / "logs"),
                    "METRICS_LOCATION": str(self.workdir / "logs")})
        env.pop("TS_CONFIG_FILE", None)
        env["DEEPMINER_JOBS"] = str(self.jobs_path)  # the workers' job file (deepminer.jobs): progress, cancel
        # the workers share the cores: torch threads per worker = cores / models (as scripts/serve.sh)
        from deepminer.client import HEAVY_SUFFIX

        light = [m for m in self.models if not m.endswith(HEAVY_SUFFIX)]  # a pool shares its model's threads
        env.setdefault("OMP_NUM_THREADS", str(worker_threads(len(light) or 1)))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning between parallel regions (docs/serving.md)
        cmd = [self.python, "-m", "ts.model_server", "--foreground", "--ts-config", str(self.config_path),
               "--model-store", str(self.model_store), "--ncs"]
        if self.models:
            cmd += ["--models", *[f"{name}={mar}" for name, mar in self.models.items()]]
        t0 = time.perf_counter()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.perf_counter() - t0
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll until ``/ping`` is healthy and every model reports its minimum workers READY."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._worker_deaths() >= 3:
                raise RuntimeError(f"TorchServe workers keep dying while loading:\n{self.log_tail()}")
            try:
                ping = requests.get(f"{self.inference_url}/ping", headers=self._headers("inference"), timeout=2)
                if ping.status_code == 200 and all(self._model_ready(m) for m in self.models):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _worker_deaths(self) -> int:
        log = self.workdir / "logs" / "model_log.log"
        return log.read_text(errors="replace").count("Backend worker process died") if log.is_file() else 0

    def _model_ready(self, name: str) -> bool:
        from deepminer.client import model_ready

        return model_ready(self.management_url, name, self._headers("management"))

    def describe(self, name: str) -> dict:
        """The management API's description of model ``name`` (workers with pid, batch size...;
        :func:`deepminer.client.describe_model`)."""
        from deepminer.client import describe_model

        return describe_model(self.management_url, name, self._headers("management"))

    def worker_pids(self, name: str) -> list[int]:
        return [int(w["pid"]) for w in self.describe(name).get("workers", []) if w.get("pid")]

    def log_tail(self, n: int = 40) -> str:
        logs = [self.log_path, self.workdir / "logs" / "model_log.log", self.workdir / "logs" / "ts_log.log"]
        out = []
        for p in logs:
            if p.is_file():
                out.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def stop(self, timeout: float = 20.0) -> None:
        """End the process group (SIGTERM, then SIGKILL after ``timeout``); safe to call twice."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the launcher's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while time.monotonic() < end and _group_alive(pgid):
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def worker_threads(models: int, cores: int | None = None) -> int:
    """Torch intra-op threads per worker when ``models`` models (one worker each) share ``cores``
    cores (default: this machine's): ``cores // models``, at least 1, so that the workers busy at
    once do not oversubscribe the cores."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, cores // max(1, models))


def served_models(management_url: str, headers: Mapping[str, str] | None = None) -> list[str]:
    """The names of the models TorchServe hosts (:func:`deepminer.client.list_models`); [] when it
    does not answer with the list."""
    from deepminer.client import ServeError, ServeUnavailable, list_models

    try:
        return list_models(management_url, headers)
    except (ServeError, ServeUnavailable):
        return []


def _group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` is alive (zombies excluded)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with torchserve
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.info["pid"]) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


# -- `python -m serve.launch env|wait` (used by scripts/run.sh) ------------------------------------

def profile_env(profile: str, ui_port: int, root: Path = SERVE_DIR.parent) -> dict[str, str]:
    """What the UI and CLI need to reach the server started from ``profile`` (scripts/serve.sh)."""
    props = read_properties(PROFILES.get(profile, profile))
    env = {"DEEPMINER_SERVE_URL": props["inference_address"], "DEEPMINER_METRICS_URL": props["metrics_address"],
           "DEEPMINER_MANAGEMENT_URL": props["management_address"], "DEEPMINER_KEY_FILE": "",
           "DEEPMINER_UPLOAD_MB": str(upload_limit_mb()),
           # TorchServe's max_request_size from the same number (read where enable_envvars_config=true: lab)
           "TS_MAX_REQUEST_SIZE": str(upload_limit_mb() * 1024 * 1024),
           # the long jobs' file, shared by the workers (scripts/serve.sh) and the workbench (deepminer.jobs)
           "DEEPMINER_JOBS": os.environ.get("DEEPMINER_JOBS") or str(root / "var" / "jobs.sqlite")}
    if props.get("disable_token_authorization", "false").lower() != "true":
        env["DEEPMINER_KEY_FILE"] = str(root / "var" / "serve" / "key_file.json")
    # the sign-in proxy (lab profile, serve/proxy.py) sets this header; the workbench reads it
    env["DEEPMINER_USER_HEADER"] = USER_HEADER if profile == "lab" else ""
    return env


def profile_ports(profile: str, ui_port: int) -> list[int]:
    props = read_properties(PROFILES.get(profile, profile))
    ports = [int(props[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address", "metrics_address")]
    ports += [int(props.get("grpc_inference_port", 7070)), int(props.get("grpc_management_port", 7071)), ui_port]
    if profile == "lab":  # the sign-in proxy's port (serve/proxy.py)
        ports.append(int(os.environ.get("DEEPMINER_PROXY_PORT") or 8443))
    return ports


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shlex

    ap = argparse.ArgumentParser(prog="python -m serve.launch", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("env", "wait"))
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--ui-port", type=int, default=8501)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--pid", type=int, default=None, help="give up when this process ends")
    args = ap.parse_args(argv)
    env = profile_env(args.profile, args.ui_port)
    if args.action == "env":
        busy = [p for p in profile_ports(args.profile, args.ui_port) if _port_busy(p)]
        if busy:
            print(f"run: error: port(s) {', '.join(map(str, busy))} already in use on 127.0.0.1 "
                  "(another TorchServe or Streamlit running? stop it first)", file=sys.stderr)
            return 1
        for k, v in env.items():
            print(f"export {k}={shlex.quote(v)}" if v else f"unset {k}")
        return 0
    from deepminer.client import Client

    client = Client(env["DEEPMINER_SERVE_URL"], model=os.environ.get("DEEPMINER_MODEL") or "demo",
                    key_file=env["DEEPMINER_KEY_FILE"] or None, timeout=5,
                    management_url=env["DEEPMINER_MANAGEMENT_URL"])

    def ready() -> bool:  # the default model and every other model of the store
        if not (client.ping() and client.model_ready()):
            return False
        names = served_models(client.management_url, client.headers("management"))
        return all(client.model_ready(n) for n in names)

    ui = f"http://127.0.0.1:{args.ui_port}/_stcore/health"
    deadline = time.monotonic() + args.timeout
    serve_ok = ui_ok = False
    while time.monotonic() < deadline:
        if args.pid is not None:
            try:
                os.kill(args.pid, 0)
            except ProcessLookupError:
                return 1
        serve_ok = serve_ok or ready()
        if not ui_ok:
            try:
                ui_ok = requests.get(ui, timeout=2).status_code == 200
            except requests.RequestException:
                pass
        if serve_ok and ui_ok:
            return 0
        time.sleep(0.5)
    print(f"run: error: not ready after {args.timeout:.0f} s (TorchServe {'up' if serve_ok else 'down'}, "
          f"UI {'up' if ui_ok else 'down'})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
