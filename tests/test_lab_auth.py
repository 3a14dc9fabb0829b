"""The lab proxy's sign-in (serve/auth.py behind nginx's auth_request, serve/proxy.py), with real
nginx and TLS in front of a tiny stand-in upstream (the workbench and TorchServe parts are in
tests/test_lab_security.py):

* the password is checked once (bcrypt), later requests carry the session cookie (no bcrypt), basic
  credentials sent again are found in the memory cache; sign-out and expiry end a session;
* failed sign-ins are throttled per (name, address) and per address: 429 + Retry-After, logged with
  name and address and never the password; the name's owner on another address still signs in.
"""
from __future__ import annotations

import http.client
import os
import shutil
import ssl
import tempfile
import threading
import time
from base64 import b64encode
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import urllib3

PASSWORD = "correct horse battery"
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


class _Echo(BaseHTTPRequestHandler):
    """Answers who the proxy says signed in."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = f"user={self.headers.get('X-Deepminer-User')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def proxy(monkeypatch):
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").is_file()):
        pytest.fail("Debian nginx is missing: run `bash scripts/setup.sh` (as root) first")
    from deepminer.commands import users as users_cmd
    from serve.launch import free_port
    from serve.proxy import Nginx, ProxyConfig

    checks = {"n": 0}
    real = users_cmd.check_password

    def counting(password: str, hashed: str) -> bool:
        checks["n"] += 1
        return real(password, hashed)

    monkeypatch.setattr(users_cmd, "check_password", counting)
    monkeypatch.setenv("DEEPMINER_SESSION_HOURS", str(3 / 3600))  # 3 s sessions: expiry is testable
    up = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="deepminer-auth-"))
    os.chmod(work, 0o711)  # nginx started as root runs its workers as nobody
    users_cmd.write_users(work / "users", {"alice": users_cmd.hash_password(PASSWORD, rounds=10),
                                           "bob": users_cmd.hash_password("bobs password", rounds=10)})
    port = up.server_address[1]
    nginx = Nginx(ProxyConfig(ui_port=port, inference_port=port, port=free_port(), host="127.0.0.1", work=work,
                              users_file=work / "users")).start()
    try:
        yield {"url": nginx.url, "checks": checks, "work": work, "nginx": nginx, "users": users_cmd}
    finally:
        nginx.stop()
        up.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _session() -> requests.Session:
    s = requests.Session()
    s.verify, s.trust_env = False, False
    return s


def _get_from(source: str, port: int, path: str, auth: tuple[str, str] | None = None) -> http.client.HTTPResponse:
    """A request from another loopback address (127.0.0.x: another client to nginx)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20, source_address=(source, 0))
    headers = {"Authorization": "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()} if auth else {}
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    r.read()
    conn.close()
    return r


def test_sign_in_once_then_the_session(proxy):
    url, checks = proxy["url"], proxy["checks"]
    s = _session()
    page = s.get(url + "/explain")
    assert page.status_code == 401 and 'action="/signin"' in page.text and "WWW-Authenticate" not in page.headers
    r = s.post(url + "/signin", data={"name": "alice", "password": PASSWORD, "next": "/explain"}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == "/explain"
    cookie = r.headers["Set-Cookie"]
    assert all(flag in cookie for flag in ("HttpOnly", "Secure", "SameSite=Lax")) and PASSWORD not in cookie
    assert checks["n"] == 1
    for path in ("/explain", "/api/ping", "/_stcore/health") * 10:
        r = s.get(url + path)
        assert r.status_code == 200 and r.text == "user=alice", (path, r.text)
    assert checks["n"] == 1  # 30 requests, one password check
    # a forged cookie or another site's redirect target gets nothing
    forged = _session()
    forged.cookies.set("deepminer_session", s.cookies["deepminer_session"][:-2] + "xx")
    assert forged.get(url + "/api/ping").status_code == 401
    r = _session().post(url + "/signin", data={"name": "alice", "password": PASSWORD, "next": "//evil.example/"},
                        allow_redirects=False)
    assert r.headers["Location"] == "/"
    # scripts: basic credentials checked once, then from the cache (a client without a cookie jar)
    before = checks["n"]
    for _ in range(10):
        r = _session().get(url + "/api/ping", auth=("alice", PASSWORD))
        assert r.status_code == 200 and r.text == "user=alice"
    assert checks["n"] == before + 1
    assert _session().get(url + "/api/ping", auth=("alice", "not it at all")).status_code == 401
    # sign-out ends this session on the server too (a copied cookie no longer works)
    copied = s.cookies["deepminer_session"]
    r = s.get(url + "/signout", allow_redirects=False)
    assert r.status_code == 303 and "Max-Age=0" in r.headers["Set-Cookie"]
    other = _session()
    other.cookies.set("deepminer_session", copied)
    assert other.get(url + "/api/ping").status_code == 401
    assert s.get(url + "/explain").status_code == 401


def test_expiry_and_a_new_password_end_sessions(proxy):
    url, users = proxy["url"], proxy["users"]
    s = _session()
    assert s.post(url + "/signin", data={"name": "bob", "password": "bobs password"}).status_code == 200
    assert s.get(url + "/api/ping").text == "user=bob"
    time.sleep(4.2)  # sessions last 3 s in this test
    assert s.get(url + "/api/ping").status_code == 401
    assert s.post(url + "/signin", data={"name": "bob", "password": "bobs password"}).status_code == 200
    assert s.get(url + "/api/ping").status_code == 200
    file = proxy["work"] / "users"
    users.write_users(file, {**users.read_users(file), "bob": users.hash_password("a new password", rounds=10)})
    assert s.get(url + "/api/ping").status_code == 401  # the old password's sessions end at once


def test_failed_sign_ins_are_throttled_per_client_and_name(proxy):
    url, checks, port = proxy["url"], proxy["checks"], proxy["nginx"].cfg.port
    statuses, retry = [], []
    for _ in range(12):  # bounded: an attacker on 127.0.0.2 guessing alice's password
        r = _get_from("127.0.0.2", port, "/api/ping", auth=("alice", "guess one two"))
        statuses.append(r.status)
        retry.append(r.getheader("Retry-After"))
    assert statuses[:5] == [401] * 5, statuses
    assert 429 in statuses[5:] and all(s in (401, 429) for s in statuses), statuses
    assert all(int(retry[i]) >= 1 for i, s in enumerate(statuses) if s == 429)
    assert checks["n"] < 12  # a locked client's guesses are not even checked
    # the form says the same
    r = _session().post(url + "/signin", data={"name": "alice", "password": "guess again"}, allow_redirects=False)
    assert r.status_code in (401, 429)  # (127.0.0.1 is another client: not locked yet)
    # alice on another address is not locked out by the attacker's failures
    assert _get_from("127.0.0.3", port, "/api/ping", auth=("alice", PASSWORD)).status == 200
    # the attacker's address is locked for every name (the per-address rule)
    for _ in range(12):
        last = _get_from("127.0.0.4", port, "/api/ping", auth=(f"name{_}", "guess one two"))
    assert last.status == 429 and int(last.getheader("Retry-After")) >= 1
    # logged with name and address, never the password
    log = (proxy["work"] / "logs" / "auth.log").read_text()
    assert "name='alice' addr=127.0.0.2" in log and "locked for" in log
    assert "guess" not in log and PASSWORD not in log
