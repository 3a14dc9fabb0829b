"""The model's answers for the pages: :func:`explain` and :func:`explain_methods` (through the picked
model's client, served or in-process; answers cached per image and options) turn every failure into
words (:class:`Failure`, :func:`failure_of`) instead of a traceback; the ablation view; the warm-up
that makes the first explanation quick."""
from __future__ import annotations

import threading
import time
from concurrent.futures import wait
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import streamlit as st

from deepminer.errors import DeepMinerError
from ui.models import base_settings, client_of, settings, settings_for
from ui.render import md_escape
from ui.session import session


@dataclass(frozen=True)
class Failure:
    """Why there is no explanation, in words for the page."""

    message: str
    kind: str = "error"  # error | unavailable


@st.cache_data(show_spinner=False, max_entries=16)
def _explain(data: bytes, sketch: np.ndarray | None, unit_maps: str, top_units: int, model: str,
             ablate: tuple[int, ...] = ()):
    s = settings_for(model)
    return client_of(s).explain(data, top_units=top_units, unit_maps=unit_maps, sketch=sketch, max_side=s.max_side,
                                ablate=ablate or None)


def explain(data: bytes, *, sketch: np.ndarray | None = None, unit_maps: str = "top", top_units: int = 8,
            model: str | None = None, ablate: Sequence[int] = ()):
    """The explanation of ``data`` by the picked model (or by ``model``; cached per model, image, sketch
    and options), or a :class:`Failure`. ``ablate``: unit ids silenced in its ``ablation`` (the server
    answers from the image's cached unit maps: no second forward)."""
    s = settings() if model is None else settings_for(model)
    try:
        return _explain(data, sketch, unit_maps, top_units, s.model, tuple(int(u) for u in ablate))
    except Exception as err:  # noqa: BLE001 - worded by failure_of; anything else is re-raised
        f = failure_of(err, model=s.model, what="image")
        if f is None:
            raise
        return f


def failure_of(err: Exception, *, model: str | None = None, what: str = "request") -> Failure | None:
    """The words for a failed call of the picked model (or of ``model``); ``what`` was refused on a
    4xx (``image``: the image). None for an error that is not a model call's (OSError/ValueError
    included: model files missing in local mode, malformed answers)."""
    from deepminer.client import ServeError, ServeUnavailable

    s = settings() if model is None else settings_for(model)
    if isinstance(err, ServeUnavailable):
        return Failure(f"TorchServe is not reachable at {s.serve_url}. Start everything with `make run` "
                       "(or set DEEPMINER_SERVE_URL / DEEPMINER_BACKEND=local).", "unavailable")
    if isinstance(err, ServeError):
        if err.status == 401:
            return Failure(f"TorchServe refused the request (401): set DEEPMINER_KEY_FILE to its key_file.json "
                           f"or DEEPMINER_TOKEN. ({md_escape(err.message)})")
        if err.status == 404:
            return Failure(f"The server does not host model `{md_escape(s.model)}` (404): pick another in the "
                           f"sidebar. {md_escape(err.message)}")
        if err.status >= 500:
            return Failure(f"The model server failed ({err.status} {md_escape(err.type)}): {md_escape(err.message)}")
        if what == "image":
            return Failure(f"The image was refused: {md_escape(err.message)}")
        return Failure(f"The {what} was refused ({err.status}): {md_escape(err.message)}")
    if isinstance(err, DeepMinerError):
        return Failure(md_escape(err))
    if isinstance(err, (OSError, ValueError)):
        return Failure(f"{type(err).__name__}: {md_escape(err)}")
    return None


@st.cache_data(show_spinner=False, max_entries=16)
def _explain_methods(data: bytes, methods: tuple[str, ...], target: str | None, model: str):
    from deepminer.options import ExplainOptions

    s = settings_for(model)
    return client_of(s).explain_methods(data, list(methods), target=target,
                                        options=ExplainOptions.build(max_side=s.max_side))


def explain_methods(data: bytes, methods: Sequence[str], *, target: str | None = None):
    """``POST /explanations``: the saliency maps of ``methods`` (at most 3 gradient methods a request)
    for class ``target`` in ``.method_maps`` (cached per image, methods and class), or a :class:`Failure`."""
    try:
        return _explain_methods(data, tuple(methods), target, settings().model)
    except Exception as err:  # noqa: BLE001 - worded below; anything else is re-raised
        f = failure_of(err)
        if f is None:
            raise
        return f


# -- long calls: progress and Cancel (deepminer.jobs) ------------------------------------------------

#: what :func:`explain_methods_job` answers for a call the person cancelled
CANCELLED = "cancelled"
_POLL_S = 0.3  #: how often the bar is redrawn (and the job touched) while a long call runs


@st.cache_resource(show_spinner=False)
def _job_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(4, thread_name_prefix="deepminer-job")


def _job_key(data: bytes, methods: Sequence[str], target: str | None, model: str) -> str:
    import hashlib

    return f"{hashlib.sha1(data).hexdigest()}:{','.join(methods)}:{target}:{model}"


def cancel_job(key: str) -> None:
    """The Cancel button's callback: the call computing ``key`` is stopped at the server's next step
    and answers :data:`CANCELLED` from now on (:func:`forget_job` to compute it again)."""
    sess = session()
    pending = sess.jobs.pop(key, None)
    if pending is not None:
        job, c = pending[0], pending[2]
        c.cancel(job)
    sess.job_results[key] = CANCELLED


def forget_job(data: bytes, methods: Sequence[str], target: str | None = None) -> None:
    """Drop what :func:`explain_methods_job` remembers of this call (the next one computes it again)."""
    session().job_results.pop(_job_key(data, methods, target, settings().model), None)


