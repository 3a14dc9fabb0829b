"""Running the workbench for the browser tests and ``scripts/bench_evaluate_page.py``: ``streamlit run
ui/app.py`` on a loopback port until it answers its health check, Debian chromium through Playwright
(``executable_path=shutil.which("chromium")``, never ``playwright install``), and waiting until
Streamlit has finished running the page's script. One copy of each, used by both."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 800}
# true once Streamlit has finished running the page's script (a JavaScript predicate for Playwright)
NOT_RUNNING = """() => { const a = document.querySelector('[data-testid="stApp"]');
    return a && a.getAttribute('data-test-script-state') === 'notRunning'; }"""
CHROMIUM_MISSING = "Debian chromium is missing: run `bash scripts/setup.sh` (as root) first"


def launch_chromium(pw: Any) -> Any:
    """Debian chromium, headless, with :data:`CHROMIUM_ARGS`, from a started Playwright ``pw``
    (``sync_playwright()``). AssertionError with :data:`CHROMIUM_MISSING` when it is not installed."""
    path = shutil.which("chromium")
    assert path, CHROMIUM_MISSING
    return pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    """Wait until the Streamlit process ``proc`` answers ``url/_stcore/health``; AssertionError with
    its log (``log``) when it exits first, or after ``timeout`` s."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            if requests.get(f"{url}/_stcore/health", timeout=2).text.strip() == "ok":
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "streamlit did not come up"
        time.sleep(0.3)


@contextlib.contextmanager
def streamlit_app(env: Mapping[str, str], port: int, work: Path) -> Iterator[str]:
    """``streamlit run ui/app.py`` on 127.0.0.1:``port`` with ``env`` (log: ``work/streamlit.log``);
    yields its URL once healthy and ends its process group afterwards."""
    log = open(work / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "ui" / "app.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, work / "streamlit.log")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        log.close()


def idle(page: Any, timeout: float = 60_000) -> None:
    """Wait until Streamlit has finished running the script (and the browser has drawn it)."""
    page.wait_for_timeout(200)
    page.wait_for_function(NOT_RUNNING, timeout=timeout)
    page.wait_for_timeout(300)
