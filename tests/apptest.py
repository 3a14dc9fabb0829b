"""What the AppTest modules share (``streamlit.testing.v1.AppTest`` on ``ui/app.py``, in-process
explanations): run the app on a page, and a sample image of the session's tiny data set. The
fixtures ``ui_fixture`` and ``app_env`` are in ``conftest.py``."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "ui" / "app.py")


def run_app(page: str | None = None, annotator: str | None = "alice"):
    """The workbench under AppTest (``annotator`` set in session state), run, then switched to ``page``
    and run again; fails on an exception at either run."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=120)
    if annotator:
        at.session_state["annotator"] = annotator
    at.run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(page)
        at.run()
        assert not at.exception, at.exception
    return at


def sample_png(ui_fixture, i: int = 0) -> tuple[str, bytes]:
    """``(file name, bytes)`` of image ``i`` of ``ui_fixture``'s data set (its manifest order)."""
    from deepminer.data.dataset import read_manifest

    rows = read_manifest(ui_fixture["data"])
    path = Path(ui_fixture["data"]) / rows[i]["image"]
    return path.name, path.read_bytes()