def explain_methods_job(data: bytes, methods: Sequence[str], *, target: str | None = None, key: str):
    """:func:`explain_methods` as a long job (:mod:`deepminer.jobs`): the call runs in a thread while
    the page shows its progress (method, step, seconds) and a Cancel button (``key``: the widgets'
    key). Answers the explanation, a :class:`Failure`, or :data:`CANCELLED` (the page says so; the
    answer is remembered per session, image, methods and class). The call survives reruns (a click
    elsewhere picks it up again); the job is touched only while a page shows it, so a closed browser
    tab frees the server within its ``job_heartbeat_s``. A client without a job file (a server on
    another host): :func:`explain_methods` with a spinner."""
    from deepminer.client import ServeError
    from deepminer.jobs import JobCancelled, new_id
    from deepminer.options import ExplainOptions
    from ui.logic import job_progress

    s = settings()
    c = client_of(s)
    if getattr(c, "jobs", None) is None:
        with st.spinner(f"Computing {', '.join(methods)}..."):
            return explain_methods(data, methods, target=target)
    sess = session()
    ck = _job_key(data, methods, target, s.model)
    if ck in sess.job_results:
        return sess.job_results[ck]
    if ck not in sess.jobs:
        job = new_id()
        fut = _job_pool().submit(c.explain_methods, data, list(methods), target=target,
                                 options=ExplainOptions.build(max_side=s.max_side), job=job, beat=False)
        sess.jobs[ck] = (job, fut, c, time.monotonic())
    job, fut, c, t0 = sess.jobs[ck]
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    bar = left.empty()
    right.button("Cancel", key=f"{key}_cancel", on_click=cancel_job, args=(ck,))
    while not fut.done():
        c.jobs.touch(job)  # this page still waits (a closed tab stops touching it: the server drops the job)
        frac, words = job_progress(c.job(job), time.monotonic() - t0)
        bar.progress(frac, text=words)
        wait([fut], timeout=_POLL_S)
    sess.jobs.pop(ck, None)
    try:
        out = fut.result()
    except (JobCancelled, ServeError) as err:
        if getattr(err, "status", None) == 409:
            out = CANCELLED
        else:
            out = failure_of(err) or Failure(str(err))
    except Exception as err:  # noqa: BLE001 - worded below; anything else is re-raised
        out = failure_of(err)
        if out is None:
            raise
    if len(sess.job_results) >= 16:
        sess.job_results.pop(next(iter(sess.job_results)))
    sess.job_results[ck] = out
    return out


def show_failure(f: Failure) -> None:
    (st.warning if f.kind == "unavailable" else st.error)(f.message)


def show_ablation(data: bytes, units: Sequence[int], view: np.ndarray, key: str) -> None:
    """The ``ablate`` answer for ``units`` on the image ``data`` (the server's cached unit maps: no
    second forward): probabilities before/after and the change per class, and the class map of a
    chosen class after silencing, drawn over ``view``; a failure in words."""
    from ui import logic, render

    res = explain(data, unit_maps="none", ablate=units)
    if isinstance(res, Failure):
        show_failure(res)
        return
    ab = res.ablation
    if ab is None:
        st.error("The server answered without the ablation (an older server?).")
        return
    st.markdown(f"**Silenced:** unit{'s' if len(ab.units) > 1 else ''} {', '.join(map(str, ab.units))} · "
                f"prediction {res.prediction} \u2192 {ab.prediction}")
    st.dataframe(logic.ablation_rows(res), hide_index=True, key=f"{key}_table")
    cls = st.radio("Class map after silencing", res.classes, horizontal=True,
                   index=res.classes.index(ab.prediction), key=f"{key}_class")
    after = render.heat_overlay(render.fit(view, 320), ab.class_maps[res.classes.index(cls)], vmin=0, vmax=1,
                                alpha=0.5)
    st.image(after, width=int(min(300, 300 * after.shape[1] / after.shape[0])), output_format="JPEG",
             caption=f"P({cls}) per position with the units silenced (blue 0, red 1)")


def timed_explain(data: bytes, **kw):
    """:func:`explain` with a spinner, recording the wall time in :attr:`Session.explain_ms`."""
    t0 = time.perf_counter()
    with st.spinner("Explaining the image..."):
        out = explain(data, **kw)
    session().explain_ms = (time.perf_counter() - t0) * 1000
    return out


# -- warm-up --------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _warm_up() -> threading.Thread:
    def work() -> None:
        try:
            import pandas  # noqa: F401 - tables
            import plotly.graph_objects as go

            import deepminer.atlas  # noqa: F401 - the atlas and its arrays
            import deepminer.labels  # noqa: F401 - SQLAlchemy
            import deepminer.client  # noqa: F401 - requests
            from deepminer.concepts import birads_terms
            from deepminer.data.io import load_image  # noqa: F401 - PIL and pydicom decoders
            from deepminer.data.tissue import tissue_mask
            from ui import render

            go.Figure(go.Bar(x=[0.0])).to_plotly_json()
            render.colorize(np.zeros((2, 2), np.float32))
            tissue_mask(np.zeros((64, 64), np.float32))
            birads_terms()
            client_of(base_settings()).warm_up()  # in process: the model loaded now
        except Exception:  # noqa: BLE001 - warming is best effort; the real call reports problems
            pass

    t = threading.Thread(target=work, name="deepminer-warm-up", daemon=True)
    t.start()
    return t


def warm_up() -> None:
    """Import and initialise what the first explanation needs (plotly, colour maps, tissue masks,
    the BI-RADS vocabulary) in a background thread, once per process, so the first upload is quick."""
    _warm_up()
