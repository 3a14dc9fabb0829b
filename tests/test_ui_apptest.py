"""The workbench pages under Streamlit's AppTest, on a real tiny model, a real atlas and a real SQLite
label store (explanations in-process: ``DEEPMINER_BACKEND=local``, the same ``Explanation`` the HTTP
client returns). The canvas is an unknown element to AppTest: the sketch is set in session state
here and drawn for real in ``test_ui_browser.py``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from apptest import run_app as _app
from apptest import sample_png as _png


def _texts(at) -> str:
    parts = [e.value for e in at.markdown] + [e.value for e in at.text] + [e.value for e in at.caption]
    parts += [e.value for e in at.subheader] + [e.value for e in at.title]
    parts += [e.value for e in at.error] + [e.value for e in at.warning] + [e.value for e in at.info]
    parts += [e.value for e in at.success]
    return "\n".join(str(p) for p in parts)


def _captions(at) -> list[str]:
    return [c for im in at.get("image") for c in im.captions]


def _sess(at):
    """The session's typed state (:class:`ui.state.Session`)."""
    from ui.state import SESSION_KEY

    return at.session_state[SESSION_KEY]


def _key(env):
    from deepminer.atlas import Atlas

    return "demo", Atlas.load(Path(env["model_dir"]) / "atlas").meta["model"]["weights_sha256"]


def _figure(at, key: str):
    """The plotly figure drawn with ``key``."""
    import plotly.io as pio

    for el in at.get("plotly_chart"):
        if el.proto.id.endswith(f"-{key}"):
            return pio.from_json(el.proto.spec)
    raise AssertionError(f"no plotly chart {key!r} in {[el.proto.id for el in at.get('plotly_chart')]}")


def _bars(at, key: str) -> dict[str, float]:
    """The values of a horizontal bar chart drawn with ``key``: {label: value}."""
    bar = _figure(at, key).data[0]
    return {str(y): float(x) for y, x in zip(bar.y, bar.x)}


# -- Explain --------------------------------------------------------------------------------------

def test_explain_upload_sample_recent_and_cam_switch(app_env):
    at = _app()
    assert "Upload an image or pick a sample" in _texts(at)
    name, data = _png(app_env, 0)
    at.file_uploader(key="upload").upload(name, data, "image/png").run()
    assert not at.exception, at.exception
    text = _texts(at)
    assert "Prediction: " in text and "DeepMiner explanation" in text
    # the sentence is the library's, for this image and (no) labels
    from deepminer.client import local_explain

    res = local_explain(Path(app_env["model_dir"]) / "model.pt", data, max_side=512, name="demo")
    assert f"Prediction: {res.prediction} ({res.probabilities[res.prediction]:.2f})" in text
    # every prediction says what the model was trained on (this test model's checkpoint does not say)
    from ui.logic import trained_on_note

    assert trained_on_note(res.model) in [c.value for c in at.caption] and "not recorded" in trained_on_note(res.model)
    # and the scale it was explained at, and how (issue 21)
    assert any(c.value.startswith("Explained at ") and "px (" in c.value for c in at.caption), _captions(at)
    sentence = [t.value for t in at.text]
    assert sentence == [f"{res.prediction.capitalize()} ({res.probabilities[res.prediction]:.2f}): none of its 8 "
                        "most influential units is labelled yet."]
    # CAM class switch changes the overlay caption (a class predicted for neither this image nor the
    # sample picked below); the choice holds over a rerun (the other radio's)
    from ui.state import Keys

    ref = _sess(at).image
    _, data2 = _png(app_env, 1)
    res2 = local_explain(Path(app_env["model_dir"]) / "model.pt", data2, max_side=512, name="demo")
    other = next(c for c in res.classes if c not in (res.prediction, res2.prediction))
    assert at.radio(key=Keys.of_image(Keys.CAM_CLASS, ref)).value == res.prediction
    at.radio(key=Keys.of_image(Keys.CAM_CLASS, ref)).set_value(other).run()
    at.radio(key=Keys.of_image(Keys.PROB_CLASS, ref)).set_value(other).run()
    assert at.radio(key=Keys.of_image(Keys.CAM_CLASS, ref)).value == other
    assert any(c.startswith(f"CAM of {other}") for c in _captions(at)), _captions(at)
    assert f"P({other}) per position (blue 0, red 1)" in _captions(at)
    probs = _bars(at, "probs")
    assert probs == pytest.approx({c: res.probabilities[c] for c in res.classes}, abs=1e-6)
    # suspicious patches: a table, and the most influential units with maps
    assert "Suspicious patches" in _texts(at)
    assert f"Most influential units for {res.prediction}" in _texts(at)
    assert [c for c in _captions(at) if c.startswith("unit ")] == [f"unit {u}" for u in res.top_units[res.prediction]]
    # a sample: its radios start at its own prediction; then back to the recent upload, whose radios
    # start at its prediction again (a choice holds only while the image stays)
    sample = at.selectbox(key="sample")
    assert len(sample.options) == 2
    sample.select(sample.options[1]).run()
    assert not at.exception
    ref2 = _sess(at).image
    assert "P00000_R_MLO" in ref2.name and ref2.data == data2
    assert at.radio(key=Keys.of_image(Keys.CAM_CLASS, ref2)).value == res2.prediction
    assert at.radio(key=Keys.of_image(Keys.PROB_CLASS, ref2)).value == res2.prediction
    assert any(c.startswith(f"CAM of {res2.prediction}") for c in _captions(at)), _captions(at)
    recent = at.selectbox(key="recent_pick")
    assert recent.options == [name]
    recent.select(name).run()
    assert _sess(at).image.name == name
    assert at.radio(key=Keys.of_image(Keys.CAM_CLASS, ref)).value == res.prediction


