"""Silencing units (the ``ablate`` option): the head on the cached unit maps with some units set to
zero must equal a from-scratch forward whose last conv layer has those channels zeroed (a forward
hook, the whole model run again), for a GAP and a WILDCAT head (with and without a surround); the cache makes a new unit set cost
no forward; bad unit lists are one-line errors."""
import json

import numpy as np
import pytest
import torch

from deepminer.errors import InputError
from deepminer.explain import ExplanationCache, explain_image
from deepminer.explain.engine import image_probabilities
from deepminer.explanation import Explanation
from deepminer.models import build_model
from deepminer.options import MAX_ABLATE, ExplainOptions, parse_unit_list
from modelfixtures import random_image


def _model(head: str, seed: int = 5):
    """``head``: gap, wildcat, or ``wildcat-surround`` (a WILDCAT head whose class maps are local contrasts)."""
    torch.manual_seed(seed)
    surround = 2.0 if head == "wildcat-surround" else 0.0
    model = build_model("tiny", head=head.split("-")[0], pretrained=False, wildcat_surround=surround).eval()
    with torch.no_grad():  # a head that tells units apart (random init is near zero)
        for p in model.head.parameters():
            p.normal_(0, 1.0)
    return model


def _hooked_forward(model, x, units):
    """The reference: the full model run again with ``units`` zeroed at the output of the unit layer
    (a forward hook on ``model.layer``): ``(softmax(model(x)), softmax of the class logit maps,
    the class logit maps)``."""
    layer = dict(model.features.named_modules())[model.layer]

    def zero(_module, _inputs, out):
        out = out.clone()
        out[:, list(units)] = 0
        return out

    handle = layer.register_forward_hook(zero)
    try:
        with torch.no_grad():
            logits = model.class_logits(model.forward_features(x))
            pooled = model(x)
    finally:
        handle.remove()
    return torch.softmax(pooled[0], 0).numpy(), torch.softmax(logits, 1)[0].numpy(), logits


@pytest.mark.parametrize("head", ["gap", "wildcat", "wildcat-surround"])
@pytest.mark.parametrize("units", [[3], [0, 7, 19, 31], list(range(0, 32, 2))])
def test_ablation_equals_a_forward_with_the_units_zeroed(head, units):
    model = _model(head)
    img = random_image((160, 128), seed=len(units))  # at most one training patch: one window
    e = explain_image(model, img, max_side=None, ablate=units)
    ab = e.ablation
    assert ab is not None and ab.units == tuple(units)
    ref_p, ref_maps, _ = _hooked_forward(model, torch.from_numpy(img)[None, None], units)
    got = np.array([ab.probabilities[c] for c in e.classes])
    assert np.allclose(got, ref_p, atol=1e-6), (got, ref_p)
    assert np.allclose(ab.class_maps, ref_maps, atol=1e-6)
    assert ab.prediction == e.classes[int(np.argmax(ref_p))]
    before = np.array([e.probabilities[c] for c in e.classes])
    assert np.allclose([ab.delta[c] for c in e.classes], ref_p - before, atol=1e-6)
    assert abs(sum(ab.delta.values())) < 1e-5  # probabilities still sum to one
    assert np.abs(got - before).max() > 1e-4  # the units mattered: the test can fail


def test_ablation_on_a_large_gap_image_follows_the_window_rule():
    """Larger than a patch: the GAP rule picks the most abnormal window again, after silencing."""
    model = _model("gap", seed=9)
    img = random_image((640, 480), seed=2)
    units = [1, 2, 5, 8, 13]
    e = explain_image(model, img, max_side=None, ablate=units)
    x = torch.from_numpy(img)[None, None]
    _, ref_maps, logits = _hooked_forward(model, x, units)
    ref_p, _, window = image_probabilities(model, logits, (640, 480))
    assert e.probability_rule.startswith("gap: most abnormal")
    assert np.allclose([e.ablation.probabilities[c] for c in e.classes], ref_p.numpy(), atol=1e-6)
    assert np.allclose(e.ablation.class_maps, ref_maps, atol=1e-6) and e.ablation.window == window


