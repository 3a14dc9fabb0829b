"""The lab profile's front door: nginx (Debian's) as an authenticating TLS reverse proxy in front of
the workbench (Streamlit) and the inference API (TorchServe), both of which stay on 127.0.0.1.

* TLS always: the lab's own certificate (``DEEPMINER_TLS_CERT`` / ``DEEPMINER_TLS_KEY``, PEM), else a
  self-signed one made with the ``openssl`` command on first run (``var/proxy/tls/``);
* every request authenticated by the sign-in service (:mod:`serve.auth`, nginx's ``auth_request``):
  the password (bcrypt hashes in ``var/proxy/users``, managed by ``deepminer users``; re-read when it
  changes, no restart) is checked once, then a signed session cookie; failed sign-ins are throttled
  (429 + ``Retry-After``); ``/signin`` and ``/signout`` are its pages;
* the proxy sets :data:`USER_HEADER` to the signed-in user itself (a client-sent header of that name
  is replaced), and the workbench takes the annotator from it;
* ``/`` -> the workbench (WebSockets forwarded), ``/api/`` -> TorchServe's inference port (the proxy
  adds TorchServe's bearer key, kept current from ``key_file.json``); management, metrics and gRPC
  are not proxied; ``/api/jobs`` -> the sign-in service's long-jobs API (:func:`serve.auth.jobs_api`:
  a remote client's progress, heartbeat and cancel in the host's job file);
* one upload limit (:data:`serve.launch.UPLOAD_LIMIT_MB`, the same in Streamlit and TorchServe) with
  one message, and a per-client request rate limit.

nginx runs unprivileged in the foreground from a config generated under ``var/proxy/`` (temp paths,
pid file and logs there too), never as the system service. ``python -m serve.proxy run`` is the
``proxy`` process of the Procfile (lab profile only, see ``scripts/run.sh``); tests use :class:`Nginx`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepminer.atomic import atomic_file
from deepminer.client import HEAVY_SUFFIX
from serve.auth import JOBS_PATH
from serve.launch import UPLOAD_LIMIT_MB, USER_HEADER, upload_limit_message

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "var" / "proxy"
DEFAULT_PORT = 8443
#: per client address: sustained requests per second and the burst allowed on top (a workbench page
#: load is ~40 requests for scripts and fonts; an explain is one)
RATE_PER_S = 20
BURST = 200
#: longer than TorchServe's default_response_timeout (120 s) so the proxy never cuts a slow explain
READ_TIMEOUT_S = 180
#: the group nginx workers run with when it is started as root (Debian's nobody/nogroup)
WORKER_GROUP = "nogroup"


def users_file_default() -> Path:
    env = os.environ.get("DEEPMINER_USERS_FILE")
    return Path(env) if env else WORK / "users"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if not found:
        raise RuntimeError("nginx is missing: run `bash scripts/setup.sh` as root (Debian package nginx)")
    return found


def ensure_certificate(cert: Path, key: Path, hostname: str | None = None) -> bool:
    """A self-signed certificate (RSA 2048, 825 days, names: ``hostname``, localhost, 127.0.0.1) made
    with the ``openssl`` command unless ``cert`` and ``key`` exist; True when one was made now."""
    if cert.is_file() and key.is_file():
        return False
    host = hostname or socket.getfqdn() or "localhost"
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    names = ",".join(dict.fromkeys([f"DNS:{host}", "DNS:localhost", "IP:127.0.0.1"]))
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "825",
           "-subj", f"/CN={host}/O=DeepMiner Studio (self-signed)", "-addext", f"subjectAltName={names}",
           "-keyout", str(key), "-out", str(cert)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl could not make a certificate: {r.stderr.strip().splitlines()[-1:]}")
    os.chmod(key, 0o600)
    return True


@dataclass
class ProxyConfig:
    """Everything the generated nginx config depends on."""

    ui_port: int
    inference_port: int
    port: int = DEFAULT_PORT
    host: str = "0.0.0.0"
    work: Path = WORK
    users_file: Path = field(default_factory=users_file_default)
    cert: Path | None = None
    key: Path | None = None
    key_file: Path | None = None  #: TorchServe's key_file.json (lab profile), for /api/
    upload_mb: int = UPLOAD_LIMIT_MB
    rate_per_s: int = RATE_PER_S
    burst: int = BURST
    heavy_pool: bool = True  #: /api/explanations/<model> goes to the model's heavy pool (deepminer.client.heavy_pool)
    auth_port: int = 0  #: the sign-in service (serve/auth.py) on 127.0.0.1; 0: a free one when started
    jobs: Path | None = None  #: the host's job file (DEEPMINER_JOBS) for /api/jobs; None: the API says it has none

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self.users_file = Path(self.users_file).resolve()
        self.cert = Path(self.cert).resolve() if self.cert else self.work / "tls" / "cert.pem"
        self.key = Path(self.key).resolve() if self.key else self.work / "tls" / "key.pem"

    @property
    def conf_path(self) -> Path:
        return self.work / "nginx.conf"

    @property
    def token_include(self) -> Path:
        return self.work / "torchserve-auth.conf"

    @property
    def secret_file(self) -> Path:
        """The session cookies' signing secret (serve/auth.py; delete it to end every session)."""
        return self.work / "session.key"

    @property
    def logs(self) -> Path:
        return self.work / "logs"