def test_explain_bad_upload_and_server_down_are_messages(app_env, monkeypatch):
    at = _app()
    at.file_uploader(key="upload").upload("notes.png", b"definitely not an image", "image/png").run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and "Cannot read notes" in errors[0] and "\n" not in errors[0]

    from serve.launch import free_port

    monkeypatch.setenv("DEEPMINER_BACKEND", "serve")
    monkeypatch.setenv("DEEPMINER_SERVE_URL", f"http://127.0.0.1:{free_port()}")
    import streamlit as st

    st.cache_resource.clear()
    at = _app()
    name, data = _png(app_env, 0)
    at.file_uploader(key="upload").upload(name, data, "image/png").run()
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert any("TorchServe is not reachable at http://127.0.0.1:" in w for w in warnings), warnings


# -- Sketch & label -------------------------------------------------------------------------------

def _with_image(app_env, page: str | None = None, annotator: str | None = "alice", i: int = 0):
    at = _app(annotator=annotator)
    name, data = _png(app_env, i)
    at.file_uploader(key="upload").upload(name, data, "image/png").run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(page).run()
        assert not at.exception, at.exception
    return at, data


def test_sketch_ranks_units_by_iou_and_labels_several_at_once(app_env):
    from deepminer.atlas import Atlas
    from deepminer.explain.sketch import sketch_at
    from deepminer.explain.units import mask_iou, unit_masks
    from deepminer.labels import LabelStore
    from deepminer.client import local_explain
    from ui.logic import rect_mask

    # bob already used a label with HTML in it: it is in the dropdown (AppTest cannot type a new
    # option into a selectbox; the browser test types one)
    model, weights = _key(app_env)
    store = LabelStore(app_env["url"])
    store.set_labels(model, weights, [0], "<b>Spiculated</b> margin", "bob")
    at, data = _with_image(app_env, "views/sketch.py")
    assert "Draw a rectangle" in _texts(at)
    digest = _sess(at).image.digest
    pixels_shape = (256, 151)
    sketch = rect_mask(pixels_shape, (20, 60, 110, 170))
    _sess(at).sketch, _sess(at).sketch_for = sketch, (digest, None)
    at.run()
    assert not at.exception, at.exception
    assert "Units ranked by IoU" in _texts(at)

    # the ranking is the library's IoU of the sketch with each unit's binarized map
    atlas = Atlas.load(Path(app_env["model_dir"]) / "atlas")
    res = local_explain(Path(app_env["model_dir"]) / "model.pt", data, sketch=sketch, unit_maps="all",
                        max_side=512, name="demo")
    table = at.dataframe[0].value  # the ranked units
    assert list(table["unit"]) == [int(u) for u in np.lexsort((np.arange(res.sketch_iou.size), -res.sketch_iou))[:12]]
    best = int(table["unit"].iloc[0])
    h, w = res.input["height"], res.input["width"]
    size = sketch_at(sketch, (h, w)).shape
    independent = mask_iou(unit_masks(res.unit_maps[best][None], atlas.thresholds[[best]], size)[0],
                           sketch_at(sketch, size))
    assert table["IoU"].iloc[0] == pytest.approx(independent, abs=2e-3)

    # label two units at once; the label carries HTML and comes back as text
    units = [int(u) for u in table["unit"] if u != 0][:2]
    at.multiselect(key="label_units").set_value(units)
    at.selectbox(key="label_concept").set_value("<b>Spiculated</b> margin")
    at.button(key="FormSubmitter:label_form-Label the selected units").click().run()
    assert not at.exception, at.exception
    assert any("Labelled 2 unit(s)" in s.value for s in at.success), [s.value for s in at.success]
    assert store.labels_for(model, weights) == {u: "<b>Spiculated</b> margin" for u in [0, *units]}
    assert {r.unit: r.annotator for r in store.history()} == {0: "bob", units[0]: "alice", units[1]: "alice"}
    units = [0, *units]
    # the unit map colours labelled units: a trace named after the label holds exactly those units
    fig = _figure(at, "unit_map")
    traces = {t.name: sorted(int(c[0]) for c in t.customdata) for t in fig.data}
    assert traces["&lt;b&gt;Spiculated&lt;/b&gt; margin"] == sorted(units)
    # the Lu & Perer reports: mean max activation and mean IoU of the label's units
    act = _bars(at, "sk_bars_act")
    iou = _bars(at, "sk_bars_iou")
    assert act["&lt;b&gt;Spiculated&lt;/b&gt; margin"] == pytest.approx(float(np.mean(res.unit_max[units])), rel=1e-3)
    assert iou["&lt;b&gt;Spiculated&lt;/b&gt; margin"] == pytest.approx(float(np.mean(res.sketch_iou[units])), abs=1e-3)


def test_sketch_needs_an_annotator_and_units(app_env):
    from deepminer.labels import LabelStore

    at, _ = _with_image(app_env, "views/sketch.py", annotator=None)
    at.multiselect(key="label_units").set_value([1])
    at.selectbox(key="label_concept").set_value("Spiculated margin")
    at.button(key="FormSubmitter:label_form-Label the selected units").click().run()
    assert not at.exception
    assert any("Enter your name" in w.value for w in at.warning)
    at.session_state["annotator"] = "bob"  # (the sidebar field; AppTest runs a switched-to page alone)
    at.multiselect(key="label_units").set_value([])
    at.button(key="FormSubmitter:label_form-Label the selected units").click().run()
    assert any("Select at least one unit" in e.value for e in at.error)
    assert LabelStore(app_env["url"]).history() == []