def test_no_units_silenced_changes_nothing_and_all_units_leave_the_bias():
    model = _model("gap")
    img = random_image((128, 128), seed=1)
    e = explain_image(model, img, max_side=None, ablate=[])
    assert e.ablation is None
    every = explain_image(model, img, max_side=None, ablate=list(range(32)))
    bias = model.head.fc.bias.detach()
    assert np.allclose([every.ablation.probabilities[c] for c in every.classes],
                       torch.softmax(bias, 0).numpy(), atol=1e-6)  # no unit left: the head's bias


def test_a_new_unit_set_on_a_cached_image_costs_no_forward():
    model = _model("wildcat")
    calls = []
    forward_features = model.forward_features
    model.forward_features = lambda x: calls.append(1) or forward_features(x)
    img = random_image((192, 160), seed=3)
    cache = ExplanationCache(max_bytes=16 << 20)
    first = explain_image(model, img, max_side=None, cache=cache)
    a = explain_image(model, img, max_side=None, cache=cache, ablate=[1, 2])
    b = explain_image(model, img, max_side=None, cache=cache, ablate=[4])
    assert len(calls) == 1 and a.cache_hit and b.cache_hit and first.ablation is None
    fresh = explain_image(model, img, max_side=None, ablate=[4])  # no cache: its own forward
    assert np.array_equal(b.ablation.class_maps, fresh.ablation.class_maps)
    assert b.ablation.probabilities == fresh.ablation.probabilities
    assert "ablate" in b.timing_ms and "ablate" not in first.timing_ms
    assert explain_image(model, img, max_side=None, cache=cache).ablation is None  # the cached core is untouched


