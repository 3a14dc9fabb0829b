"""The lab profile's security with the real parts: Debian nginx (serve/proxy.py: TLS, bcrypt basic
auth, the user header, the upload limit), a real TorchServe (lab profile: token authorization on)
serving a tiny model (and its heavy pool), a real ``streamlit run`` started with the Procfile's own
flags, and Debian chromium driven by Playwright through the proxy (https, the sign-in form once).

* signed in once, the browser opens every page; the workbench's first draw through the proxy is
  within 1.3x of the direct draw on loopback (measured side by side);

* no credentials, or a wrong password -> 401 on the workbench and on the inference API;
* TLS in use (a plain-HTTP request is refused; the handshake is TLS 1.2+);
* a forged ``X-Deepminer-User`` header is ignored: the label is attributed to the signed-in user;
* canaries: a DICOM whose PatientName, PatientID, PatientBirthDate and AccessionNumber are canary
  strings is explained (through the proxy's /api/ and in the workbench), labelled, evaluated and
  exported; the canaries appear in no log (TorchServe, Streamlit, nginx), not in the label database,
  not in any export, not on the page;
* an upload over the limit gets the one message (nginx, in front of both).
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import urllib3
from browser import new_context

from serve.launch import free_port
from serve.workbench import NOT_RUNNING, wait_healthy


ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
LIMIT_MB = 2  # small, so the over-limit upload is quick; the same number in all three layers
CANARIES = {"PatientName": "CANARYNAME^QZXW", "PatientID": "CANARYID7731", "PatientBirthDate": "18870214",
            "AccessionNumber": "CANARYACC5521"}
CANARY_BYTES = [b"CANARYNAME", b"QZXW", b"CANARYID7731", b"18870214", b"CANARYACC5521"]

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


def _users_cli(file: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepminer", "users", "--file", str(file), *args],
                          input=password + "\n" if password is not None else "", capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def _procfile_ui_command(env: dict[str, str]) -> list[str]:
    """The Procfile's ``ui`` command with its ${VAR:-default} expanded from ``env``: the test runs the
    workbench with exactly the flags ``make run`` uses (upload limit, XSRF, CORS)."""
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("ui:"))
    line = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), line[3:].strip())
    cmd = shlex.split(line)
    assert cmd[0].endswith("streamlit")
    return [sys.executable, "-m", "streamlit", *cmd[1:], "--server.fileWatcherType", "none"]


def _canary_dicom(path: Path) -> Path:
    """A 512 x 512 16-bit phantom DICOM whose patient identifiers are the canaries."""
    import pydicom
    from dicomfixtures import write_dicom

    from deepminer.data.phantoms import render_phantom

    img = np.asarray(render_phantom(3, 1, size=512).image)
    values = np.zeros((512, 512), np.uint16)
    values[:, : img.shape[1]] = np.clip(img[:512, :512], 0, 4095)
    write_dicom(path, values, bits_stored=12, laterality="L", view="CC", patient_id=CANARIES["PatientID"])
    ds = pydicom.dcmread(path)
    for k, v in CANARIES.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    assert all(c in path.read_bytes() for c in CANARY_BYTES)
    return path


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


# -- fast checks (no services) ---------------------------------------------------------------------

def test_users_command(tmp_path):
    from deepminer.commands.users import check_password, read_users

    f = tmp_path / "proxy" / "users"
    r = _users_cli(f, "add", "alice", "--password-stdin", password=PASSWORD)
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    assert (f.stat().st_mode & 0o777) == 0o600
    line = f.read_text()
    assert line.startswith("alice:$2b$") and PASSWORD not in line
    assert check_password(PASSWORD, read_users(f)["alice"]) and not check_password("wrong one!", read_users(f)["alice"])
    assert _users_cli(f, "add", "bob", "--password-stdin", password="another pass").returncode == 0
    assert _users_cli(f, "list").stdout.split() == ["alice", "bob"]
    # bad input: one line, exit 2, file untouched
    before = f.read_bytes()
    for args, pw, why in ((("add", "bad name", "--password-stdin"), PASSWORD, "bad name"),
                          (("add", "carol", "--password-stdin"), "short", "at least 8"),
                          (("remove", "nobody"), None, "no user")):
        r = _users_cli(f, *args, password=pw)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _users_cli(f, "add", "carol")  # no terminal, no --password-stdin
    assert r.returncode == 2 and "--password-stdin" in r.stderr
    assert f.read_bytes() == before
    assert _users_cli(f, "remove", "bob").returncode == 0
    assert _users_cli(f, "list").stdout.split() == ["alice"]
    assert not list(f.parent.glob(".*tmp"))  # atomic writes leave nothing behind


def test_one_upload_limit_everywhere():
    """The upload limit is defined once (serve.launch.UPLOAD_LIMIT_MB) and every layer gets it."""
    from serve.launch import PROFILES, UPLOAD_LIMIT_MB, profile_env, read_properties, upload_limit_message
    from serve.proxy import ProxyConfig, render

    for profile in PROFILES.values():  # the static copy TorchServe reads under `make run`
        assert int(read_properties(profile)["max_request_size"]) == UPLOAD_LIMIT_MB * 1024 * 1024, profile
    env = profile_env("lab", 8501)
    assert env["DEEPMINER_UPLOAD_MB"] == str(UPLOAD_LIMIT_MB)
    assert env["TS_MAX_REQUEST_SIZE"] == str(UPLOAD_LIMIT_MB * 1024 * 1024)
    assert read_properties(PROFILES["lab"]).get("enable_envvars_config") == "true"  # so TS_* is read
    assert env["DEEPMINER_USER_HEADER"] == "X-Deepminer-User" and profile_env("demo", 8501)["DEEPMINER_USER_HEADER"] == ""
    ui = _procfile_ui_command({"DEEPMINER_UPLOAD_MB": str(UPLOAD_LIMIT_MB)})
    flags = dict(zip(ui[::1], ui[1::1]))
    assert flags["--server.maxUploadSize"] == str(UPLOAD_LIMIT_MB)
    import tomllib

    bare = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())  # a bare `streamlit run`
    assert bare["server"]["maxUploadSize"] == UPLOAD_LIMIT_MB
    assert flags["--server.enableXsrfProtection"] == "true"
    assert flags["--server.enableCORS"] == "true"  # Streamlit's CORS *protection*: no cross-origin access
    assert flags["--server.address"] == "127.0.0.1"
    conf = render(ProxyConfig(ui_port=8501, inference_port=8080, users_file=Path("/x/users")))
    assert f"client_max_body_size {UPLOAD_LIMIT_MB}m;" in conf
    assert upload_limit_message(UPLOAD_LIMIT_MB) in conf
    assert ":8081" not in conf and ":8082" not in conf  # management and metrics are not proxied


def test_patient_identifiers_hidden_unless_turned_on(tmp_path, monkeypatch):
    from ui import state

    data = _canary_dicom(tmp_path / "x.dcm").read_bytes()
    try:
        for value, expected in (("", {}), ("0", {}), ("1", CANARIES)):
            monkeypatch.setenv("DEEPMINER_SHOW_PATIENT_IDS", value)
            state._settings.clear()
            assert state.patient_identifiers(data) == expected
        assert state.patient_identifiers(b"\x89PNG\r\n\x1a\n" + bytes(200)) == {}  # not a DICOM
    finally:
        state._settings.clear()


def test_workbench_without_the_proxy_header_is_not_signed_in(tiny_demo, tmp_path, monkeypatch):
    """Lab settings, reached around the proxy (no header): no name box, a name put in the session
    state (what the demo's box would hold) is not an annotator, and label import is off."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    env = {"DEEPMINER_BACKEND": "local", "DEEPMINER_MODEL_DIR": str(tiny_demo["model_dir"]),
           "DEEPMINER_SAMPLES": str(tiny_demo["data"]), "DEEPMINER_LABELS_URL": f"sqlite:///{tmp_path / 'l.db'}",
           "DEEPMINER_MODEL": "demo", "DEEPMINER_USER_HEADER": "X-Deepminer-User"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=120)
        at.session_state["annotator"] = "mallory"
        at.run()
        assert not at.exception, at.exception
        assert not [t for t in at.sidebar.text_input if "Your name" in t.label]
        assert any("Not signed in" in c.value for c in at.sidebar.caption)
        from ui import state

        assert state.annotator() == ""
        at.switch_page("views/labels.py")
        at.run()
        assert not at.exception, at.exception
        assert any("Import is off in the lab profile" in c.value for c in at.caption)
        assert not at.get("file_uploader")
    finally:
        st.cache_resource.clear()


