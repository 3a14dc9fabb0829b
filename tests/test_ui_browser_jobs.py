"""A long job on the Evaluate page, in chromium: one image outlined, the slow peers (integrated
gradients, SmoothGrad at 1024 px) asked for; the page shows the job's progress (method, step of
steps, seconds) with a Cancel button, Cancel stops the job at its next step (its row in the job file:
``cancelled``, fewer steps done than its total) and the page says so with a "Compute again" button.
Screenshots: ``test-artifacts/ui-long-job-progress.png``, ``ui-long-job-cancelled.png``. The
workbench runs the model in process (``DEEPMINER_BACKEND=local``: the same job path as the served
one, tests/test_serve_jobs.py covers the server)."""
from __future__ import annotations

import io
import os
import re
import sqlite3
import time

import numpy as np
import pytest
from browser import explain_upload, open_workbench, shot, square_mammogram

from serve.launch import free_port
from serve.workbench import idle, streamlit_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]
HEARTBEAT_S = 4  #: the job_heartbeat_s of the workbench's in-process model


@pytest.fixture(scope="module")
def workbench(tiny_demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("workbench-jobs")
    env = {**os.environ, "DEEPMINER_BACKEND": "local", "DEEPMINER_MODEL": "demo",
           "DEEPMINER_MODEL_DIR": str(tiny_demo["model_dir"]), "DEEPMINER_SAMPLES": str(tiny_demo["data"]),
           "DEEPMINER_LABELS_URL": f"sqlite:///{work / 'labels.db'}", "DEEPMINER_MAX_SIDE": "1024",
           "DEEPMINER_JOBS": str(work / "jobs.sqlite"), "OMP_NUM_THREADS": "1",
           "DEEPMINER_JOB_HEARTBEAT_S": str(HEARTBEAT_S)}
    for k in ("DEEPMINER_KEY_FILE", "DEEPMINER_TOKEN", "DEEPMINER_SERVE_URL"):
        env.pop(k, None)
    with streamlit_app(env, free_port(), work) as url:
        yield {"url": url, "jobs": work / "jobs.sqlite"}


def _mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _rows(jobs) -> list[tuple]:
    with sqlite3.connect(jobs) as con:
        rows = con.execute("SELECT state, done, total, step, message FROM jobs ORDER BY created").fetchall()
    con.close()
    return rows


def _slow_peers(page, tmp_path):
    """Explain a phantom, outline its lesion (a mask upload) on the Evaluate page, turn the slow peers
    on; the progress line once it shows."""
    from deepminer.data.phantoms import render_phantom

    ph = render_phantom(11, 2, size=1024)
    img = tmp_path / "mammo-lesion.png"
    img.write_bytes(square_mammogram(11, 2))
    mask = tmp_path / "lesion.png"
    mask.write_bytes(_mask_png(np.asarray(ph.lesion) > 0))
    explain_upload(page, img)
    idle(page)
    page.get_by_text("Evaluate this map against your outline").click()
    page.get_by_text("Outline the finding").wait_for(timeout=60_000)
    idle(page)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').last.set_input_files(str(mask))
    page.get_by_text(re.compile(r"^CAM and probability map scored in")).wait_for(timeout=120_000)
    idle(page, 180_000)  # the fast peers (one job too)
    page.get_by_text("...and integrated gradients, SmoothGrad (slow)").click()
    progress = page.get_by_text(re.compile(r"^integrated gradients · step \d+ of \d+ · \d+ s"))
    progress.wait_for(timeout=120_000)
    return progress


def test_a_long_job_shows_progress_and_cancels(chromium_browser, workbench, artifacts_dir, tmp_path):
    with open_workbench(chromium_browser, workbench["url"]) as page:
        progress = _slow_peers(page, tmp_path)
        cancel = page.get_by_role("button", name="Cancel", exact=True)
        assert cancel.count() == 1
        page.wait_for_timeout(1500)
        cancel.scroll_into_view_if_needed()  # the script is running: no full-page shot (it waits for idle)
        page.screenshot(path=str(artifacts_dir / "ui-long-job-progress.png"))
        shown = progress.inner_text()
        t0 = time.perf_counter()
        cancel.click()
        note = page.get_by_text(re.compile(r"^Cancelled: integrated gradients, SmoothGrad not computed"))
        note.wait_for(timeout=60_000)
        idle(page)
        took = time.perf_counter() - t0
        assert page.get_by_role("button", name="Compute again").count() == 1
        assert page.get_by_role("button", name="Cancel", exact=True).count() == 0
        assert page.locator('[data-testid="stException"]').count() == 0
        shot(page, artifacts_dir / "ui-long-job-cancelled.png")
    deadline = time.monotonic() + 30
    while True:  # the job stops at its next step
        rows = _rows(workbench["jobs"])
        if rows[-1][0] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"\nprogress shown: {shown!r}; Cancel -> page says cancelled in {took:.2f} s; jobs: {rows}")
    assert rows[-1][0] == "cancelled" and rows[-1][1] < rows[-1][2], rows
    assert rows[-2][0] == "done", rows  # the fast peers' job
    assert "cancelled after" in rows[-1][4], rows


def test_closing_the_tab_frees_the_model(chromium_browser, workbench, tmp_path):
    """The page touches its job while it shows it: a closed tab stops the touches (Streamlit stops the
    script) and the job stops at its next step once its heartbeat is older than ``job_heartbeat_s``."""
    with open_workbench(chromium_browser, workbench["url"]) as page:
        _slow_peers(page, tmp_path)
        assert _rows(workbench["jobs"])[-1][0] == "running"
    t_closed = time.perf_counter()
    deadline = time.monotonic() + HEARTBEAT_S + 60
    while (rows := _rows(workbench["jobs"]))[-1][0] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    freed_s = time.perf_counter() - t_closed
    print(f"\ntab closed -> job stopped in {freed_s:.1f} s (job_heartbeat_s {HEARTBEAT_S}): {rows[-1]}")
    assert rows[-1][0] == "cancelled" and "stopped waiting" in rows[-1][4], rows
    assert freed_s < HEARTBEAT_S + 10, freed_s