def test_the_head_runs_on_one_thread_and_the_thread_count_comes_back():
    """The ablation's small kernels run on one CPU thread (they stall when split on a loaded
    machine); the process's setting is restored, also after an error."""
    from deepminer.explain import engine

    model = _model("gap")
    before = torch.get_num_threads()
    seen = []
    class_logits = model.class_logits
    model.class_logits = lambda f: seen.append(torch.get_num_threads()) or class_logits(f)
    torch.set_num_threads(2)
    try:
        e = explain_image(model, random_image((96, 96)), max_side=None, ablate=[1])
        assert e.ablation is not None and seen[-1] == 1 and torch.get_num_threads() == 2
        with pytest.raises(InputError):
            engine.ablation_from_features(model, np.zeros((32, 6, 6), np.float32), [40], e, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_ablation_travels_in_the_json_body():
    model = _model("gap")
    e = explain_image(model, random_image((128, 96), seed=4), max_side=None, ablate=[0, 9])
    body = json.loads(json.dumps(e.to_json()))
    assert body["ablation"]["units"] == [0, 9] and set(body["ablation"]["delta"]) == set(e.classes)
    back = Explanation.from_json(body)
    assert back.ablation.units == (0, 9) and back.ablation.prediction == e.ablation.prediction
    assert np.allclose(back.ablation.class_maps, e.ablation.class_maps, atol=1e-3)  # float16 on the wire
    assert back.ablation.probabilities == pytest.approx(e.ablation.probabilities)
    assert "ablation" not in explain_image(model, random_image((64, 64)), max_side=None).to_json()


@pytest.mark.parametrize("raw, message", [
    ({"ablate": [3, 32]}, "options.ablate: unit 32 out of range 0..31 (the model's 32 units)"),
    ({"ablate": [-1]}, "options.ablate: -1 is less than the minimum of 0"),
    ({"ablate": [4, 4, 5]}, "options.ablate: duplicate ids 4"),
    ({"ablate": list(range(MAX_ABLATE + 1))}, f"options.ablate: at most {MAX_ABLATE} items, got {MAX_ABLATE + 1}"),
    ({"ablate": "3"}, "options.ablate: '3' is not of type 'array'"),
    ({"ablate": [1.5]}, "options.ablate: 1.5 is not of type 'integer'"),
])
def test_bad_unit_lists_are_one_line(raw, message):
    with pytest.raises(InputError) as err:
        ExplainOptions.parse(raw, num_units=32)
    assert str(err.value) == message


def test_unit_lists_from_the_command_line():
    assert parse_unit_list("12,40") == (12, 40) and parse_unit_list(" 3 , 5 7") == (3, 5, 7)
    with pytest.raises(InputError, match=r"^--ablate: 'x' is not a unit id"):
        parse_unit_list("3,x")
    with pytest.raises(InputError, match=r"^--ablate: duplicate ids 3$"):
        ExplainOptions.build(ablate=[3, 3], flags=True)
    opts = ExplainOptions.build(ablate=np.array([2, 9]), num_units=32)
    assert opts.ablate == (2, 9) and ExplainOptions.parse(opts.to_json()) == opts


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny model saved, and a phantom-like 16-bit PNG."""
    from PIL import Image

    from modelfixtures import tiny_checkpoint

    folder = tmp_path_factory.mktemp("abl")
    model_path = tiny_checkpoint(folder, seed=4)
    rng = np.random.default_rng(0)
    img = (rng.random((240, 200)) * 40000 + 20000).astype(np.uint16)
    Image.fromarray(img).save(folder / "img.png")
    return model_path, folder / "img.png"


def test_local_explain_and_the_cli_print_the_change_per_class(tiny_files, capsys):
    from deepminer import client
    from deepminer.cli import main

    model_path, image = tiny_files
    plain = client.local_explain(model_path, image)
    silenced = client.local_explain(model_path, image, ablate=[12, 30])
    assert plain.ablation is None and silenced.ablation.units == (12, 30)
    assert np.allclose(list(silenced.probabilities.values()), list(plain.probabilities.values()), atol=1e-6)
    delta = {c: silenced.ablation.probabilities[c] - plain.probabilities[c] for c in plain.classes}
    assert silenced.ablation.delta == pytest.approx(delta, abs=1e-6)
    assert main(["explain", str(image), "--model", str(model_path), "--ablate", "12,30"]) == 0
    line = [r for r in capsys.readouterr().out.splitlines() if "silencing units" in r]
    assert len(line) == 1 and line[0].strip().startswith("silencing units 12, 30:")
    for c in plain.classes:
        assert f"{c} {silenced.ablation.probabilities[c]:.3f} ({silenced.ablation.delta[c]:+.3f})" in line[0]
    assert main(["explain", str(image), "--model", str(model_path), "--ablate", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ablation"]["units"] == [3] and set(summary["ablation"]["delta"]) == set(plain.classes)


@pytest.mark.parametrize("ids, message", [("3,3", "--ablate: duplicate ids 3"),
                                          ("1,x", "--ablate: 'x' is not a unit id"),
                                          ("5,32", "options.ablate: unit 32 out of range 0..31")])
def test_cli_bad_unit_lists_are_one_line_exit_2(tiny_files, ids, message, capsys):
    from deepminer.cli import main

    model_path, image = tiny_files
    assert main(["explain", str(image), "--model", str(model_path), "--ablate", ids]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# -- the atlas: is influence causal? ----------------------------------------------------------------

def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from deepminer.atlas.ablation import rankdata, spearman

    rng = np.random.default_rng(0)
    for n in (5, 40, 300):
        x = rng.integers(0, 6, n).astype(float)  # many ties
        y = x * 0.3 + rng.normal(size=n)
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    from scipy.stats import rankdata as sp_rankdata

    z = rng.integers(0, 4, 50)
    assert np.array_equal(rankdata(z), sp_rankdata(z))
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant: undefined, not nan


@pytest.mark.parametrize("head", ["gap", "wildcat", "wildcat-surround"])
def test_single_unit_effects_equal_silencing_each_unit_through_the_head(head):
    from deepminer.atlas.ablation import single_unit_effects
    from deepminer.explain.engine import ablate_features

    model = _model(head, seed=7)
    x = torch.from_numpy(np.stack([random_image((96, 96), seed=s) for s in range(3)]))[:, None]
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model(x)
    infl, pdrop, ldrop, pred = single_unit_effects(model, feats, units_chunk=7)  # chunks that do not divide K
    assert infl.shape == pdrop.shape == ldrop.shape == (3, 3, 32)
    assert torch.equal(pred, pooled.argmax(1))
    w = model.unit_weights.detach()
    for b in range(3):
        assert torch.allclose(infl[b].float(), feats[b].amax((1, 2))[None] * w, atol=1e-6)
        for unit in (0, 11, 31):
            _, _, logits = _hooked_forward(model, x[b:b + 1], [unit])
            after = model.pool(logits)[0]
            p_after = torch.softmax(after, 0)
            assert torch.allclose(ldrop[b, :, unit].float(), pooled[b] - after, atol=1e-5)
            assert torch.allclose(pdrop[b, :, unit].float(), torch.softmax(pooled[b], 0) - p_after, atol=1e-6)
            probs, _, _, _ = ablate_features(model, feats[b:b + 1], [unit], (96, 96))  # the request path
            assert torch.allclose(probs, p_after, atol=1e-6)


@pytest.mark.slow
def test_atlas_ablation_command_writes_the_correlations(tmp_path, capsys):
    """A small real atlas (dissect over 6 phantoms), then the command; its numbers recomputed here
    directly with scipy."""
    from scipy.stats import spearmanr

    from deepminer.atlas import dissect
    from deepminer.atlas.ablation import load_ablation, single_unit_effects
    from deepminer.cli import main
    from deepminer.data.patches import PATCHES_CSV, PatchDataset, extract_patches
    from deepminer.data.phantoms import generate_dataset
    from deepminer.models import save_model

    data = tmp_path / "ph"
    generate_dataset(data, 6, 3, size=256, splits={"train": 0, "val": 0, "test": 1, "holdout": 0},
                     label_mix={"normal": 0.34, "benign": 0.33, "malignant": 0.33})
    extract_patches(data, progress=False).to_csv(data / PATCHES_CSV, index=False)
    model = _model("gap", seed=3)
    model_path = save_model(model, tmp_path / "model.pt")
    atlas = dissect(model_path, data, "test", tmp_path / "atlas", patch_size=64, topk=4, batch_size=16,
                    progress=False)
    assert main(["atlas-ablation", "--model", str(model_path), "--atlas", str(tmp_path / "atlas"),
                 "--data", str(data), "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("class") and len(out.splitlines()) == 4
    res = load_ablation(tmp_path / "atlas")
    assert res is not None and res["references"]["patches"] == len(atlas.references)
    # recompute from scratch: every patch, every unit, means over the patches predicted as the class
    ds = PatchDataset(data, atlas.references, size=64)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    from deepminer.models import load_model

    loaded = load_model(model_path).eval()
    with torch.no_grad():
        feats = loaded.forward_features(x)
    infl, pdrop, _, pred = single_unit_effects(loaded, feats)
    checked = 0
    for i, cls in enumerate(loaded.classes):
        sel = pred == i
        e = res["per_class"][cls]
        assert e["patches"] == int(sel.sum())
        if not sel.any():
            continue
        mi, mp = infl[sel, i].mean(0).numpy(), pdrop[sel, i].mean(0).numpy()
        assert e["spearman_influence_prob_drop"] == pytest.approx(spearmanr(mi, mp).statistic, abs=1e-6)
        assert np.allclose(e["mean_prob_drop"], mp, rtol=1e-5, atol=1e-9)
        checked += 1
    assert checked >= 1


def test_atlas_ablation_refuses_another_models_atlas(tmp_path):
    from deepminer.atlas.ablation import atlas_ablation
    from deepminer.models import save_model

    atlas = tmp_path / "atlas"
    atlas.mkdir()
    (atlas / "atlas.json").write_text(json.dumps({"format": "deepminer-atlas/1", "classes": ["normal", "benign", "malignant"],
                                                  "model": {"weights_sha256": "0" * 64}}))
    np.savez(atlas / "atlas.npz", thresholds=np.zeros(32, np.float32))
    (atlas / "references.csv").write_text("image_id,image\n")
    path = save_model(_model("gap"), tmp_path / "model.pt")
    with pytest.raises(InputError, match=r"the atlas profiles weights 000000000000\.\.\., not this model's"):
        atlas_ablation(path, atlas, device="cpu", progress=False)