# -- the real thing --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(tiny_demo, tmp_path_factory):
    """TorchServe (lab profile) + Streamlit (lab settings, the Procfile's flags) + nginx in front."""
    from serve.archive import build_mar
    from serve.launch import TorchServe, with_heavy_pools
    from serve.proxy import Nginx, ProxyConfig

    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").is_file()):
        pytest.fail("Debian nginx is missing: run `bash scripts/setup.sh` (as root) first")
    work = tmp_path_factory.mktemp("lab")
    t0 = time.perf_counter()
    store = work / "store"
    build_mar(tiny_demo["model_dir"] / "model.pt", store, name="demo", atlas=tiny_demo["model_dir"] / "atlas",
              workers=1)
    # the limit reaches TorchServe as under `make run`: TS_MAX_REQUEST_SIZE (profile_env), read because the
    # lab profile sets enable_envvars_config (the config file itself says the 64 MiB default)
    ts = TorchServe(store, with_heavy_pools({"demo": "demo.mar"}), work / "ts", profile="lab",
                    env={**os.environ, "TS_MAX_REQUEST_SIZE": str(LIMIT_MB * 1024 * 1024)})
    ts.start(timeout=300)
    procs: list[subprocess.Popen] = []
    nginx = None
    # nginx started as root (this container) runs its workers as nobody: they must reach the users file
    # and the temp folders, which pytest's private (0700) tmp folders would hide
    proxy_dir = Path(tempfile.mkdtemp(prefix="deepminer-lab-proxy-"))
    os.chmod(proxy_dir, 0o711)
    try:
        users = proxy_dir / "users"
        assert _users_cli(users, "add", "alice", "--password-stdin", password=PASSWORD).returncode == 0
        ui_port = free_port()
        env = {**os.environ, "DEEPMINER_SERVE_URL": ts.inference_url, "DEEPMINER_MODEL": "demo",
               "DEEPMINER_BACKEND": "serve", "DEEPMINER_MODEL_DIR": str(tiny_demo["model_dir"]),
               "DEEPMINER_DATA_ROOT": str(tiny_demo["data"]), "DEEPMINER_KEY_FILE": str(ts.key_file),
               "DEEPMINER_MANAGEMENT_URL": ts.management_url,
               "DEEPMINER_LABELS_URL": f"sqlite:///{work / 'labels.db'}", "DEEPMINER_SAMPLES": str(tiny_demo["data"]),
               "DEEPMINER_USER_HEADER": "X-Deepminer-User", "DEEPMINER_UPLOAD_MB": str(LIMIT_MB),
               "DEEPMINER_UI_PORT": str(ui_port), "DEEPMINER_MAX_SIDE": "512"}
        env.pop("DEEPMINER_TOKEN", None)
        env.pop("DEEPMINER_SHOW_PATIENT_IDS", None)
        log = open(work / "streamlit.log", "wb")
        procs.append(subprocess.Popen(_procfile_ui_command(env), cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
        nginx = Nginx(ProxyConfig(ui_port=ui_port, inference_port=ts.ports["inference"], port=free_port(),
                                  host="127.0.0.1", work=proxy_dir, users_file=users, key_file=ts.key_file,
                                  upload_mb=LIMIT_MB)).start()
        wait_healthy(procs[0], f"http://127.0.0.1:{ui_port}", work / "streamlit.log")
        print(f"\nlab stack (TorchServe + Streamlit + nginx) up in {time.perf_counter() - t0:.1f} s")
        yield {"url": nginx.url, "ts": ts, "work": work, "labels_url": env["DEEPMINER_LABELS_URL"], "ui_port": ui_port,
               "streamlit_log": work / "streamlit.log", "proxy": nginx.cfg, "proxy_dir": proxy_dir}
    finally:
        if nginx is not None:
            nginx.stop()
        for p in procs:
            _stop_group(p)
        ts.stop()
        shutil.rmtree(proxy_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.serve
def test_sign_in_required_and_tls(lab):
    url = lab["url"]
    for path in ("/", "/explain", "/_stcore/health", "/api/ping", "/api/predictions/demo"):
        assert requests.get(url + path, verify=False, timeout=10).status_code == 401, path
        r = requests.get(url + path, verify=False, timeout=10, auth=("alice", "not the password"))
        assert r.status_code == 401, path
        assert requests.get(url + path, verify=False, timeout=10, auth=("mallory", PASSWORD)).status_code == 401
    # verified against the certificate made on first run (its names include 127.0.0.1)
    ok = requests.get(url + "/_stcore/health", verify=str(lab["proxy"].cert), timeout=10, auth=("alice", PASSWORD))
    assert ok.status_code == 200 and ok.text.strip() == "ok"
    assert ok.headers.get("Strict-Transport-Security")
    # the inference API behind /api/: the proxy adds TorchServe's key (TorchServe itself refuses without)
    assert requests.get(lab["ts"].inference_url + "/ping", timeout=10).status_code in (400, 401)
    ping = requests.get(url + "/api/ping", verify=False, timeout=10, auth=("alice", PASSWORD))
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    # management (models, scaling) is not reachable through the proxy
    assert requests.get(url + "/api/models", verify=False, timeout=10, auth=("alice", PASSWORD)).status_code != 200
    # TLS: plain HTTP on the port is refused; the handshake is TLS 1.2 or 1.3
    port = lab["proxy"].port
    plain = requests.get(f"http://127.0.0.1:{port}/", timeout=10, auth=("alice", PASSWORD))
    assert plain.status_code == 400 and "HTTPS" in plain.text
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, ctx.wrap_socket(s) as t:
        assert t.version() in ("TLSv1.2", "TLSv1.3")
        assert t.getpeercert(binary_form=True)  # the self-signed certificate made on first run
    assert (lab["proxy"].cert.is_file() and (lab["proxy"].key.stat().st_mode & 0o077) == 0)


@pytest.mark.slow
@pytest.mark.serve
def test_upload_over_the_limit_gets_the_one_message(lab):
    from serve.launch import upload_limit_message

    message = upload_limit_message(LIMIT_MB)
    big = os.urandom(LIMIT_MB * 1024 * 1024 + 4096)
    auth = ("alice", PASSWORD)
    r = requests.post(lab["url"] + "/api/predictions/demo", data=big, verify=False, timeout=60, auth=auth)
    assert r.status_code == 413 and r.json()["message"] == message, r.text[:300]
    # the workbench's upload endpoint (behind the same proxy) answers the same
    r = requests.put(lab["url"] + "/_stcore/upload_file/session/file", files={"file": ("big.png", big)},
                     verify=False, timeout=60, auth=auth)
    assert r.status_code == 413 and r.json()["message"] == message
    # through the one client (what the workbench and the CLI use), the same sentence
    from deepminer.client import Client, ServeError

    with Client(lab["url"] + "/api", model="demo", timeout=60) as c:
        c.session.auth, c.session.verify = auth, str(lab["proxy"].cert)  # the self-signed certificate
        c.session.trust_env = False  # (a REQUESTS_CA_BUNDLE in the environment would override verify)
        with pytest.raises(ServeError) as err:
            c.explain(big)
    assert err.value.status == 413 and err.value.message == message
    # TorchServe has the same limit behind it (loopback, its own key)
    key = json.loads(lab["ts"].key_file.read_text())["inference"]["key"]
    r = requests.post(lab["ts"].inference_url + "/predictions/demo", data=big, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 413


def _sign_in(page, url: str, path: str = "/") -> None:
    """The sign-in form (what a workbench page shows without a session), once."""
    page.goto(url + path, wait_until="commit")
    page.get_by_label("Name").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()


def _first_draw(page, url: str) -> tuple[float, int]:
    """Seconds from navigation to the Explain page drawn and idle, and the requests it made."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    t0 = time.perf_counter()
    page.goto(url + "/", wait_until="commit")
    page.get_by_text("Upload a mammogram").wait_for(timeout=120_000)
    page.wait_for_function(NOT_RUNNING, timeout=120_000)
    return time.perf_counter() - t0, len(seen)


@pytest.mark.slow
@pytest.mark.serve
@pytest.mark.browser
def test_browser_signs_in_once_every_page_opens_first_draw_ratio(chromium_browser, lab, artifacts_dir):
    auth_log = lab["proxy_dir"] / "logs" / "auth.log"
    signed_in_before = auth_log.read_text().count("signed in name='alice'") if auth_log.is_file() else 0
    direct_url = f"http://127.0.0.1:{lab['ui_port']}"
    with new_context(chromium_browser, viewport={"width": 1280, "height": 900}, ignore_https_errors=True) as proxied:
        page = proxied.new_page()
        _sign_in(page, lab["url"], "/explain")
        page.wait_for_url(re.compile(r"/explain$"), timeout=60_000)  # back where the form was shown
        page.get_by_text("Signed in as alice").wait_for(timeout=120_000)
        page.wait_for_function(NOT_RUNNING, timeout=120_000)
        # every page opens (signed in once: the session cookie carries the rest)
        links = page.locator('[data-testid="stSidebarNavLink"]')
        hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
        assert len(hrefs) >= 5 and all(h and h.startswith(lab["url"]) for h in hrefs), hrefs
        for name in hrefs:  # each page by its address, as a bookmark would open it
            assert name is not None
            page.goto(name, wait_until="commit")
            page.locator('[data-testid="stSidebarNavLink"]').first.wait_for(timeout=120_000)
            page.wait_for_function(NOT_RUNNING, timeout=120_000)
            assert page.locator('[data-testid="stException"]').count() == 0, name
            assert "Sign in to continue" not in page.content(), name
        # the first draw, side by side: direct to Streamlit on loopback, and through the proxy
        # (each in a fresh context, so no browser cache; the proxied one with the session signed in above)
        session = proxied.storage_state()
        draws: dict[str, list[tuple[float, int]]] = {"direct": [], "proxy": []}
        for _ in range(3):
            for kind, url, ctx_kw in (("direct", direct_url, {}),
                                      ("proxy", lab["url"], {"ignore_https_errors": True, "storage_state": session})):
                with new_context(chromium_browser, viewport={"width": 1280, "height": 900}, **ctx_kw) as ctx:
                    draws[kind].append(_first_draw(ctx.new_page(), url))
        page.screenshot(path=str(artifacts_dir / "lab-pages.png"), full_page=True)
        # sign out: the sidebar's link; the session ends (the next page asks again)
        assert page.locator('a[href="/signout"]').count() == 1
        page.goto(lab["url"] + "/signout", wait_until="commit")
        page.get_by_role("button", name="Sign in").wait_for(timeout=30_000)
        page.goto(lab["url"] + "/explain", wait_until="commit")
        page.get_by_role("button", name="Sign in").wait_for(timeout=30_000)
    signed_in = auth_log.read_text().count("signed in name='alice'") - signed_in_before
    assert signed_in == 1  # one password check for the whole visit
    direct = float(np.median([t for t, _ in draws["direct"]]))
    proxy = float(np.median([t for t, _ in draws["proxy"]]))
    print(f"\nfirst draw (median of 3, side by side): direct {direct:.2f} s "
          f"({draws['direct'][0][1]} requests), through the proxy signed in {proxy:.2f} s "
          f"({draws['proxy'][0][1]} requests): {proxy / direct:.2f}x")
    (artifacts_dir / "lab-first-draw.json").write_text(json.dumps({"seconds_requests": draws, "median_direct_s": direct,
                                                                  "median_proxy_s": proxy, "ratio": proxy / direct,
                                                                  "load_average": os.getloadavg()}, indent=1) + "\n")
    # The target (<= 1.3x) is a measurement, reported above and in the artifact; what must never come back
    # is a password check per request (~330 ms each: 12x over the page's 95 requests), which this bound
    # catches with room for a machine busy with other tests (make test runs two workers)
    assert proxy <= 2.0 * direct, draws


@pytest.mark.slow
@pytest.mark.serve
@pytest.mark.browser
def test_forged_header_ignored_and_canaries_nowhere(chromium_browser, lab, tmp_path, artifacts_dir):

    from deepminer.client import Client
    from deepminer.labels import LabelStore
    from ui import evaluate as ev

    dicom = _canary_dicom(tmp_path / "study-0001.dcm")
    t0 = time.perf_counter()
    with new_context(chromium_browser, viewport={"width": 1280, "height": 900}, ignore_https_errors=True,
                     extra_http_headers={"X-Deepminer-User": "mallory"}) as ctx:  # forged: must be ignored
        page = ctx.new_page()
        try:
            _sign_in(page, lab["url"])
            page.get_by_text("Upload a mammogram").wait_for(timeout=120_000)
            page.wait_for_function(NOT_RUNNING, timeout=120_000)
            page.get_by_text("Signed in as alice").wait_for(timeout=60_000)  # the sidebar, from the sign-in
            page.wait_for_function(NOT_RUNNING, timeout=60_000)
            assert page.get_by_label("Your name (stored with every label)").count() == 0  # no name box
            assert "mallory" not in page.content()
            # a file over the limit: the uploader refuses it before sending, with the same number
            big = tmp_path / "too-big.png"
            big.write_bytes(os.urandom(LIMIT_MB * 1024 * 1024 + 4096))
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(big))
            page.get_by_text(re.compile(rf"File must be {LIMIT_MB}(\.0)? ?MB or smaller")).wait_for(timeout=30_000)
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(dicom))
            page.get_by_text(re.compile(r"^study-0001\.dcm · 512 x 512 px")).wait_for(timeout=120_000)
            page.wait_for_function(NOT_RUNNING, timeout=60_000)
            page.get_by_text(re.compile(r"^Prediction: ")).wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(artifacts_dir / "lab-explain.png"), full_page=True)
            assert not any(c.decode() in page.content() for c in CANARY_BYTES)  # identifiers hidden by default

            # label a unit on the Sketch & label page (the annotator comes from the sign-in)
            page.locator('[data-testid="stSidebarNavLink"]', has_text="Sketch & label").first.click()
            page.get_by_text("Label units", exact=True).wait_for(timeout=60_000)
            page.wait_for_function(NOT_RUNNING, timeout=60_000)
            form = page.locator('[data-testid="stForm"]').first
            units_box = form.locator('[data-testid="stMultiSelect"]')
            option = page.get_by_role("option", name=re.compile(r"^unit \d+")).first
            for attempt in range(4):  # the dropdown closes when a rerun lands between opening it and the
                # click on the option (the option then never comes back): open it again and click again
                page.wait_for_function(NOT_RUNNING, timeout=60_000)
                units_box.locator("input").click()
                units_box.locator("input").fill("unit")
                try:
                    option.click(timeout=10_000)
                    break
                except Exception:  # noqa: BLE001 - playwright's timeout: try once more
                    page.keyboard.press("Escape")
                    if attempt == 3:
                        raise
            page.keyboard.press("Escape")
            concept = form.locator('[data-testid="stSelectbox"]')
            concept.locator("input").click()
            concept.locator("input").fill("spiculated margin canary-free")
            page.keyboard.press("Enter")
            form.get_by_role("button", name="Label the selected units").click()
            # saved? (the page's "Labelled 1 unit(s)" note lasts one rerun: read the store instead)
            deadline, watch = time.monotonic() + 90, LabelStore(lab["labels_url"])
            while not watch.history() and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            watch.engine.dispose()
            page.wait_for_function(NOT_RUNNING, timeout=60_000)
            page.screenshot(path=str(artifacts_dir / "lab-label.png"), full_page=True)
            assert not any(c.decode() in page.content() for c in CANARY_BYTES)
        except Exception:
            page.screenshot(path=str(artifacts_dir / "lab-failure.png"), full_page=True)
            access = lab["proxy_dir"] / "logs" / "access.log"
            print("\n".join(access.read_text(errors="replace").splitlines()[-30:]) if access.is_file() else "")
            raise
    browser_s = time.perf_counter() - t0

    store = LabelStore(lab["labels_url"])
    records = store.current(*store.models()[0][:2])
    assert [r.annotator for r in records] == ["alice"], records  # not "mallory", not blank
    assert records[0].label == "spiculated margin canary-free"

    # an evaluation including the DICOM, explained through the proxy's /api/ (the Evaluate page's code)
    with Client(lab["url"] + "/api", model="demo", timeout=120) as c:
        c.session.auth, c.session.verify = ("alice", PASSWORD), str(lab["proxy"].cert)
        c.session.trust_env = False
        exp = c.explain(dicom.read_bytes(), max_side=512)
    pixels = ev.load_pixels(dicom)
    lesion = np.zeros(pixels.shape, bool)
    lesion[pixels.shape[0] // 3: pixels.shape[0] // 2, pixels.shape[1] // 4: pixels.shape[1] // 2] = True
    rec = ev.evaluate_item(dicom.stem, None, pixels, lesion, exp)
    assert rec.scores, rec.problem
    summary = ev.summary_rows([rec], n_resamples=50)
    thumb = ev.thumb(pixels, lesion, np.asarray(exp.cam[ev.class_index(exp, None)]))
    cases = [{"title": f"best: {rec.image_id}", "image": thumb.pixels, "lesion": thumb.lesion,
              "saliency": thumb.cam, "subtitle": "AUPRC"}]  # as the Evaluate page builds its gallery
    exports = {
        "labels.csv": store.export_csv().encode(), "labels.json": store.export_json().encode(),
        "evaluation-per-image.csv": ev.per_image_csv([rec]).encode(),
        "evaluation-summary.json": ev.report_json(summary, {"evaluated_by": "alice"}).encode(),
        "evaluation-figures.zip": ev.figures_zip([rec], summary, cases, tmp_path / "figs"),
    }
    for name, data in list(exports.items()):
        if name.endswith(".zip"):  # the images inside too (pixels only, PNG)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                exports.update({f"{name}/{n}": z.read(n) for n in z.namelist()})
    store.engine.dispose()

    # the canaries: nowhere
    places: dict[str, bytes] = dict(exports)
    for folder in (lab["ts"].workdir, lab["proxy_dir"] / "logs"):
        for p in folder.rglob("*"):
            if p.is_file() and p.suffix in (".log", ".txt", "") and p.stat().st_size < 50_000_000:
                places[str(p)] = p.read_bytes()
    places[str(lab["streamlit_log"])] = lab["streamlit_log"].read_bytes()
    db = Path(lab["labels_url"].removeprefix("sqlite:///"))
    for p in db.parent.glob(db.name + "*"):  # the database and its WAL / journal
        places[str(p)] = p.read_bytes()
    logs = [k for k in places if k.endswith(".log")]
    assert any("access" in k for k in logs) and any("ts_log" in k or "model_log" in k for k in logs), logs
    assert any(b"alice" in v for k, v in places.items() if "access" in k)  # the proxy logs who, not what
    hits = {k: [c.decode() for c in CANARY_BYTES if c in v] for k, v in places.items()}
    assert not {k: v for k, v in hits.items() if v}, hits
    print(f"\nbrowser through the proxy (upload, explain, label): {browser_s:.1f} s; "
          f"searched {len(places)} logs, exports and database files for the canaries")


@pytest.mark.slow
@pytest.mark.serve
def test_small_load_test_over_the_proxy(lab, tmp_path):
    """scripts/loadtest.py (locust), small: 4 users explaining, sketching, evaluating and labelling at
    once for 15 s through the proxy; no error, no label lost. The longer run (docs/serving.md):
    ``DEEPMINER_LOAD_USERS=8 DEEPMINER_LOAD_SECONDS=120`` with this test, or the script against a lab."""
    users, seconds = os.environ.get("DEEPMINER_LOAD_USERS", "4"), os.environ.get("DEEPMINER_LOAD_SECONDS", "15")
    for name in ("bob", "carol"):
        assert _users_cli(lab["proxy"].users_file, "add", name, "--password-stdin", password=PASSWORD).returncode == 0
    cmd = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", lab["url"], "--cacert", str(lab["proxy"].cert),
           "--model", "demo", "--users", users, "--time", seconds, "--size", "384", "--out", str(tmp_path / "load"),
           *[a for n in ("alice", "bob", "carol") for a in ("--user", f"{n}:{PASSWORD}")]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=int(seconds) + 400, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    print("\n" + r.stdout[-2500:])
    assert r.returncode == 0, r.stdout[-2500:] + r.stderr[-2500:]
    report = (tmp_path / "load" / "report.txt").read_text()
    assert "errors: 0" in report and ", 0 lost" in report
    for kind in ("sign in", "explain", "sketch", "evaluate", "label"):
        assert re.search(rf"^{kind}\s+\d+\s+0\s", report, re.M), (kind, report)
