"""What the browser tests share: Debian chromium driven by Playwright (one browser per session, the
``chromium_browser`` fixture in ``conftest.py``; a fresh context per test), ``streamlit run`` of the
workbench and waiting for Streamlit to be idle (:mod:`serve.workbench`, also used by
``scripts/bench_evaluate_page.py``), and the page steps several tests take. No test module imports
helpers from another test module: they come from here."""
from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from serve.workbench import NOT_RUNNING, VIEWPORT, idle

@contextlib.contextmanager
def new_context(browser, **options) -> Iterator:
    """A fresh browser context (its own cookies and storage: a new visitor) of the shared ``browser``,
    closed on exit. ``options``: for ``Browser.new_context``; the viewport :data:`VIEWPORT` unless given."""
    ctx = browser.new_context(**{"viewport": VIEWPORT, **options})
    try:
        yield ctx
    finally:
        ctx.close()


@contextlib.contextmanager
def new_page(browser, **options) -> Iterator:
    """A page in a fresh context of ``browser`` (see :func:`new_context`), closed on exit."""
    with new_context(browser, **options) as ctx:
        yield ctx.new_page()


@contextlib.contextmanager
def open_workbench(browser, url: str, **options) -> Iterator:
    """A new page (fresh context) of ``browser`` on the workbench at ``url``, the first page drawn and
    idle; closed on exit."""
    with new_page(browser, **options) as page:
        page.goto(url)
        page.get_by_text("Upload a mammogram").wait_for(timeout=120_000)
        idle(page, 120_000)
        yield page


def after_input(page) -> None:
    """Wait for the rerun an input triggers (it may start a moment later), then for it to finish."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("""() => document.querySelector('[data-testid="stApp"]')
            .getAttribute('data-test-script-state') === 'running'""", timeout=3_000)
    except PlaywrightTimeout:
        pass  # it already ran
    idle(page)


def nav(page, name: str) -> None:
    """Go to a page through the sidebar navigation."""
    page.locator('[data-testid="stSidebarNavLink"]', has_text=name).first.click()


def shot(page, path: Path) -> None:
    """A screenshot of the whole page (Streamlit scrolls inside its main block, so grow the window)."""
    idle(page)
    h = page.evaluate("""() => { const m = document.querySelector('[data-testid="stMain"]');
        const els = [...document.querySelectorAll('[data-testid="stElementContainer"]')];
        return Math.max(m.scrollHeight, ...els.map(e => e.getBoundingClientRect().bottom + m.scrollTop)) + 60; }""")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": int(min(max(h, VIEWPORT["height"]), 6000))})
    page.wait_for_timeout(1500)  # plotly redraws at the new size
    page.screenshot(path=str(path))
    page.set_viewport_size(VIEWPORT)
    page.wait_for_timeout(300)


def square_mammogram(seed: int, index: int, side: int = 1024, label: str | None = None) -> bytes:
    """A phantom mammogram padded to ``side`` x ``side`` (16-bit PNG; ``label`` forces the patient's
    label, else it is drawn)."""
    from PIL import Image

    from deepminer.data.phantoms import render_phantom

    ph = render_phantom(seed, index, size=side, label=label)
    img = np.asarray(ph.image)
    canvas = np.zeros((side, side), dtype=img.dtype)
    canvas[: img.shape[0], : img.shape[1]] = img[:side, :side]
    buf = io.BytesIO()
    Image.fromarray(canvas.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def explain_upload(page, path: Path, size: tuple[int, int] = (1024, 1024)) -> float:
    """Upload ``path`` (``size`` = width, height) on the Explain page; seconds until the page shows
    this image's explanation completely (caption with its name and size, CAM, sentence; the script
    finished)."""
    t0 = time.perf_counter()
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    try:
        page.get_by_text(f"{path.name} · {size[0]} x {size[1]} px").wait_for(timeout=120_000)
        page.wait_for_function(NOT_RUNNING, timeout=60_000)
        elapsed = time.perf_counter() - t0
        page.get_by_text("DeepMiner explanation", exact=True).wait_for(timeout=5_000)
        page.get_by_text(re.compile(r"^CAM of ")).first.wait_for(timeout=5_000)
    except Exception:
        page.screenshot(path=str(Path(__file__).resolve().parents[1] / "test-artifacts" / "ui-failure.png"))
        raise
    return elapsed