def test_suspicious_patch_clicked_on_explain_goes_to_sketch(app_env):
    at, data = _with_image(app_env)
    rows = at.dataframe[0].value  # the suspicious patches, most suspicious first
    assert list(rows["#"]) == list(range(1, len(rows) + 1)) and len(rows) > 1
    assert list(rows["P(malignant)"]) == sorted(rows["P(malignant)"], reverse=True)
    # click the second row: the patch is outlined (highlighted) and can be taken to the canvas
    from ui.state import Keys

    ref = _sess(at).image
    at.session_state[Keys.of_image(Keys.PATCHES_TABLE, ref)] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    assert _sess(at).patch_pick == 1
    assert "patch 2" in _captions(at)
    at.button(key="to_sketch").click().run()
    assert not at.exception, at.exception
    box = _sess(at).patch
    assert box is not None and box[2] - box[0] == round(0.25 * 151)
    at.switch_page("views/sketch.py").run()
    assert not at.exception, at.exception
    target = at.selectbox(key=Keys.of_image(Keys.TARGET, ref))
    assert target.value == box and target.options[0].startswith("Whole image")
    assert _sess(at).patch == box
    # and back to the whole image
    assert target.format_func(target.value) == target.options[target.index]
    target.select("whole image").run()
    assert _sess(at).patch is None
    assert at.selectbox(key=Keys.of_image(Keys.TARGET, ref)).value == "whole image"
    # a new image resets what belonged to the old one (the typed session state, one list)
    at.selectbox(key=Keys.of_image(Keys.TARGET, ref)).select(box).run()
    sess = _sess(at)
    assert sess.patch == box
    sess.sketch, sess.sketch_for = np.ones((4, 4), bool), (ref.digest, box)
    at.switch_page("views/explain.py").run()
    at.selectbox(key="sample").select(at.selectbox(key="sample").options[1]).run()
    assert not at.exception, at.exception
    sess = _sess(at)
    assert sess.image.digest != ref.digest
    assert (sess.patch, sess.patch_pick, sess.sketch, sess.sketch_for) == (None, None, None, None)


def test_explanation_names_labelled_units_and_reports_by_label(app_env):
    from deepminer.labels import LabelStore
    from deepminer.client import local_explain

    name, data = _png(app_env, 0)
    res = local_explain(Path(app_env["model_dir"]) / "model.pt", data, max_side=512, name="demo")
    top = res.top_units[res.prediction]
    model, weights = _key(app_env)
    store = LabelStore(app_env["url"])
    store.set_labels(model, weights, top[:2], "Spiculated margin", "alice")
    store.set_labels(model, weights, [top[3]], "calc *cluster*", "bob")
    at, _ = _with_image(app_env)
    p = res.probabilities[res.prediction]
    assert [t.value for t in at.text] == [f"{res.prediction.capitalize()} ({p:.2f}): most influenced by units "
                                          "labelled Spiculated margin, calc *cluster*."]
    act = _bars(at, "bars_activation")
    assert act == pytest.approx({"Spiculated margin": float(np.mean(res.unit_max[top[:2]])),
                                 "calc *cluster*": float(res.unit_max[top[3]])}, rel=1e-3)
    # no sketch on this image yet: the IoU chart waits for one
    assert "Draw a sketch on the Sketch & label page" in _texts(at)
    # the influential-unit tiles carry their labels
    assert f"unit {top[0]} · Spiculated margin" in _captions(at)


# -- Unit atlas -----------------------------------------------------------------------------------

def test_atlas_gallery_source_and_survey_progress(app_env):
    from deepminer.atlas import Atlas
    from deepminer.labels import LabelStore

    atlas = Atlas.load(Path(app_env["model_dir"]) / "atlas")
    total = len({u for c in atlas.classes for u in atlas.top_units(c)})
    at = _app("views/atlas.py")
    assert not at.exception, at.exception
    progress = at.get("progress")[0].proto
    assert progress.text == f"0 of {total} labelled" and progress.value == 0
    cls = at.radio(key="atlas_class").value
    unit_box = at.selectbox(key=f"atlas_unit_{cls}")
    assert unit_box.options == [f"unit {u} - not labelled" for u in atlas.top_units(cls)]
    unit = atlas.top_units(cls)[1]
    unit_box.select(unit).run()
    assert not at.exception
    # the gallery: one tile per top patch, captioned with rank and activation
    entries = atlas.topk(unit)[:12]
    caps = [c for c in _captions(at) if c.startswith("#")]
    assert caps == [f"#{i + 1} · {e.activation:.2f}" for i, e in enumerate(entries)]
    # choosing a patch shows its source image with the patch outlined
    at.selectbox(key=f"atlas_patch_{unit}").select(3).run()
    assert f"{entries[2].image_id}: patch #3 outlined" in _captions(at)
    src = next(im for im in at.get("image") if f"{entries[2].image_id}: patch #3 outlined" in im.captions)
    assert src.proto.imgs[0].url  # an image was sent
    # the survey: recognizable, label, description, category, association, confidence
    at.radio(key=f"sv_rec_{unit}").set_value("yes")
    at.selectbox(key=f"sv_label_{unit}").set_value("Fine pleomorphic calcifications")
    at.text_area(key=f"sv_desc_{unit}").input("bright specks\\n<script>x</script>")
    at.selectbox(key=f"sv_cat_{unit}").set_value("calcification type")
    at.selectbox(key=f"sv_assoc_{unit}").set_value("malignant")
    at.slider(key=f"sv_conf_{unit}").set_value(4)
    at.button(key=f"FormSubmitter:survey_{unit}-Save the survey").click().run()
    assert not at.exception, at.exception
    assert any(f"Saved the survey of unit {unit}" in s.value for s in at.success)
    model, weights = _key(app_env)
    rec = LabelStore(app_env["url"]).current(model, weights)[0]
    assert (rec.unit, rec.label, rec.annotator, rec.recognizable, rec.description, rec.birads_category,
            rec.cancer_association, rec.confidence) == (
        unit, "Fine pleomorphic calcifications", "alice", True, "bright specks\\n<script>x</script>",
        "calcification type", "malignant", 4)
    assert at.get("progress")[0].proto.text == f"1 of {total} labelled"
    # a unit with no recognizable phenomenon counts as surveyed, without a label
    other = atlas.top_units(cls)[0]
    at.selectbox(key=f"atlas_unit_{cls}").select(other).run()
    at.radio(key=f"sv_rec_{other}").set_value("no")
    at.button(key=f"FormSubmitter:survey_{other}-Save the survey").click().run()
    assert at.get("progress")[0].proto.text == f"2 of {total} labelled"
    assert LabelStore(app_env["url"]).labels_for(model, weights) == {unit: "Fine pleomorphic calcifications"}


