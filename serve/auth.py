"""The lab proxy's sign-in service: nginx asks it, through ``auth_request``, who sent each request.

* **Sign in once.** The password is checked (bcrypt) once, at ``/signin`` (a form) or on the first
  request with HTTP basic credentials (scripts: ``curl -u``, ``requests`` with ``auth=``); the answer
  carries a session cookie (:data:`COOKIE`: signed and time-stamped with ``itsdangerous``, HttpOnly,
  Secure, SameSite=Lax) that later requests present instead: verifying it is an HMAC, not a bcrypt
  check. Basic credentials sent again and again (a client without a cookie jar) are verified once and
  then found in a memory cache keyed by an HMAC of the password under this process's secret (as
  Caddy's ``basic_auth`` caches its hash checks) for :data:`BASIC_CACHE_S`.
* **Sign-out and expiry.** ``/signout`` drops the cookie and revokes its session on the server; a
  session lasts ``DEEPMINER_SESSION_HOURS`` (12); a password change or a removed user ends that
  user's sessions at once (the cookie names a fingerprint of the user's hash line).
* **Throttling.** Failed sign-ins are counted per client address, per (name, address) and per name
  (:class:`Throttle`, :data:`RULES`): after a few failures each further one locks that key for a
  growing time (1 s, 2 s, 4 s ... up to 15 min); a locked client is answered 429 with ``Retry-After``
  and its password is not even checked. The per-name rule skips addresses that signed in as that
  name before, so an attacker's failures never lock the owner of the name out of a known client, and
  the (name, address) rule only locks the attacker's own address. Every failure and lock is logged
  with name and address (``var/proxy/logs/auth.log``), never the password.

* **Long jobs for remote clients.** ``/api/jobs`` (:func:`jobs_api`): a client on another machine
  creates, reads, heartbeats and cancels its long jobs (:mod:`deepminer.jobs`) here, in the host's
  job file that TorchServe's workers read; each row records its creator (the ``owner`` column), and
  only that signed-in user may see or touch it. These routes check the session or basic credentials
  themselves (they do not trust a header).

The service listens on 127.0.0.1 only (a free port, handed to nginx's generated config) and runs in a
thread of ``python -m serve.proxy run`` (or of the tests' :class:`serve.proxy.Nginx`). Its secret
(``var/proxy/session.key``, 0600, made once with :func:`secrets.token_bytes`) keeps sessions valid
across restarts; delete it to end every session.
"""
from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import math
import os
import secrets
import threading
import time
import urllib.parse
from base64 import b64decode
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from deepminer.errors import InputError
from deepminer.jobs import FINISHED, JobStore, check_id, new_id

COOKIE = "deepminer_session"
#: how long a session lasts unless ``DEEPMINER_SESSION_HOURS`` says otherwise
SESSION_HOURS = 12.0
#: how long a verified basic credential is kept in memory (the hash line must not change meanwhile)
BASIC_CACHE_S = 300.0
#: where a sign-in form posts and where sign-out is (nginx routes both to this service)
SIGNIN_PATH, SIGNOUT_PATH = "/signin", "/signout"
#: the long jobs' API (nginx routes ``/api/jobs...`` here: :func:`jobs_api`)
JOBS_PATH = "/api/jobs"
log = logging.getLogger("deepminer.auth")


@dataclass(frozen=True)
class Rule:
    """Failures of one kind of key: ``free`` failures in a row cost nothing; each further one locks
    the key for ``base_s * 2**(failures - free - 1)`` seconds (at most ``max_s``); a key with no
    failure for ``forget_s`` starts again at zero."""

    kind: str  #: "addr", "name+addr" or "name"
    free: int
    base_s: float = 1.0
    max_s: float = 900.0
    forget_s: float = 900.0


#: the default rules: 5 free failures per (name, address), 10 per address, 20 per name (the name rule
#: skips addresses that signed in as that name before)
RULES = (Rule("name+addr", 5), Rule("addr", 10), Rule("name", 20))