def _q(text: str) -> str:
    """An nginx single-quoted string."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render(cfg: ProxyConfig) -> str:
    """The nginx config (one ``http`` server, TLS, basic auth, the two upstreams)."""
    w = cfg.work
    too_large = json.dumps({"code": 413, "type": "RequestTooLarge", "message": upload_limit_message(cfg.upload_mb)})
    too_many = json.dumps({"code": 429, "type": "TooManyRequests",
                           "message": "Too many requests from this address: wait a moment and try again."})
    # every location sets all its headers (nginx inherits proxy_set_header only into locations that
    # set none); the signed-in user is set here: a client-sent header of this name never passes
    headers = "".join(f"            proxy_set_header {k} {v};\n" for k, v in (
        (USER_HEADER, "$auth_user"), ("Host", "$http_host"), ("X-Forwarded-For", "$remote_addr"),
        ("X-Forwarded-Proto", "https")))
    unauthorized = json.dumps({"code": 401, "type": "Unauthorized",
                               "message": "Sign in: a session cookie, or the name and password (HTTP basic)."})
    throttled = json.dumps({"code": 429, "type": "TooManyRequests",
                            "message": "Too many failed sign-ins from this address or for this name: wait and try again."})
    # add_header in a location drops the server's: every location that adds one says them all
    security = ('add_header Strict-Transport-Security "max-age=31536000" always; '
                'add_header X-Content-Type-Options nosniff always;')
    # the sign-in service (serve/auth.py) says who sent a request: a session cookie, or basic credentials
    # (checked once, then cached); it answers 401 (nobody) or 403 + Retry-After (throttled)
    signed_in = (f"auth_request /_auth; auth_request_set $auth_user $upstream_http_x_auth_user;\n"
                 f"            auth_request_set $auth_cookie $upstream_http_set_cookie; "
                 f"auth_request_set $auth_retry $upstream_http_retry_after;\n"
                 f"            add_header Set-Cookie $auth_cookie; {security}\n"
                 f"            error_page 403 = @throttled; error_page 413 @too_large; error_page 429 @too_many;")
    heavy = "" if not cfg.heavy_pool else (
        "        # peer saliency in the heavy pool's own worker: /predictions never waits behind it\n"
        "        location /api/explanations/ {\n"
        f"            {signed_in}\n            error_page 401 = @unauthorized;\n"
        f"            include {cfg.token_include};\n{headers}"
        f"            proxy_pass http://127.0.0.1:{cfg.inference_port}$heavy_uri$is_args$args;\n        }}\n")
    to_auth = (f"proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Original-URI $request_uri; "
               f"proxy_set_header Host $http_host; proxy_pass http://127.0.0.1:{cfg.auth_port}")
    # started as root (a container), nginx's workers would run as nobody anyway: say so; otherwise
    # everything runs as the account that started it
    user = f"user nobody {WORKER_GROUP};\n" if os.geteuid() == 0 else ""
    return f"""# generated by serve/proxy.py - edit that file (or its environment variables), not this one
{user}worker_processes 1;
pid {w}/nginx.pid;
error_log {cfg.logs}/error.log warn;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    server_tokens off;
    log_format signed_in '$remote_addr - $auth_user [$time_local] "$request" $status $body_bytes_sent '
                         '"$http_referer" "$http_user_agent"';
    access_log {cfg.logs}/access.log signed_in;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;

    # one upload limit for the proxy, Streamlit and TorchServe (serve.launch.UPLOAD_LIMIT_MB)
    client_max_body_size {cfg.upload_mb}m;
    limit_req_zone $binary_remote_addr zone=per_client:10m rate={cfg.rate_per_s}r/s;
    limit_req_status 429;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    # /api/explanations/<model> -> TorchServe's /explanations/<model>{HEAVY_SUFFIX}: the heavy pool
    map $uri $heavy_uri {{ "~^/api/explanations/(?<pool_model>[^/]+?)(?:{HEAVY_SUFFIX})?$" /explanations/$pool_model{HEAVY_SUFFIX}; default ""; }}

    server {{
        listen {cfg.host}:{cfg.port} ssl;
        ssl_certificate {cfg.cert};
        ssl_certificate_key {cfg.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:tls:1m;
        add_header Strict-Transport-Security "max-age=31536000" always;
        add_header X-Content-Type-Options nosniff always;

        set $auth_user "";
        limit_req zone=per_client burst={cfg.burst} nodelay;

        error_page 413 @too_large;
        error_page 429 @too_many;
        location @too_large {{ default_type application/json; return 413 {_q(too_large)}; }}
        location @too_many {{ default_type application/json; return 429 {_q(too_many)}; }}

        proxy_http_version 1.1;
        proxy_read_timeout {READ_TIMEOUT_S}s;
        proxy_send_timeout {READ_TIMEOUT_S}s;
        proxy_request_buffering on;

        # the sign-in service: the check nginx makes for every request, the sign-in form and sign-out
        location = /_auth {{
            internal;
            proxy_pass_request_body off; proxy_set_header Content-Length "";
            {to_auth}/check;
        }}
        location = /signin {{ {to_auth}/signin; }}
        location = /signout {{ {to_auth}/signout; }}
        location @signin_form {{
            {security}
            if ($request_method != GET) {{ return 401 {_q(unauthorized)}; }}
            {to_auth};
        }}
        location @unauthorized {{
            {security} add_header WWW-Authenticate 'Basic realm="DeepMiner Studio"' always;
            default_type application/json; return 401 {_q(unauthorized)};
        }}
        location @throttled {{
            {security} add_header Retry-After $auth_retry always;
            default_type application/json; return 429 {_q(throttled)};
        }}

        # long jobs of remote clients (create, progress, heartbeat, cancel): the sign-in service's
        # jobs API on the host's job file; it checks the session or credentials again itself
        location {JOBS_PATH} {{
            {signed_in}
            error_page 401 = @unauthorized;
{headers}            proxy_set_header X-Real-IP $remote_addr;
            proxy_pass http://127.0.0.1:{cfg.auth_port};
        }}
        # the inference API (TorchServe's inference port only; management and metrics stay unproxied)
        location /api/ {{
            {signed_in}
            error_page 401 = @unauthorized;
            include {cfg.token_include};
{headers}            proxy_pass http://127.0.0.1:{cfg.inference_port}/;
        }}
{heavy}        # the workbench, WebSockets included (/_stcore/stream); without a session: the sign-in form
        location / {{
            {signed_in}
            error_page 401 = @signin_form;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
{headers}            proxy_buffering off;
            proxy_pass http://127.0.0.1:{cfg.ui_port};
        }}
    }}
}}
"""


def write_token_include(cfg: ProxyConfig) -> str:
    """The ``Authorization`` header /api/ sends to TorchServe (its current inference key, or the
    client's own header when TorchServe has no token authorization); returns the key."""
    from deepminer.client import bearer, read_key_file

    key = read_key_file(cfg.key_file) or ""
    line = f'proxy_set_header Authorization "{bearer(key).get("Authorization", "")}";\n'
    with atomic_file(cfg.token_include, "w", perms=0o600) as fh:
        fh.write("# generated by serve/proxy.py: TorchServe's inference key\n" + line)
    return key


def prepare(cfg: ProxyConfig) -> Path:
    """Folders, certificate (made if missing), the token include and the config; the config path."""
    for d in (cfg.work, cfg.logs, cfg.work / "tmp"):
        d.mkdir(parents=True, exist_ok=True)
    assert cfg.cert is not None and cfg.key is not None
    if not cfg.users_file.is_file():
        raise RuntimeError(f"no users yet ({cfg.users_file}): add one with `deepminer users add NAME`")
    ensure_certificate(cfg.cert, cfg.key)
    if os.geteuid() == 0:  # started as root: the workers run as nobody and read the users file per request
        import grp

        gid = grp.getgrnam(WORKER_GROUP).gr_gid
        os.chown(cfg.users_file, -1, gid)
        os.chmod(cfg.users_file, 0o640)
        for folder in (*cfg.users_file.parents, *cfg.work.parents):
            if not folder.stat().st_mode & 0o001:
                raise RuntimeError(f"nginx's workers (user nobody) cannot reach {cfg.users_file} or {cfg.work}: "
                                   f"{folder} is not searchable by others (chmod o+x it, or start as an "
                                   "ordinary account)")
    write_token_include(cfg)
    cfg.conf_path.write_text(render(cfg), encoding="utf-8")
    r = subprocess.run([nginx_binary(), "-t", "-q", *_nginx_args(cfg)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nginx refuses the generated config: {r.stderr.strip()}")
    return cfg.conf_path


def _nginx_args(cfg: ProxyConfig) -> list[str]:
    """The generated config, its prefix, the start-up error log under it (not /var/log/nginx, which an
    ordinary account cannot open), in the foreground."""
    return ["-c", str(cfg.conf_path), "-p", str(cfg.work), "-e", str(cfg.logs / "error.log"), "-g", "daemon off;"]


class Nginx:
    """nginx in the foreground (its own process group) from :func:`prepare`'s config."""

    def __init__(self, cfg: ProxyConfig):
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.auth: Any = None  #: the sign-in service (serve.auth.AuthServer) while started

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        return f"https://{host}:{self.cfg.port}"

    def start(self, timeout: float = 20.0, *, foreground_io: bool = False) -> "Nginx":
        from serve.auth import AuthServer

        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        self.auth = AuthServer(self.cfg.users_file, self.cfg.secret_file, port=self.cfg.auth_port,
                               log_file=self.cfg.logs / "auth.log", jobs=self.cfg.jobs).start()
        self.cfg.auth_port = self.auth.port
        prepare(self.cfg)
        out = None if foreground_io else subprocess.DEVNULL
        self.proc = subprocess.Popen([nginx_binary(), *_nginx_args(self.cfg)], stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        host = self.url.split("//")[1].rsplit(":", 1)[0]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.cfg.logs / "error.log")
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: "
                                   f"{err.read_text(errors='replace')[-800:] if err.is_file() else ''}")
            try:
                with socket.create_connection((host, self.cfg.port), timeout=1) as s, \
                        ctx.wrap_socket(s, server_hostname=host):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"nginx did not listen on port {self.cfg.port} within {timeout:.0f} s")

    def refresh_token(self) -> bool:
        """Rewrite the TorchServe key include when the key changed, and reload nginx; True if it did."""
        before = self.cfg.token_include.read_text(encoding="utf-8") if self.cfg.token_include.is_file() else ""
        write_token_include(self.cfg)
        if self.cfg.token_include.read_text(encoding="utf-8") != before and self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)
            return True
        return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def config_from_env(env: dict[str, str] | None = None) -> ProxyConfig:
    """The proxy of ``make run`` (lab profile) from its environment variables (docs/serving.md)."""
    env = dict(os.environ if env is None else env)
    serve_url = env.get("DEEPMINER_SERVE_URL", "http://127.0.0.1:8080")
    key_file = env.get("DEEPMINER_KEY_FILE") or ""
    return ProxyConfig(
        ui_port=int(env.get("DEEPMINER_UI_PORT", "8501")),
        inference_port=int(serve_url.rstrip("/").rsplit(":", 1)[1]),
        port=int(env.get("DEEPMINER_PROXY_PORT", str(DEFAULT_PORT))),
        host=env.get("DEEPMINER_PROXY_HOST", "0.0.0.0"),
        users_file=Path(env["DEEPMINER_USERS_FILE"]) if env.get("DEEPMINER_USERS_FILE") else WORK / "users",
        cert=Path(env["DEEPMINER_TLS_CERT"]) if env.get("DEEPMINER_TLS_CERT") else None,
        key=Path(env["DEEPMINER_TLS_KEY"]) if env.get("DEEPMINER_TLS_KEY") else None,
        key_file=Path(key_file) if key_file else None,
        upload_mb=int(env.get("DEEPMINER_UPLOAD_MB", str(UPLOAD_LIMIT_MB))),
        auth_port=int(env.get("DEEPMINER_AUTH_PORT", "0")),
        heavy_pool=env.get("DEEPMINER_HEAVY_POOL", "1") != "0",
        # the workers' job file (scripts/serve.sh's default), for remote clients' long jobs
        jobs=Path(env.get("DEEPMINER_JOBS") or ROOT / "var" / "jobs.sqlite"),
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m serve.proxy", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("run", "config"),
                    help="run: nginx in the foreground, TorchServe's key kept current; config: print the config")
    ap.add_argument("--check-every", type=float, default=30.0, help="seconds between TorchServe key checks")
    args = ap.parse_args(argv)
    if (bad := [v for v in ("DEEPMINER_TLS_CERT", "DEEPMINER_TLS_KEY") if bool(os.environ.get(v))]) and len(bad) == 1:
        print("proxy: error: set both DEEPMINER_TLS_CERT and DEEPMINER_TLS_KEY (or neither)", file=sys.stderr)
        return 2
    try:
        cfg = config_from_env()
    except (ValueError, IndexError) as err:
        print(f"proxy: error: bad port setting ({err})", file=sys.stderr)
        return 2
    if args.action == "config":
        print(render(cfg), end="")
        return 0
    nginx = Nginx(cfg)
    try:
        nginx.start(foreground_io=True)
    except (RuntimeError, TimeoutError, OSError) as err:
        print(f"proxy: error: {err}", file=sys.stderr)
        return 1
    print(f"proxy: https on {cfg.host}:{cfg.port} (users: {cfg.users_file}; certificate: {cfg.cert}; "
          f"sign-in service on 127.0.0.1:{cfg.auth_port}, log {cfg.logs / 'auth.log'}; jobs: {cfg.jobs})", flush=True)
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from deepminer.client import Client, read_key_file

    client = None
    if cfg.key_file is not None:
        serve_url = os.environ.get("DEEPMINER_SERVE_URL", "http://127.0.0.1:8080")
        client = Client(serve_url, key_file=cfg.key_file, timeout=5,
                        management_url=os.environ.get("DEEPMINER_MANAGEMENT_URL") or None)
    next_check = 0.0
    try:
        while not stop["now"] and nginx.proc is not None and nginx.proc.poll() is None:
            if client is not None and time.monotonic() >= next_check:
                client.ping()  # renews an expired key (Client._request), then the include follows it
                nginx.refresh_token()
                # until TorchServe has written its key file (it starts beside us), look again soon
                soon = not read_key_file(cfg.key_file)
                next_check = time.monotonic() + (2.0 if soon else args.check_every)
            time.sleep(0.5)
    finally:
        code = nginx.proc.returncode if nginx.proc is not None else 0
        nginx.stop()
    return 0 if stop["now"] else (code or 1)


if __name__ == "__main__":
    raise SystemExit(main())
