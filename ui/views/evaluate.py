"""Evaluate: how well the served model's saliency maps point at a lesion. One image against your
outline (or a mask file), or a set (a zip upload, a lab folder, the bundled phantoms) with intervals,
charts and exports. The metrics, baselines and intervals are the engine's (:mod:`ui.evaluate`)."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import streamlit as st

from deepminer.errors import DeepMinerError
from deepminer.evaluation.masks import read_lesion
from deepminer.explanation import normalize_map
from ui import evaluate as ev
from ui import logic, render, state, widgets

CANVAS_MAX = (420, 520)  # width, height in CSS pixels
K = state.Keys
ONE, SET = "One image, your outline", "A set of images with masks"
TARGETS = {"prediction": "the predicted class", "label": "the image's label (when it names a class)"}

st.title("Evaluate explanations")
st.caption("How well each saliency map of the model being served points at the lesion: AUPRC, pointing game, "
           "IoU (Otsu), Dice, relevance mass, inside the breast; random and tissue-prior maps are the floor. "
           "Metrics: `deepminer.evaluation` (docs/evaluation.md).")
mode = st.radio("Evaluate", [ONE, SET], horizontal=True, key=K.EVAL_MODE, label_visibility="collapsed")
sess = state.session()


def _names() -> dict[str, str]:
    return dict(ev.METHOD_NAMES)


def _model_note(model: dict | None) -> None:
    p = ev.provenance(model)
    st.caption(f"Model `{render.md_escape(p.get('model') or state.settings().model)}` · weights sha256 "
               f"`{p.get('weights_sha256') or 'unknown'}` · trained on "
               f"{render.md_escape(p.get('trained_on') or 'not recorded')}")
    if "warning" in p:
        st.warning(p["warning"])


# == one image ======================================================================================

def one_image() -> None:
    ref = state.image()
    if ref is None:
        st.info("Choose an image on the Explain page first, then outline the finding here.")
        st.page_link("views/explain.py", label="Go to Explain", icon=":material/image_search:")
        return
    state.prefetch(ref)
    with st.spinner("Explaining the image..."):
        exp = state.explain(ref.data)
    img = state.decoded(ref)
    if img is None:
        return
    if isinstance(exp, state.Failure):
        state.show_failure(exp)
        return
    if banner := logic.domain_banner(exp.model, exp.domain):
        st.error(banner, icon="⚠️")
    view = img.preview
    classes = list(exp.classes)
    c1, c2 = st.columns([2, 3])
    cls = c1.selectbox("Explained class", classes, index=classes.index(exp.prediction),
                       key=K.of_image(K.EVAL_CLASS, ref), help="Default: the prediction.")
    fast = c2.toggle("Also the gradient peers (Grad-CAM, Grad-CAM++, guided backprop)", value=True, key=K.EVAL_PEERS)
    slow = c2.toggle("...and integrated gradients, SmoothGrad (slow)", value=False, key=K.EVAL_PEERS_SLOW,
                     help="Many passes of the model each: about a minute for both at 1024 px on a 2-core CPU.")
    peers = [m for m in ev.PEERS if (m in ev.PEERS_SLOW and slow) or (m not in ev.PEERS_SLOW and fast)]
    left, right = st.columns([5, 6], gap="medium")
    with left:
        h, w = view.shape[:2]
        sent, m = widgets.draw_mask(view, (h, w), tools=("Free draw", "Rectangle", "Polygon"),
                                    tool_label="Outline with", tool_key=K.EVAL_TOOL,
                                    tool_help="Free draw: paint over the finding. Rectangle: drag. Polygon: click "
                                              "the corners, then the first one again.",
                                    key=K.of_image("eval_canvas", ref), rgb=(57, 255, 20), max_size=CANVAS_MAX,
                                    brush=14)
        if sent:
            sess.eval_outline, sess.eval_outline_for = (m, ref.digest) if m is not None else (None, None)
        up = st.file_uploader("...or upload a lesion mask (PNG/TIFF; non-zero = lesion; resized to the image)",
                              type=["png", "tif", "tiff"], key=K.of_image(K.EVAL_MASK, ref))
    outline = sess.eval_outline if sess.eval_outline_for == ref.digest else None
    if up is not None:
        try:
            outline = read_lesion(up.getvalue(), (h, w), resize=True)
        except DeepMinerError as err:
            right.error(f"Mask refused: {render.md_escape(err)}")
            return
        if not outline.any():
            right.error("The mask has no lesion pixel (every pixel is 0).")
            return
    with right:
        if outline is None:
            st.info("Outline the finding on the image (or upload its mask) to score every map against it.")
            return
        try:
            scene = ev.Scene.make(view, outline)
        except DeepMinerError as err:
            st.error(render.md_escape(err))
            return
        if not scene.scorable:
            st.error("The outline has no pixel inside the breast: nothing can be scored.")
            return
        t0 = time.perf_counter()
        maps = {**ev.one_pass_maps(exp, cls), **ev.baseline_maps(scene.tissue, exp.cam.shape[1:], ev.seed_of(ref.digest))}
        scores = ev.score_maps(maps, scene)
        slot = st.empty()
        took = f"{(time.perf_counter() - t0) * 1000:.0f} ms"
        _show_scores(slot, scores, maps, scene, took)
        if peers:
            for i, batch in enumerate(ev.requests_for(peers)):
                # a long job (progress, Cancel; the server stops it at its next step)
                got = state.explain_methods_job(ref.data, batch, target=cls, key=f"eval_peers_{i}")
                if got == state.CANCELLED:
                    st.warning(f"Cancelled: {', '.join(ev.method_name(m) for m in batch)} not computed "
                               "(the model server stopped at its next step).")
                    st.button("Compute again", key=f"eval_peers_{i}_again", on_click=state.forget_job,
                              args=(ref.data, batch, cls))
                    break
                if isinstance(got, state.Failure):
                    state.show_failure(got)
                    break
                extra = {m: got.method_maps[m] for m in batch if m in got.method_maps}
                maps.update(extra)
                scores.update(ev.score_maps(extra, scene))
                _show_scores(slot, scores, maps, scene, took)
    _model_note(exp.model)


def _show_scores(slot, scores: dict, maps: dict, scene: ev.Scene, took: str) -> None:
    rows = ev.ranked_rows(scores)
    with slot.container():
        st.subheader(f"Scores against your outline: {len(rows) - len(ev.BASELINES)} maps + 2 baselines")
        st.caption(f"CAM and probability map scored in {took}")  # (every redraw: the same elements)
        st.dataframe([{k: v for k, v in r.items() if k != "key"} for r in rows], hide_index=True,
                     key=None, column_config={"baseline": st.column_config.CheckboxColumn("baseline")})
        small = render.fit(scene.pixels, 200)
        tiles, caps = [], []
        for r in rows:
            heat = render.heat_overlay(small, maps[r["key"]], alpha=0.5)
            tiles.append(render.mask_overlay(heat, scene.lesion, color=(57, 255, 20), alpha=0.0))
            a = "n/a" if r["AUPRC"] is None else f"{r['AUPRC']:.2f}"
            caps.append(f"{r['method']} · AUPRC {a} · {r['pointing'] or '-'} · IoU "
                        f"{'n/a' if r['IoU'] is None else format(r['IoU'], '.2f')}")
        st.image(tiles, caption=caps, width=150, output_format="JPEG")
        st.caption("Green outline: your ground truth. Sorted best AUPRC first; the baselines are the floor.")


# == a set ==========================================================================================

def _limit_mb() -> int:
    from deepminer.data.uploads import MAX_UPLOAD_BYTES

    return min(int(st.get_option("server.maxUploadSize")), MAX_UPLOAD_BYTES // 2**20)


def _set_eval_set(new: ev.EvalSet | None) -> None:
    old = sess.eval_set
    if isinstance(old, ev.EvalSet):
        old.cleanup()
    sess.eval_set = new


def _extract(name: str, data: bytes) -> ev.EvalSet:
    from deepminer.data.uploads import extract_eval_zip

    digest = hashlib.sha256(data).hexdigest()
    tmp = Path(tempfile.mkdtemp(prefix="deepminer-eval-"))
    try:
        items, skipped = extract_eval_zip(data, tmp / "set")
    except DeepMinerError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        return ev.EvalSet([], [], f"zip {name} (sha256 {digest})", "zip", digest, error=str(err).splitlines()[0])
    except Exception as err:  # noqa: BLE001 - an untrusted upload: one line, never a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        return ev.EvalSet([], [], f"zip {name}", "zip", digest, error=f"cannot read the zip ({type(err).__name__})")
    return ev.EvalSet(items, skipped, f"zip {name} (sha256 {digest})", "zip", digest, tmp)


def _on_zip() -> None:
    f = st.session_state.get(K.EVAL_ZIP)
    _set_eval_set(_extract(f.name, f.getvalue()) if f is not None else None)
    sess.eval_run = None


def _folder_set(folder: Path, kind: str, source: str) -> ev.EvalSet:
    from deepminer.data.uploads import folder_items

    try:
        items, skipped = folder_items(folder)
    except DeepMinerError as err:
        return ev.EvalSet([], [], source, kind, error=str(err).splitlines()[0])
    return ev.EvalSet(items, skipped, source, kind)


def _on_cancel() -> None:
    run = sess.eval_run
    if isinstance(run, ev.SetRun):
        run.cancel()
        state.client().cancel_group(run.group)  # the image in flight stops at the server's next step


def _start(es: ev.EvalSet, methods: tuple[str, ...], target: str) -> str | None:
    """Start a run over ``es`` (a zip extracted again when its folder was removed); why not, or None."""
    if not es.available and es.kind == "zip":  # its folder was removed after the last run: extract again
        f = st.session_state.get(K.EVAL_ZIP)
        if f is None:
            return "The zip is gone (a new session or page): upload it again."
        _set_eval_set(_extract(f.name, f.getvalue()))
        es = sess.eval_set
        if es.error:
            return es.error
    ds = {"source": es.source, "kind": es.kind, "sha256": es.sha256, "images": len(es.items),
          "skipped": [{"name": s.name, "reason": s.reason} for s in es.skipped]}
    sess.eval_run = ev.SetRun(list(es.items), methods, target, ds)
    return None


def _callers(group: str | None = None):
    """``predict(data)`` and ``explain_methods(data, methods, target)`` that touch no Streamlit (thread-safe);
    the ``/explanations`` calls are jobs of ``group`` (:mod:`deepminer.jobs`: the client touches each
    while it waits, Cancel stops the group)."""
    from deepminer.options import ExplainOptions

    s = state.settings()
    # what scoring needs: the maps and the breast region the server used (no unit maps)
    opts = ExplainOptions.build(max_side=s.max_side, unit_maps="none", tissue_mask=True)
    c = state.client()
    # a set is a long job: its calls go to the model's heavy pool (deepminer.client.heavy_pool), the
    # other pages' requests never wait behind it
    return (lambda d: c.explain(d, opts, heavy=True),
            lambda d, m, t: c.explain_methods(d, m, target=t, options=opts, group=group))


@st.cache_resource(show_spinner=False)
def _pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(ev.AHEAD, thread_name_prefix="deepminer-eval")


def _stop_reason(err: Exception) -> str | None:
    """Why an image's error stops the whole run (the words for the page), or None when it is only that
    image's problem: a refused image is; the server gone, failing, refusing the key or not hosting
    the model stops the run."""
    from deepminer.client import ServeError

    f = state.failure_of(err)
    if isinstance(err, (DeepMinerError, ServeError)) and f is not None:
        status = getattr(err, "status", 400)
        return f.message if f.kind == "unavailable" or status >= 500 or status in (401, 404) else None
    if f is not None and f.kind == "unavailable":
        return f.message
    return f"The run stopped: {type(err).__name__}: {render.md_escape(err)}"


def _advance(run: ev.SetRun, bar) -> None:
    """Process the rest of the run (:class:`ui.evaluate.SetScheduler`), the progress bar drawn as it
    goes. A click (Cancel or any widget) stops this script at its next Streamlit call (the bar);
    what was done is kept in ``run`` and the next rerun carries on (or stops, when cancelled)."""
    predict, explain_methods = _callers(run.group)

    def work(item, answered):
        return ev.score_item(item, run.methods, run.target, predict, explain_methods, answered)

    def progress(r: ev.SetRun) -> None:
        eta = ev.eta_s(r.done, r.total, r.elapsed_s)
        bar.progress(r.done / r.total, text=f"{r.done} of {r.total} images · {r.elapsed_s:.1f} s"
                     + (f" · about {eta:.0f} s left" if eta else ""))

    try:
        ev.SetScheduler(_pool(), work, stop_reason=_stop_reason).advance(run, progress)
    except BaseException as stop:
        # the browser tab went away (Streamlit stops the script; a click reruns it instead): the calls in
        # flight are cancelled at the server, and a reconnected page carries the run on from its last image
        if type(stop).__name__ == "StopException":
            state.client().cancel_group(run.group)
        raise


def _finish(run: ev.SetRun, cases: list) -> None:
    """After a run: the best/worst cases' thumbnails (their files decoded now, once), then the
    extracted zip removed (Run extracts it again)."""
    if run.running:
        return
    es = sess.eval_set
    by_id = {it.image_id: it for it in run.items}
    for r in cases:
        if r.image_id not in run.thumbs and r.saliency is not None and r.image_id in by_id:
            try:
                run.thumbs[r.image_id] = ev.thumb_of(by_id[r.image_id], r.saliency)
            except (OSError, DeepMinerError):  # the files are gone (a new zip): no picture, the numbers stay
                pass
    if isinstance(es, ev.EvalSet) and es.kind == "zip" and es.sha256 == run.dataset.get("sha256"):
        es.cleanup()  # the zip this run read, not one uploaded since


@st.cache_resource(show_spinner=False)
def _warm() -> bool:
    """Import what a run needs once per process, before Run is clicked (not inside the timed run)."""
    import deepminer.data.io  # noqa: F401 - the decoder
    import deepminer.evaluation.localization  # noqa: F401 - the metrics
    import deepminer.evaluation.methods  # noqa: F401 - the baselines
    import deepminer.evaluation.stats  # noqa: F401 - the intervals
    from deepminer.data.tissue import tissue_mask

    tissue_mask(np.zeros((64, 64), np.float32))
    # plotly's figure classes and the colour map build their tables on first use (~0.3 s)
    import plotly.io as pio

    from deepminer.evaluation.localization import RECALL_GRID

    row = {"method": "cam", "metric": "auprc", "mean": 0.5, "lo": 0.4, "hi": 0.6, "baseline": False}
    for fig in (render.metric_interval_bars([row], "auprc"), render.pr_lines({"cam": RECALL_GRID}, RECALL_GRID)):
        pio.to_json(fig)
    render.heat_overlay(np.zeros((8, 8), np.float32), np.zeros((2, 2), np.float32))
    return True


def a_set() -> None:
    _warm()
    s = state.settings()
    sources = ["Upload a zip"] + (["Lab folder on the server"] if s.eval_folder else []) + ["Bundled phantom test set"]
    source = st.radio("Images", sources, horizontal=True, key=K.EVAL_SOURCE)
    es = sess.eval_set if isinstance(sess.eval_set, ev.EvalSet) else None
    if source == "Upload a zip":
        limit = _limit_mb()
        st.file_uploader(f"A zip of images with lesion masks (at most {limit} MB)", type=["zip"], key=K.EVAL_ZIP,
                         on_change=_on_zip)
        st.caption("Two layouts: **a dataset folder** (`manifest.csv` with the columns `image`, `lesion_mask`, "
                   "optionally `label`; as `deepminer phantoms` and `deepminer import-cbis` write it), or **`images/` + `masks/`** with the same "
                   "stems (`images/a.png` + `masks/a.png`; non-zero mask pixels are lesion; a mask must have its "
                   "image's size). Either may sit inside one top-level folder. Normal images (no mask) are skipped.")
        if es is not None and es.kind != "zip":
            es = None
    elif source == "Lab folder on the server" and s.eval_folder is not None:
        if es is None or es.kind != "folder":
            es = _folder_set(s.eval_folder, "folder", f"folder {s.eval_folder}")
            _set_eval_set(es)
    else:
        if es is None or es.kind != "bundled":
            state.samples()  # made on first use
            es = _folder_set(s.samples, "bundled", "bundled phantoms")
            _set_eval_set(es)
    if es is None:
        return
    if es.error:
        st.error(f"Cannot use this set: {render.md_escape(es.error)}")
        return
    st.markdown(f"**{len(es.items)} image(s) with a mask** in {render.md_escape(es.source)}")
    if es.skipped:
        with st.expander(f"Skipped: {len(es.skipped)}", expanded=True):
            st.markdown("\n".join(f"- **{render.md_escape(x.name)}**: {render.md_escape(x.reason)}"
                                   for x in es.skipped))
    if not es.items:
        return
    c1, c2 = st.columns([3, 2])
    with c1:
        st.markdown("Methods: **CAM and probability map** (one `/predictions` call per image)")
        chosen = st.multiselect("Add the gradient peers (`/explanations`, slower)", list(ev.PEERS), default=[],
                                key=K.EVAL_SET_PEERS, format_func=ev.method_name)
    target = c2.selectbox("Explained class", list(TARGETS), format_func=TARGETS.get, key="eval_set_target")
    run = sess.eval_run if isinstance(sess.eval_run, ev.SetRun) else None
    b1, b2 = st.columns([1, 5])
    if b1.button("Run", type="primary", key=K.EVAL_RUN, disabled=run is not None and run.running):
        problem = _start(es, tuple(["cam", "class_map", *chosen]), target)
        if problem:
            st.error(render.md_escape(problem))
        run = sess.eval_run
    if run is not None and run.running:
        cancel, bar = b2.empty(), st.empty()
        cancel.button("Cancel", key=K.EVAL_CANCEL, on_click=_on_cancel)
        bar.progress(run.done / max(1, run.total), text=f"{run.done} of {run.total} images")
        _advance(run, bar)
        cancel.empty()  # the results follow in this same run (a rerun would draw the page again first)
        bar.empty()
    if run is not None:
        _results(run)


def _results(run: ev.SetRun) -> None:
    from deepminer.evaluation.localization import RECALL_GRID

    if run.error:
        st.error(run.error)
    if run.cancelled:
        st.warning(f"Cancelled after {run.done} of {run.total} images: the results below are partial.")
    scored = [r for r in run.records if r.scores]
    best, worst = ev.best_worst(scored)
    _finish(run, best + worst)
    per = run.elapsed_s / max(1, run.done)
    st.caption(f"Evaluated {run.done} images in {run.elapsed_s:.2f} s ({per * 1000:.0f} ms per image; "
               f"{run.request_s:.2f} s waiting for the model server)")
    problems = [r for r in run.records if r.problem]
    if problems:
        st.dataframe([{"image": r.image_id, "not scored": r.problem} for r in problems], hide_index=True,
                     key="eval_problems")
    if not scored:
        st.info("No image was scored yet.")
        return
    _model_note(run.model)
    st.caption(f"Data set: {render.md_escape(run.dataset['source'])}")
    summary = ev.summary_rows(scored)
    st.subheader(f"Summary over {len(scored)} images (mean [95% bootstrap interval])")
    st.dataframe(ev.summary_table(summary), hide_index=True, key="eval_summary")
    cl = ev.classification(run.records)
    if cl:
        st.subheader(f"How right the model was on these {cl['n']} images (whole image)")
        metric_rows, confusion_rows = ev.classification_rows(cl)
        c1, c2 = st.columns([3, 2])
        c1.dataframe(metric_rows, hide_index=True, key="eval_classification")
        c2.dataframe(confusion_rows, hide_index=True, key="eval_confusion")
        st.caption("From the probabilities of each image's explanation. Brackets: 95% bootstrap interval over "
                   "images, only when every class has at least 10 images; confusion rows are the truth.")
        note = ev.ece_note(cl)
        if note:
            st.caption(note)
    cols = st.columns(3)
    for i, metric in enumerate(ev.METRICS):
        cols[i % 3].plotly_chart(render.metric_interval_bars(summary, metric, _names()), key=f"eval_bars_{metric}")
    cols[len(ev.METRICS) % 3].plotly_chart(render.pr_lines(ev.mean_pr(scored), RECALL_GRID, _names(), ev.BASELINES),
                                           key="eval_pr")
    cases = []
    if best:
        st.subheader("Best and worst cases (CAM AUPRC)")
        tiles, caps = [], []
        for tag, group in (("best", best), ("worst", worst)):
            for r in group:
                t = run.thumbs.get(r.image_id)
                if t is None:
                    continue
                heat = render.heat_overlay(t.pixels, t.cam, alpha=0.45)
                tiles.append(render.mask_overlay(heat, t.lesion, color=(57, 255, 20), alpha=0.0))
                auprc = r.score("cam", run.view, "auprc")
                caps.append(f"{tag}: {r.image_id} · AUPRC {auprc:.2f}")
                cases.append({"title": f"{tag}: {r.image_id}", "image": t.pixels, "lesion": t.lesion,
                              "saliency": normalize_map(t.cam, 0.0), "subtitle": f"AUPRC {auprc:.2f}"})
        if tiles:
            st.image(tiles, caption=caps, width=150, output_format="JPEG")
            st.caption("Green outline: the ground truth; heat: the CAM of the explained class.")
    st.subheader("Export")
    d1, d2, d3 = st.columns(3)
    d1.download_button("Per-image CSV", ev.per_image_csv(run.records), file_name="evaluation-per-image.csv",
                       mime="text/csv", key="eval_csv", on_click="ignore")
    report = ev.report_json(summary, {**run.settings(), "evaluated_by": state.annotator() or None},  # who ran it
                            classification=cl)
    d2.download_button("Summary JSON", report, file_name="evaluation-summary.json",
                       mime="application/json", key="eval_json", on_click="ignore")
    records = list(run.records)

    def figures() -> bytes:
        tmp = Path(tempfile.mkdtemp(prefix="deepminer-figs-"))
        try:
            return ev.figures_zip(records, summary, cases, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    d3.download_button("Figures (PNG, zip)", figures, file_name="evaluation-figures.zip", mime="application/zip",
                       key="eval_png", on_click="ignore")


try:
    if mode == ONE:
        one_image()
    else:
        a_set()
except DeepMinerError as err:
    st.error(render.md_escape(str(err).splitlines()[0] if str(err) else type(err).__name__))