@dataclass
class _Count:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class Throttle:
    """Counts failed sign-ins per key and says how long a client must wait (thread-safe)."""

    def __init__(self, rules: tuple[Rule, ...] = RULES, clock=time.monotonic):
        self.rules = rules
        self.clock = clock
        self._counts: dict[tuple[str, ...], _Count] = {}
        self._known: dict[str, set[str]] = {}  #: name -> addresses that signed in as it
        self._lock = threading.Lock()

    def _keys(self, name: str, addr: str) -> list[tuple[Rule, tuple[str, ...]]]:
        out: list[tuple[Rule, tuple[str, ...]]] = []
        for rule in self.rules:
            if rule.kind == "addr":
                out.append((rule, ("addr", addr)))
            elif rule.kind == "name+addr":
                out.append((rule, ("name+addr", name, addr)))
            elif addr not in self._known.get(name, ()):  # "name": not for a client known to the name
                out.append((rule, ("name", name)))
        return out

    def wait_s(self, name: str, addr: str) -> float:
        """Seconds before this client may try this name again (0: now)."""
        now = self.clock()
        with self._lock:
            return max([c.locked_until - now for rule, k in self._keys(name, addr)
                        if (c := self._counts.get(k)) is not None] + [0.0])

    def failed(self, name: str, addr: str) -> float:
        """Count a failure; the wait it imposes from now on (0: none yet)."""
        now = self.clock()
        with self._lock:
            for rule, key in self._keys(name, addr):
                c = self._counts.setdefault(key, _Count())
                if now - c.last > rule.forget_s:
                    c.failures = 0
                c.failures += 1
                c.last = now
                if c.failures > rule.free:
                    c.locked_until = now + min(rule.max_s, rule.base_s * 2 ** (c.failures - rule.free - 1))
        return self.wait_s(name, addr)

    def succeeded(self, name: str, addr: str) -> None:
        with self._lock:
            self._counts.pop(("name+addr", name, addr), None)
            self._known.setdefault(name, set()).add(addr)


class Users:
    """The password file (``name:bcrypt-hash`` lines, ``deepminer users``), re-read when it changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self) -> dict[str, str]:
        from deepminer.commands.users import read_users

        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            return {}
        with self._lock:
            if stamp != self._stamp:
                self._users, self._stamp = read_users(self.path), stamp
            return self._users


def fingerprint(hashed: str) -> str:
    """Names a user's hash line in the cookie: a new password (or removal) ends the old sessions."""
    return hashlib.sha256(hashed.encode()).hexdigest()[:16]


def load_secret(path: Path) -> bytes:
    """The session secret (made once, 32 random bytes, mode 0600)."""
    from deepminer.atomic import atomic_file

    path = Path(path)
    if not path.is_file() or path.stat().st_size < 32:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb", perms=0o600) as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