def test_atlas_missing_is_a_message(app_env, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPMINER_MODEL_DIR", str(tmp_path / "nothing"))
    at = _app("views/atlas.py")
    assert not at.exception
    assert any("No unit atlas at" in w.value for w in at.warning)


# -- Labels ---------------------------------------------------------------------------------------

def test_labels_history_agreement_export_and_import(app_env):
    from deepminer.labels import LabelStore

    model, weights = _key(app_env)
    store = LabelStore(app_env["url"])
    store.set_labels(model, weights, [3, 5], "mass", "alice")
    store.set_labels(model, weights, [3], "Mass", "bob")
    store.set_labels(model, weights, [5], "calcification", "bob")
    at = _app("views/labels.py")
    assert not at.exception, at.exception
    assert "Current labels (2 units)" in _texts(at)
    current, agreement, history = (df.value for df in at.dataframe)
    assert sorted(zip(current["unit"], current["annotator"], current["label"])) == [
        (3, "alice", "mass"), (3, "bob", "Mass"), (5, "alice", "mass"), (5, "bob", "calcification")]
    agr = dict(zip(agreement["unit"], agreement["pairwise agreement"]))
    assert agr == {3: 1.0, 5: 0.0}
    assert len(history) == 4
    at.selectbox(key="history_unit").select(5).run()
    assert list(at.dataframe[2].value["label"]) == ["calcification", "mass"]  # newest first
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download JSON"]

    # import: a valid file from another store adds its events; a bad one adds nothing
    other = LabelStore(f"sqlite:///{app_env['root'] / 'other.db'}")
    other.set_labels(model, weights, [7], "architectural distortion", "carol")
    at.file_uploader(key="import_file").upload("carol.csv", other.export_csv().encode(), "text/csv")
    at.button(key="FormSubmitter:import_form-Import").click().run()
    assert not at.exception, at.exception
    assert any("Imported 1 new label event(s)" in s.value for s in at.success), [s.value for s in at.success]
    assert store.labels_for(model, weights)[7] == "architectural distortion"
    bad = other.export_csv().replace(",7,", ",seven,")
    at.file_uploader(key="import_file").upload("bad.csv", bad.encode(), "text/csv")
    at.button(key="FormSubmitter:import_form-Import").click().run()
    errors = [e.value for e in at.error]
    assert errors and "Nothing imported" in errors[0] and "seven" in errors[0]
    assert len(store.history()) == 5


# -- pure helpers ---------------------------------------------------------------------------------

def test_suspicious_patch_probability_is_the_fcn_on_the_patch(ui_fixture):
    """softmax(window mean of log p) == softmax(window mean of the logits): checked against logits."""
    import torch
    import torch.nn.functional as F

    from deepminer.data.patches import patch_boxes
    from deepminer.models import load_model
    from ui.logic import suspicious_patches

    torch.manual_seed(1)
    model = load_model(Path(ui_fixture["model_dir"]) / "model.pt")
    with torch.no_grad():  # make the classes disagree a lot: random head
        model.head.fc.weight.normal_(0, 3.0)
    name, data = _png(ui_fixture, 0)
    from deepminer.data.io import load_image

    px = load_image(data).pixels
    x = torch.from_numpy(px)[None, None]
    with torch.no_grad():
        logits = model.class_logits(model.forward_features(x))  # (1, C, h, w)
    probs = torch.softmax(logits, 1)[0].numpy()
    got = suspicious_patches(probs, px, model.classes, top=100, min_tissue=0.0)
    up = F.interpolate(logits.double(), size=px.shape, mode="bilinear", align_corners=False)[0]
    assert len(got) == len(patch_boxes(*px.shape))
    for p in got:
        x0, y0, x1, y1 = p.box
        want = torch.softmax(up[:, y0:y1, x0:x1].mean((1, 2)), 0)[2].item()
        assert p.score == pytest.approx(want, abs=5e-3)
    assert [p.score for p in got] == sorted((p.score for p in got), reverse=True)


def test_settings_and_text_escaping(monkeypatch):
    from ui.render import md_escape
    from ui.settings import ROOT, load_settings

    s = load_settings({"DEEPMINER_LABELS_URL": "sqlite:///var/x.db", "DEEPMINER_BACKEND": "LOCAL",
                       "DEEPMINER_MAX_SIDE": "0"})
    assert s.labels_url == f"sqlite:///{ROOT / 'var' / 'x.db'}" and s.backend == "local" and s.max_side is None
    assert load_settings({"DEEPMINER_BACKEND": "nonsense"}).backend == "serve"
    assert load_settings({}).max_side is None  # no max_side asked: the model's own scale (issue 21)
    assert load_settings({"DEEPMINER_MAX_SIDE": "1024"}).max_side == 1024
    assert md_escape("<b>x</b> **y**") == "&lt;b&gt;x&lt;/b&gt; \\*\\*y\\*\\*"


def test_trained_on_note_says_phantom_output_is_not_meaningful():
    from deepminer.data.dataset import SYNTHETIC_PHANTOMS
    from deepminer.models import load_model
    from ui.logic import trained_on_note

    demo = load_model(Path(__file__).resolve().parents[1] / "model_store" / "demo" / "model.pt")
    assert demo.meta["trained_on"] == SYNTHETIC_PHANTOMS  # the bundled model says so in its checkpoint
    assert "not meaningful" in trained_on_note({"trained_on": SYNTHETIC_PHANTOMS})
    assert trained_on_note({"trained_on": "CBIS-DDSM (deepminer import-cbis)"}).startswith("Trained on CBIS-DDSM")
    assert "not recorded" in trained_on_note({})


# -- the Evaluate page ----------------------------------------------------------------------------

def _mask_png(mask: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _frames(at) -> list:
    return [d.value for d in at.dataframe]


def test_evaluate_without_an_image_is_a_hint(app_env):
    at = _app("views/evaluate.py")
    assert "Choose an image on the Explain page first" in _texts(at)
    assert not at.error


def test_evaluate_mask_upload_scores_every_method_with_the_baselines(app_env):
    from deepminer.client import local_explain
    from deepminer.data.tissue import tissue_mask
    from deepminer.evaluation.localization import LesionTarget, localization_metrics, to_image
    from ui.state import Keys

    at, data = _with_image(app_env, "views/evaluate.py")
    assert "Outline the finding" in _texts(at)
    ref = _sess(at).image
    # a lesion inside the breast: a square around the tissue's centre, as a mask PNG of half the size
    from deepminer.data.io import load_image

    px = load_image(data).pixels
    tissue = tissue_mask(px)
    ys, xs = np.nonzero(tissue)
    cy, cx = int(ys.mean()), int(xs.mean())
    lesion = np.zeros(px.shape, bool)
    lesion[cy - 20:cy + 20, cx - 20:cx + 20] = True
    half = lesion[::2, ::2]
    at.file_uploader(key=Keys.of_image(Keys.EVAL_MASK, ref)).upload("mask.png", _mask_png(half), "image/png").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    table = _frames(at)[0]
    methods = list(table["method"])
    assert methods[-2:] in (["random (baseline)", "tissue prior (baseline)"],
                            ["tissue prior (baseline)", "random (baseline)"])
    assert list(table["baseline"]) == [False] * (len(methods) - 2) + [True, True]
    assert {"CAM", "probability map", "Grad-CAM", "Grad-CAM++", "guided backprop"} <= set(methods)
    assert not {"integrated gradients", "SmoothGrad"} & set(methods)  # the slow ones only when asked
    at.toggle(key=Keys.EVAL_PEERS_SLOW).set_value(True).run()
    assert not at.exception, at.exception
    table = _frames(at)[0]
    methods = list(table["method"])
    assert {"CAM", "probability map", "Grad-CAM", "Grad-CAM++", "guided backprop", "integrated gradients",
            "SmoothGrad"} <= set(methods)
    assert list(table["baseline"]) == [False] * (len(methods) - 2) + [True, True]
    auprc = [a for a, b in zip(table["AUPRC"], table["baseline"]) if not b]
    assert auprc == sorted(auprc, reverse=True)
    # the CAM's AUPRC is the engine's, on the image as the page scores it (the preview, here 256 px)
    res = local_explain(Path(app_env["model_dir"]) / "model.pt", data, max_side=512, name="demo")
    from deepminer.evaluation.masks import fit_mask

    les = fit_mask(half, px.shape)
    want = localization_metrics(to_image(res.cam[res.classes.index(res.prediction)], px.shape),
                                LesionTarget.make(les, tissue))
    got = dict(zip(table["method"], table["AUPRC"]))["CAM"]
    assert got == pytest.approx(round(want["auprc"], 3))
    assert any("AUPRC" in c for c in _captions(at))


def test_evaluate_a_zip_lists_skipped_runs_and_exports(app_env, tmp_path):
    from evalzip import eval_zip

    from ui.state import Keys

    data, ids, bad = eval_zip(tmp_path / "set", count=4)
    at = _app("views/evaluate.py")
    at.radio(key=Keys.EVAL_MODE).set_value("A set of images with masks").run()
    assert not at.exception, at.exception
    at.file_uploader(key=Keys.EVAL_ZIP).upload("set.zip", data, "application/zip").run()
    assert not at.exception, at.exception
    skipped = [m.value for m in at.markdown if m.value.startswith("- **")][0]
    assert "\\.\\./evil\\.png" in skipped and bad.replace("_", "\\_") in skipped, skipped
    tmp = _sess(at).eval_set.tmp
    assert tmp is not None and tmp.is_dir()
    at.button(key=Keys.EVAL_RUN).click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    run = _sess(at).eval_run
    assert run.done == len(ids) and not run.running and [r.image_id for r in run.records] == ids
    assert not tmp.exists()  # the extracted zip is removed after the run
    text = _texts(at)
    assert f"Summary over {len(ids)} images" in text, text
    assert "weights sha256" in text and "set\\.zip" in text, text
    assert "How right the model was" not in text  # images/ + masks/ without manifest.csv: no labels to score
    summary = [f for f in _frames(at) if "auprc" in getattr(f, "columns", [])][0]
    assert list(summary["method"])[-2:] == ["random (baseline)", "tissue prior (baseline)"] or \
        set(list(summary["method"])[-2:]) == {"random (baseline)", "tissue prior (baseline)"}
    assert len(at.get("download_button")) == 3
    from ui.evaluate import per_image_csv

    csv_text = per_image_csv(run.records)
    assert len(csv_text.splitlines()) == 1 + 4 * len(ids) and csv_text.startswith("image_id,")
    # a cancelled run shows what it had, said to be partial
    run.cancelled, run.records, run.done = True, run.records[:2], 2
    at.run()
    assert not at.exception, at.exception
    assert any(f"Cancelled after 2 of {len(ids)} images" in w.value for w in at.warning)
    assert "Summary over 2 images" in _texts(at)
    # a bad zip is one line, no traceback
    at.file_uploader(key=Keys.EVAL_ZIP).upload("bad.zip", b"not a zip", "application/zip").run()
    assert not at.exception, at.exception
    assert any("Cannot use this set" in e.value for e in at.error)


def test_evaluate_a_labelled_set_says_how_right_the_model_was(app_env, tmp_path):
    """A zip in the dataset-folder layout carries labels: the page shows the image-level
    classification (accuracy, per-class AUC, confusion) of the images it explained."""
    import io
    import zipfile

    from deepminer.data.phantoms import generate_dataset
    from ui.state import Keys

    data = generate_dataset(tmp_path / "set", 4, 5, 192, label_mix={"normal": 0.5, "malignant": 0.5})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in data.rglob("*"):
            if p.is_file() and not p.relative_to(data).parts[0] == "masks":
                z.write(p, str(p.relative_to(data)))
    at = _app("views/evaluate.py")
    at.radio(key=Keys.EVAL_MODE).set_value("A set of images with masks").run()
    at.file_uploader(key=Keys.EVAL_ZIP).upload("set.zip", buf.getvalue(), "application/zip").run()
    at.button(key=Keys.EVAL_RUN).click().run()
    assert not at.exception, at.exception
    run = _sess(at).eval_run
    labelled = [r for r in run.records if r.label and r.probabilities]
    assert labelled, [(r.image_id, r.label, r.problem) for r in run.records]
    assert f"How right the model was on these {len(labelled)} images" in _texts(at)
    confusion = [f for f in _frames(at) if "predicted malignant" in getattr(f, "columns", [])][0]
    assert int(confusion["total"].sum()) == len(labelled)


def test_evaluate_logic_sorting_baselines_and_intervals():
    from deepminer.evaluation.stats import bootstrap_ci
    from ui import evaluate as ev

    def m(a: float) -> dict:
        return {"auprc": a, "pointing": 1.0 if a > 0.3 else 0.0, "iou": a / 2, "dice": a, "relevance_mass": a / 3,
                "pr": np.full(101, a)}

    rows = ev.ranked_rows({"cam": m(0.4), "random": m(0.1), "gradcam": m(0.6), "tissue_prior": m(0.2),
                           "class_map": m(0.15), "smoothgrad": m(float("nan"))})
    assert [r["key"] for r in rows] == ["gradcam", "cam", "class_map", "smoothgrad", "tissue_prior", "random"]
    assert [r["baseline"] for r in rows] == [False, False, False, False, True, True]
    assert rows[2]["note"] == "below the baseline floor" and rows[0]["note"] == ""
    assert rows[0]["pointing"] == "hit" and rows[2]["pointing"] == "miss" and rows[3]["AUPRC"] is None

    rng = np.random.default_rng(0)
    recs = [ev.ImageRecord(f"i{k}", "benign", targets={"predicted": "benign"},
                           scores={key: {"predicted": m(float(rng.random()))} for key in ("cam", "random", "tissue_prior")})
            for k in range(9)]
    recs[3].scores["cam"]["predicted"]["auprc"] = float("nan")
    summary = ev.summary_rows(recs)
    for r in summary:
        values = [x.scores[r["method"]]["predicted"][r["metric"]] for x in recs]
        want = bootstrap_ci(values)
        assert (r["mean"], r["lo"], r["hi"], r["n"]) == (want.mean, want.lo, want.hi, want.n)
        assert r["baseline"] == (r["method"] in ("random", "tissue_prior"))
    assert {r["method"] for r in summary} == {"cam", "random", "tissue_prior"}
    table = ev.summary_table(summary)
    assert [t["baseline"] for t in table] == [False, True, True]
    csv_rows = ev.per_image_csv(recs).splitlines()
    assert len(csv_rows) == 1 + 9 * 3 and csv_rows[0].startswith("image_id,label,prediction,target,method")
    assert ev.requests_for(["cam", "class_map"]) == []
    assert ev.requests_for(list(ev.PEERS)) == [list(ev.PEERS_FAST), list(ev.PEERS_SLOW)]
    assert ev.eta_s(0, 10, 1.0) is None and ev.eta_s(2, 10, 1.0) == pytest.approx(4.0)
    best, worst = ev.best_worst(recs, k=2)
    assert len(best) == 2 and len(worst) == 2 and best[0].score("cam", None, "auprc") >= worst[0].score("cam", None, "auprc")
    p = ev.provenance({"trained_on": "synthetic phantoms (deepminer phantoms)", "weights_sha256": "ab"})
    assert "mean nothing" in p["warning"] and p["weights_sha256"] == "ab"
    import json

    doc = json.loads(ev.report_json(summary, {"dataset": "bundled phantoms"}))
    assert doc["settings"]["dataset"] == "bundled phantoms" and len(doc["summary"]) == len(summary)


@pytest.mark.parametrize("height", [256, 1400])
def test_a_set_item_scores_the_same_from_the_servers_region_as_decoded_here(ui_fixture, tmp_path, height):
    """A set run scores against the breast region the server returned (nothing decoded in the page);
    an answer without it (a server that does not mask tissue) decodes the image here. Both give the
    same scene and the same metrics; an image over EVAL_SIDE is brought to it the same way."""
    from types import SimpleNamespace

    from deepminer.client import local_explain
    from deepminer.data.phantoms import PHANTOM_CONCEPTS, render_phantom, write_phantom
    from deepminer.options import ExplainOptions
    from ui import evaluate as ev

    for sub in ("images", "lesions", *(f"masks/{c}" for c in PHANTOM_CONCEPTS)):
        (tmp_path / sub).mkdir(parents=True)
    row = write_phantom(tmp_path, render_phantom(7, 0, height, label="malignant"))
    item = SimpleNamespace(image=tmp_path / row["image"], mask=tmp_path / row["lesion_mask"], image_id="p")
    model = Path(ui_fixture["model_dir"]) / "model.pt"
    with_region = local_explain(model, item.image, ExplainOptions.build(unit_maps="none", tissue_mask=True))
    without = local_explain(model, item.image, unit_maps="none")
    assert with_region.tissue_region() is not None and without.tissue_region() is None
    a, b = ev.item_scene(item, with_region), ev.item_scene(item, without)
    assert a.pixels is None and b.pixels is not None  # the first decoded nothing
    assert a.shape == b.shape and max(a.shape) == min(height, ev.EVAL_SIDE)
    assert a.lesion.any() and np.array_equal(a.lesion, b.lesion)
    # the region: the server's mask at full size brought down nearest vs the mask of the box-resized
    # image: equal at native size, nearly equal (edge pixels) when resized
    agree = float((a.tissue == b.tissue).mean())
    assert agree == 1.0 if height <= ev.EVAL_SIDE else agree > 0.995, agree
    ra = ev.evaluate_item("p", None, None, a.lesion, with_region, scene=a)
    rb = ev.evaluate_item("p", None, None, b.lesion, without, scene=b)
    assert set(ra.scores) == set(rb.scores) == {"cam", "class_map", "random", "tissue_prior"}
    for m in ra.scores:
        assert ra.score(m, "predicted", "auprc") == pytest.approx(rb.score(m, "predicted", "auprc"),
                                                                  abs=1e-9 if height <= ev.EVAL_SIDE else 1e-3), m


def test_evaluate_settings_folder(monkeypatch, tmp_path):
    from ui.settings import load_settings

    assert load_settings({}).eval_folder is None
    assert load_settings({"DEEPMINER_EVAL_FOLDER": str(tmp_path)}).eval_folder == tmp_path


# -- Silencing units (the ablate option) ----------------------------------------------------------

def _ablation_table(at):
    tables = [d.value for d in at.dataframe if "change" in list(d.value.columns)]
    assert len(tables) == 1, [list(d.value.columns) for d in at.dataframe]
    return tables[0]


def test_sketch_silences_the_matching_units(app_env):
    from deepminer.atlas import Atlas
    from deepminer.client import local_explain
    from deepminer.explain.sketch import MATCH_IOU
    from deepminer.explain.units import unit_masks
    from ui.state import Keys

    at, data = _with_image(app_env, "views/sketch.py")
    ref = _sess(at).image
    model_file = Path(app_env["model_dir"]) / "model.pt"
    # the sketch: one unit's own binarized response on this image (so at least that unit matches)
    plain = local_explain(model_file, data, unit_maps="all", max_side=512, name="demo")
    thresholds = Atlas.load(Path(app_env["model_dir"]) / "atlas").thresholds
    shape = (plain.input["height"], plain.input["width"])
    masks = [unit_masks(plain.unit_maps[u][None], thresholds[[u]], shape)[0] for u in range(len(plain.unit_max))]
    sketch = max(masks, key=lambda m: min(m.mean(), 0.3))  # a unit that fires on a fair part of the image
    res = local_explain(model_file, data, sketch=sketch, unit_maps="all", max_side=512, name="demo")
    matching = [int(u) for u in np.lexsort((np.arange(res.sketch_iou.size), -res.sketch_iou))
                if res.sketch_iou[u] > MATCH_IOU]
    assert matching, "the test sketch must match some units"
    _sess(at).sketch, _sess(at).sketch_for = sketch, (ref.digest, None)
    at.run()
    assert not at.exception, at.exception
    toggle = at.toggle(key=Keys.of_image("sk_silence", ref))
    assert toggle.label == f"Silence the {len(matching)} matching unit(s)" and not toggle.value
    toggle.set_value(True).run()
    assert not at.exception, at.exception
    # before/after/change are the library's ablation of exactly those units
    silenced = local_explain(model_file, data, max_side=512, name="demo", ablate=matching)
    table = _ablation_table(at)
    assert list(table["class"]) == list(silenced.classes)
    for _, row in table.iterrows():
        c = row["class"]
        assert row["before"] == pytest.approx(silenced.probabilities[c], abs=1e-3)
        assert row["after"] == pytest.approx(silenced.ablation.probabilities[c], abs=1e-3)
        assert row["change"] == pytest.approx(silenced.ablation.delta[c], abs=1e-3)
    assert f"units {', '.join(map(str, matching))}" in _texts(at) or f"unit {matching[0]} " in _texts(at)
    assert any("with the units silenced" in c for c in _captions(at))  # the class map after


def test_explain_silences_a_labels_units(app_env):
    from deepminer.client import local_explain
    from deepminer.labels import LabelStore
    from ui.state import Keys

    at, data = _with_image(app_env)
    assert "No unit of this model carries a label yet" in _texts(at)
    name, _ = _png(app_env, 0)
    model_file = Path(app_env["model_dir"]) / "model.pt"
    res = local_explain(model_file, data, max_side=512, name="demo")
    top = res.top_units[res.prediction]
    model, weights = _key(app_env)
    store = LabelStore(app_env["url"])
    store.set_labels(model, weights, top[:3], "Spiculated margin", "alice")
    store.set_labels(model, weights, [top[4]], "calc cluster", "alice")
    at.run()
    box = at.selectbox(key=Keys.of_image("silence_label", _sess(at).image))
    assert box.options == ["Spiculated margin", "calc cluster"] and box.value is None
    box.set_value("Spiculated margin").run()
    assert not at.exception, at.exception
    silenced = local_explain(model_file, data, max_side=512, name="demo", ablate=sorted(top[:3]))
    table = _ablation_table(at)
    for _, row in table.iterrows():
        assert row["after"] == pytest.approx(silenced.ablation.probabilities[row["class"]], abs=1e-3)
        assert row["change"] == pytest.approx(silenced.ablation.delta[row["class"]], abs=1e-3)
    assert abs(table["change"]).max() > 0  # silencing the three most influential units moves something
    assert f"units {', '.join(map(str, sorted(top[:3])))}" in _texts(at)


def test_atlas_page_shows_whether_influence_is_causal(app_env, monkeypatch, tmp_path):
    import shutil

    from deepminer.atlas.ablation import atlas_ablation

    at = _app("views/atlas.py")
    assert "No ablation measurement for this atlas yet" in _texts(at)
    model_dir = tmp_path / "demo"
    shutil.copytree(app_env["model_dir"], model_dir)
    res = atlas_ablation(model_dir / "model.pt", model_dir / "atlas", app_env["data"], device="cpu", progress=False)
    monkeypatch.setenv("DEEPMINER_MODEL_DIR", str(model_dir))
    import streamlit as st

    st.cache_resource.clear()  # the settings are read once per process
    st.cache_data.clear()
    at = _app("views/atlas.py")
    tables = [d.value for d in at.dataframe if "class" in list(d.value.columns)]
    assert tables, _texts(at)
    table = tables[0]
    assert list(table["class"]) == list(res["per_class"])
    for _, row in table.iterrows():
        rho = res["per_class"][row["class"]].get("spearman_influence_prob_drop")
        assert row["ρ influence vs P drop"] == ("-" if rho is None else f"{rho:+.2f}")
    cls = at.radio(key="atlas_class").value
    if "mean_prob_drop" in res["per_class"][cls]:
        fig = _figure(at, "ablation_scatter")
        assert list(fig.data[0].y) == pytest.approx(res["per_class"][cls]["mean_prob_drop"])


# -- out of domain --------------------------------------------------------------------------------

def test_domain_banner_is_worded_from_the_training_data():
    from deepminer.data.dataset import SYNTHETIC_PHANTOMS
    from ui.logic import domain_banner

    out = {"method": "mahalanobis", "score": 812.0, "threshold": 95.0, "percentile": 99.0, "in_domain": False}
    text = domain_banner({"trained_on": SYNTHETIC_PHANTOMS}, out)
    assert text is not None and text.startswith("Out of the model's domain")
    assert "trained on synthetic phantoms, so its output on this image is not meaningful" in text
    assert "score 812 > threshold 95, the 99th percentile of its validation images" in text
    assert "CBIS-DDSM" in domain_banner({"trained_on": "CBIS-DDSM (deepminer import-cbis)"}, out)
    assert "not recorded" in domain_banner({}, out)
    assert domain_banner({"trained_on": SYNTHETIC_PHANTOMS}, {**out, "in_domain": True}) is None
    assert domain_banner({"trained_on": SYNTHETIC_PHANTOMS}, None) is None  # no domain.pt: no claim either way


def test_out_of_domain_banner_on_explain_sketch_and_evaluate(app_env, monkeypatch, tmp_path):
    """A ``domain.pt`` beside the model that every image exceeds (threshold 0): Explain, Sketch &
    label and Evaluate (one image) show the banner ``ui.logic.domain_banner`` words for the answer."""
    import shutil

    from deepminer.client import local_explain
    from deepminer.domain import fit_domain
    from deepminer.models import load_model
    from deepminer.models.checkpoints import weights_sha256
    from ui.logic import domain_banner

    model_dir = tmp_path / "demo"
    shutil.copytree(app_env["model_dir"], model_dir)
    model = load_model(model_dir / "model.pt")
    feats = np.random.default_rng(0).random((40, int(model.num_units)))
    dm = fit_domain(feats[:30], feats[30:], components=8, weights_sha256=weights_sha256(model))
    dm.threshold = 0.0
    dm.save(model_dir / "domain.pt")
    monkeypatch.setenv("DEEPMINER_MODEL_DIR", str(model_dir))
    at = _app()
    name, data = _png(app_env, 0)
    at.file_uploader(key="upload").upload(name, data, "image/png").run()
    assert not at.exception, at.exception
    res = local_explain(model_dir / "model.pt", data, max_side=512, name="demo")
    assert res.domain is not None and not res.domain["in_domain"]
    banner = domain_banner(res.model, res.domain)
    assert banner and "What the model was trained on is not recorded" in banner
    assert [e.value for e in at.error] == [banner]
    for page in ("views/sketch.py", "views/evaluate.py"):
        at.switch_page(page)
        at.run()
        assert not at.exception, at.exception
        assert banner in [e.value for e in at.error], page