@dataclass
class Authority:
    """Checks passwords and sessions; what the HTTP handler below asks."""

    users: Users
    secret: bytes
    session_s: float = SESSION_HOURS * 3600
    throttle: Throttle = field(default_factory=Throttle)
    basic_cache_s: float = BASIC_CACHE_S
    jobs: JobStore | None = None  #: the host's job file, for the jobs API (:func:`jobs_api`); None: not offered
    _revoked: dict[str, float] = field(default_factory=dict)
    _basic: dict[tuple[str, bytes], tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._serializer = URLSafeTimedSerializer(self.secret, salt="deepminer-session")

    # -- sessions ----------------------------------------------------------------------------
    def new_session(self, name: str) -> str:
        hashed = self.users.get()[name]
        return self._serializer.dumps({"u": name, "s": secrets.token_urlsafe(12), "h": fingerprint(hashed)})

    def session_user(self, token: str) -> str | None:
        try:
            data = self._serializer.loads(token, max_age=math.ceil(self.session_s))
        except (SignatureExpired, BadSignature):
            return None
        name = data.get("u") if isinstance(data, dict) else None
        hashed = self.users.get().get(name or "")
        if not name or hashed is None or data.get("h") != fingerprint(hashed):
            return None
        with self._lock:
            if data.get("s") in self._revoked:
                return None
        return name

    def revoke(self, token: str) -> None:
        try:
            data = self._serializer.loads(token, max_age=math.ceil(self.session_s))
        except (SignatureExpired, BadSignature):
            return
        now = time.time()
        with self._lock:
            self._revoked = {s: t for s, t in self._revoked.items() if t > now}  # forget expired ones
            self._revoked[str(data.get("s"))] = now + self.session_s

    # -- passwords ---------------------------------------------------------------------------
    def check_password(self, name: str, password: str, addr: str) -> tuple[bool, float]:
        """(signed in, seconds to wait): a locked client is refused before any bcrypt check."""
        from deepminer.commands.users import check_password

        wait = self.throttle.wait_s(name, addr)
        if wait > 0:
            log.warning("sign-in refused (throttled %ds) name=%r addr=%s", math.ceil(wait), name[:64], addr)
            return False, wait
        hashed = self.users.get().get(name)
        ok = False
        if hashed is not None and len(password.encode()) <= 72:
            try:
                ok = check_password(password, hashed)
            except ValueError:
                ok = False
        if ok:
            self.throttle.succeeded(name, addr)
            return True, 0.0
        wait = self.throttle.failed(name, addr)
        log.warning("sign-in failed name=%r addr=%s%s", name[:64], addr,
                    f" (locked for {math.ceil(wait)} s)" if wait > 0 else "")
        return False, wait

    def check_basic(self, name: str, password: str, addr: str) -> tuple[bool, float]:
        """As :meth:`check_password`, a verified credential kept in memory for ``basic_cache_s``."""
        hashed = self.users.get().get(name)
        key = (name, hmac.new(self.secret, password.encode(), hashlib.sha256).digest())
        now = time.monotonic()
        with self._lock:
            hit = self._basic.get(key)
        if hit is not None and hashed is not None and hit[0] == hashed and hit[1] > now:
            return True, 0.0
        ok, wait = self.check_password(name, password, addr)
        if ok and hashed is not None:
            with self._lock:
                self._basic = {k: v for k, v in self._basic.items() if v[1] > now}
                self._basic[key] = (hashed, now + self.basic_cache_s)
        return ok, wait


def _error(status: int, kind: str, message: str) -> tuple[int, dict]:
    return status, {"code": status, "type": kind, "message": message}


def jobs_api(store: JobStore | None, user: str, method: str, path: str, query: str = "",
             body: bytes = b"") -> tuple[int, dict]:
    """One request of the jobs API of signed-in ``user``: ``(status, JSON body)``. Errors are one line
    of TorchServe's shape (``{"code", "type", "message"}``); a job of another user is answered as an
    unknown one (404: its existence is not revealed).

    * ``POST /api/jobs`` (body ``{"id": optional, "group": optional}``): 201 and the new ``queued`` row;
      409 when the id is taken;
    * ``GET /api/jobs``: ``{"jobs": [...]}``, the user's, newest first;
    * ``GET /api/jobs/<id>``: the row (``state``, ``step``, ``done``, ``total``, ``fraction``, ``elapsed_s`` ...);
    * ``POST /api/jobs/<id>/heartbeat``: the client still waits (``{"id", "state"}``);
    * ``DELETE /api/jobs/<id>``: cancel (the row); 409 when it has finished already;
      ``DELETE /api/jobs?group=G``: cancel the user's unfinished jobs of group G (``{"cancelled": n}``)."""
    if store is None:
        return _error(404, "NoJobFile", "this proxy has no job file (DEEPMINER_JOBS): long jobs are not offered")
    parts = path[len(JOBS_PATH):].strip("/").split("/") if path.startswith(JOBS_PATH) else None
    if parts is None or len(parts) > 2 or (len(parts) == 2 and parts[1] != "heartbeat"):
        return _error(404, "NotFound", f"no such route: {method} {path}")
    try:
        job_id = check_id(parts[0], name="job id") if parts[0] else None
        if job_id is None:
            if method == "GET":
                return 200, {"jobs": [r for r in store.rows() if r.get("owner") == user]}
            if method == "DELETE":
                group = urllib.parse.parse_qs(query).get("group", [""])[0]
                if not group:
                    return _error(400, "InputError", "DELETE /api/jobs: name the group (?group=...)")
                return 200, {"cancelled": store.cancel_group(group, f"cancelled by {user}", owner=user)}
            if method != "POST":
                return _error(405, "MethodNotAllowed", f"{method} {JOBS_PATH}: use GET, POST or DELETE")
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                req = None
            if not isinstance(req, dict):
                return _error(400, "InputError", "POST /api/jobs: the body is a JSON object ({} will do)")
            new: str = check_id(req["id"], name="id") if req.get("id") is not None else new_id()
            in_group = req.get("group")
            if in_group is not None and not isinstance(in_group, str):
                return _error(400, "InputError", "group: a string")
            if not store.create(new, group=in_group, owner=user):
                return _error(409, "JobExists", f"job {new} exists already: choose another id")
            return 201, store.get(new) or {}
    except InputError as err:
        return _error(400, "InputError", str(err))
    row = store.get(job_id)
    if row is None or row.get("owner") != user:
        return _error(404, "JobNotFound", f"no job {job_id} of yours")
    if len(parts) == 2:
        if method != "POST":
            return _error(405, "MethodNotAllowed", "heartbeat: use POST")
        store.touch(job_id)
        return 200, {"id": job_id, "state": row["state"]}
    if method == "GET":
        return 200, row
    if method != "DELETE":
        return _error(405, "MethodNotAllowed", f"{method} {JOBS_PATH}/<id>: use GET or DELETE")
    if not store.cancel(job_id, f"cancelled by {user}"):
        state = row["state"] if row["state"] in FINISHED else "cancelled already"
        return _error(409, "JobFinished", f"job {job_id} is over ({state}): nothing to cancel")
    return 200, store.get(job_id) or row


def _cookie(value: str, max_age: int) -> str:
    return f"{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Lax"


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        name, sep, password = b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (name, password) if sep else None


def _safe_next(target: str) -> str:
    """Only a path on this site (no ``//host``, no scheme)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


SIGNIN_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in - DeepMiner Studio</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;max-width:22rem;margin:12vh auto;padding:0 1rem}}label,input,button{{display:block;width:100%;margin:.4rem 0}}
input{{padding:.5rem;box-sizing:border-box}}button{{padding:.6rem}}.err{{color:#b00}}</style></head>
<body><h1>DeepMiner Studio</h1><p>{message}</p>
<form method="post" action="{action}"><input type="hidden" name="next" value="{next}">
<label>Name <input name="name" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form></body></html>
"""


def make_handler(authority: Authority) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "deepminer-auth"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
            pass  # nginx's access log says who asked for what; failures are logged above

        @property
        def addr(self) -> str:
            return self.headers.get("X-Real-IP") or self.client_address[0]

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _form(self, status: int, message: str, nxt: str, headers: dict[str, str] | None = None) -> None:
            page = SIGNIN_FORM.format(message=html.escape(message), action=SIGNIN_PATH, next=html.escape(nxt))
            self._send(status, page.encode(), headers, "text/html; charset=utf-8")

        def _session_token(self) -> str | None:
            from http.cookies import CookieError, SimpleCookie

            try:
                jar = SimpleCookie(self.headers.get("Cookie", ""))
            except CookieError:
                return None
            return jar[COOKIE].value if COOKIE in jar else None

        def _who(self) -> tuple[str | None, float, str | None]:
            """(the signed-in name or None, seconds a throttled client must wait, a new session cookie)."""
            if (token := self._session_token()) and (name := authority.session_user(token)):
                return name, 0.0, None
            creds = _basic_credentials(self.headers.get("Authorization", ""))
            if creds is None:
                return None, 0.0, None
            ok, wait = authority.check_basic(*creds, self.addr)
            if ok:  # a client that keeps cookies presents the session next time (no password check)
                return creds[0], 0.0, _cookie(authority.new_session(creds[0]), int(authority.session_s))
            return None, wait, None

        def _jobs(self, method: str) -> None:
            path, _, query = self.path.partition("?")
            size = int(self.headers.get("Content-Length") or 0)
            if size > 16384:
                self.close_connection = True
                return self._send(413)
            body = self.rfile.read(size)
            name, wait, _ = self._who()  # again here (nginx asked /check too): no header is trusted
            if name is None:
                status, answer = _error(401, "Unauthorized", "Sign in: a session cookie, or the name and "
                                        "password (HTTP basic).")
                if wait > 0:
                    status, answer = _error(429, "TooManyRequests", "Too many failed sign-ins: wait and try again.")
            else:
                status, answer = jobs_api(authority.jobs, name, method, path, query, body)
            self._send(status, json.dumps(answer).encode(), content_type="application/json")

        def do_DELETE(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path.startswith(JOBS_PATH):
                return self._jobs("DELETE")
            self._send(404)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path, _, query = self.path.partition("?")
            if path.startswith(JOBS_PATH):
                return self._jobs("GET")
            if path == "/check":  # nginx's auth_request
                return self._check()
            if path == SIGNOUT_PATH:
                if token := self._session_token():
                    authority.revoke(token)
                return self._send(303, b"", {"Location": SIGNIN_PATH, "Set-Cookie": _cookie("", 0)})
            nxt = urllib.parse.parse_qs(query).get("next", [""])[0] or self.headers.get("X-Original-URI", "/")
            # any other page: the sign-in form (nginx shows it, 401, for a workbench page without a session)
            self._form(401, "Sign in to continue.", _safe_next(nxt))

        def _check(self) -> None:
            name, wait, cookie = self._who()
            if name is not None:
                return self._send(204, headers={"X-Auth-User": name, **({"Set-Cookie": cookie} if cookie else {})})
            if wait > 0:  # nginx turns this 403 into 429 + Retry-After (auth_request passes 401/403 only)
                return self._send(403, headers={"Retry-After": str(math.ceil(wait))})
            return self._send(401)

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path.startswith(JOBS_PATH):
                return self._jobs("POST")
            if self.path.partition("?")[0] != SIGNIN_PATH:
                return self._send(404)
            size = int(self.headers.get("Content-Length") or 0)
            if size > 16384:
                return self._send(413)
            form = urllib.parse.parse_qs(self.rfile.read(size).decode("utf-8", "replace"))
            name, password = form.get("name", [""])[0].strip(), form.get("password", [""])[0]
            nxt = _safe_next(form.get("next", ["/"])[0])
            ok, wait = authority.check_password(name, password, self.addr)
            if ok:
                log.info("signed in name=%r addr=%s", name, self.addr)
                cookie = _cookie(authority.new_session(name), int(authority.session_s))
                return self._send(303, b"", {"Location": nxt, "Set-Cookie": cookie})
            if wait > 0:
                return self._form(429, f"Too many failed sign-ins: try again in {math.ceil(wait)} s.", nxt,
                                  {"Retry-After": str(math.ceil(wait))})
            self._form(401, "Wrong name or password.", nxt)

    return Handler


class AuthServer:
    """The service on 127.0.0.1 (``port`` 0: a free one) in a daemon thread."""

    def __init__(self, users_file: Path, secret_file: Path, *, port: int = 0, log_file: Path | None = None,
                 session_hours: float | None = None, rules: tuple[Rule, ...] = RULES,
                 jobs: Path | None = None):
        hours = session_hours if session_hours is not None else float(
            os.environ.get("DEEPMINER_SESSION_HOURS", SESSION_HOURS))
        self.authority = Authority(Users(users_file), load_secret(secret_file), session_s=hours * 3600,
                                   throttle=Throttle(rules), jobs=JobStore(jobs) if jobs else None)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self.authority))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._log_handler: logging.Handler | None = None
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(log_file, encoding="utf-8")
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(self._log_handler)
            log.setLevel(logging.INFO)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="deepminer-auth", daemon=True)

    def start(self) -> "AuthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
