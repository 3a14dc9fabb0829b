"""``deepminer bench``: the report's shape and arithmetic (no timed asserts: speed targets are checked
by running the bench, not by tests)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deepminer import bench
from deepminer.cli import main

REQUIRED = ("explain_vs_forward", "gradcam_vs_explain", "dissect_vs_forward", "sketch_iou_ms")
TIMES = ("forward_ms", "explain_ms", "gradcam_ms", "sketch_iou_ms", "dissect_items_per_s", "forward_items_per_s")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    """One small real run of the whole bench on the tiny arch (both cases, dissection and the input rows
    included, the full-field decode on a 450 x 300 image), on one torch thread (steady on a loaded
    machine); the process's thread count is given back."""
    from functools import partial

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("deepminer.bench.run.measure_decode", partial(bench.measure_decode, shape=(450, 300)))
        report = bench.run_bench([bench.ModelSpec("arch", "tiny")], repeats=2, warmup=0, batch_size=4,
                                 device="cpu", threads=1, progress=False, dissect_image_px=256,
                                 log=lambda _m: None)
    assert torch.get_num_threads() == before
    return report


def _verdict(key: str, value: float) -> str:
    """PASS/MISS of ``value`` against its target as :data:`bench.TARGETS` states it."""
    op, bound, _cases = bench.TARGETS[key]
    assert op in ("<=", ">=")
    return "PASS" if (value <= bound if op == "<=" else value >= bound) else "MISS"


@pytest.mark.parametrize("key", sorted(bench.TARGETS))
def test_check_follows_each_target_across_its_bound(key):
    op, bound, cases = bench.TARGETS[key]
    inside, outside = (bound * 0.99, bound * 1.01) if op == "<=" else (bound * 1.01, bound * 0.99)
    case = cases[0] if cases else None
    assert bench.check(key, bound, case) == "PASS"  # the bound itself meets the target
    assert bench.check(key, inside, case) == "PASS" and bench.check(key, outside, case) == "MISS"
    assert bench.check(key, float("nan"), case) is None and bench.check(key, None, case) is None
    other = next((c for c in bench.CASES if c not in cases), None)
    if cases and other is not None:
        assert bench.check(key, inside, other) is None  # a case the target does not apply to


@pytest.mark.slow  # the module's bench run: ~15 s CPU, pytorch-grad-cam's import alone several
def test_report_has_finite_positive_keys_for_both_cases(tiny_report):
    cases = tiny_report["models"]["tiny"]["cases"]
    assert set(cases) == {"patch", "whole"}
    for case, r in cases.items():
        for key in REQUIRED + TIMES:
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (case, key, r.get(key))
        assert r["input"] == list(bench.CASES[case])
        for key in ("forward_ms", "explain_ms", "gradcam_ms", "sketch_iou_ms"):
            assert len(r["raw"][key]) == 2 and len(r["raw_cpu"][key]) == 2
            assert math.isfinite(r["cpu"][key])
    # the tiny CNN has stride 16: 224 -> 14x14 cells, 1536x908 -> 96x57
    assert cases["patch"]["map"] == [14, 14] and cases["whole"]["map"] == [96, 57]
    env = tiny_report["environment"]
    assert env["cpu_count"] >= 1 and env["torch_threads"] == 1 and env["torch"] and env["device"] == "cpu"


@pytest.mark.slow
def test_ratios_are_ratios_of_the_reported_medians(tiny_report):
    d = tiny_report["models"]["tiny"]["dissect"]
    assert d["items"] >= 4 and d["batch_size"] == 4
    for r in tiny_report["models"]["tiny"]["cases"].values():
        for key in ("forward_ms", "explain_ms", "gradcam_ms", "sketch_iou_ms"):
            assert r[key] == pytest.approx(float(np.median(r["raw"][key])))
        assert r["explain_vs_forward"] == pytest.approx(r["explain_ms"] / r["forward_ms"])
        assert r["gradcam_vs_explain"] == pytest.approx(r["gradcam_ms"] / r["explain_ms"])
        assert r["dissect_items_per_s"] == pytest.approx(float(np.median(d["raw"]["dissect_items_per_s"])))
        assert r["dissect_vs_forward"] == pytest.approx(r["dissect_items_per_s"] / r["forward_items_per_s"])
        assert r["cpu"]["explain_vs_forward"] == pytest.approx(r["cpu"]["explain_ms"] / r["cpu"]["forward_ms"])
        # PASS/MISS follow the targets (read from bench.TARGETS, the one place they are written)
        for key in ("explain_vs_forward", "gradcam_vs_explain", "dissect_vs_forward", "ablate_ms", "domain_ms"):
            assert r["check"][key] == _verdict(key, r[key]), key
    assert tiny_report["models"]["tiny"]["cases"]["patch"]["check"]["sketch_iou_ms"] is None  # whole image only


@pytest.mark.slow
def test_table_prints_every_row(tiny_report):
    text = bench.format_table(tiny_report)
    lines = text.splitlines()
    assert any(line.startswith("model") and "explain/fwd" in line and "dissect/fwd" in line for line in lines)
    rows = [line for line in lines if line.startswith("tiny ")]
    assert len(rows) == 2 and "224x224" in rows[0] and "1536x908" in rows[1]
    r = tiny_report["models"]["tiny"]["cases"]["whole"]
    assert f"{r['explain_vs_forward']:.2f} {r['check']['explain_vs_forward']}" in rows[1]


@pytest.mark.slow
def test_json_round_trips(tiny_report):
    out = json.loads(json.dumps(bench.to_json(tiny_report)))
    r = out["models"]["tiny"]["cases"]["whole"]
    assert r["explain_vs_forward"] == pytest.approx(r["explain_ms"] / r["forward_ms"], rel=1e-3)


def test_serve_measure_with_a_real_callable():
    """measure_serve: p50/p90 of whatever the round trip returns; a different PNG each request."""
    import io

    from PIL import Image

    from deepminer.models import build_model

    seen: list[bytes] = []
    delays = [5.0, 7.0, 9.0, 30.0]

    def round_trip(png: bytes) -> float:
        seen.append(png)
        return delays[len(seen) - 2] if len(seen) >= 2 else 100.0  # first (warm-up) request: 100

    model = build_model("tiny", pretrained=False).eval()
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    res = bench.measure_serve(model, img, round_trip, torch.device("cpu"),
                              repeats=4, warmup=1, jit_warmup=0)
    assert res["serve_p50_ms"] == pytest.approx(8.0)
    assert res["serve_p90_ms"] == pytest.approx(float(np.percentile(delays, 90)))
    assert res["serve_vs_forward_ms"] == pytest.approx(8.0 - res["forward_ms"])
    assert len(set(seen)) == 5  # every request a distinct image: the server's cache cannot answer
    a = np.asarray(Image.open(io.BytesIO(seen[1])))
    assert a.dtype == np.uint8 and a.shape == (64, 64)
    assert res["serve_overhead_ms"] is None  # a bare number says nothing of the server's own forward


def test_serve_measure_matches_the_workers_threads_and_reports_overhead(tiny_report):
    """A round trip that reports the server's own forward and threads: the local forward runs on as
    many threads (restored afterwards), and the overhead is the median of round trip - own forward."""
    from deepminer.models import build_model

    threads_seen: list[int] = []
    pngs_seen: list[bytes] = []
    # (round trip, own forward): 3 JIT warm-up requests, 1 warm-up, 3 timed
    answers = [(40.0, 0.0)] * 3 + [(100.0, 90.0), (50.0, 41.0), (60.0, 45.0), (70.0, 58.0)]

    def round_trip(png: bytes) -> dict:
        threads_seen.append(torch.get_num_threads())
        pngs_seen.append(png)
        ms, own = answers[len(threads_seen) - 1]
        return {"ms": ms, "server_forward_ms": own, "threads": 1, "device": "cpu"}

    model = build_model("tiny", pretrained=False).eval()
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = bench.measure_serve(model, img, round_trip, torch.device("cpu"), repeats=3, warmup=1, jit_warmup=3)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [2] + [1] * 6  # matched from the first answer on
    assert len(set(pngs_seen[:3])) == 1 and len(set(pngs_seen)) == 5  # warm-up: one image, cached
    assert pngs_seen[0] not in pngs_seen[3:]
    assert res["forward_threads"] == 1 and res["server_threads"] == 1 and res["server_device"] == "cpu"
    assert res["jit_warmup"] == 3
    assert res["serve_overhead_ms"] == pytest.approx(12.0)  # median of 9, 15, 12
    assert res["server_forward_ms"] == pytest.approx(45.0)
    assert res["serve_p50_ms"] == pytest.approx(60.0)
    text = bench.format_table({**tiny_report, "serve": {"url": "http://x", "local_model": "tiny", **res}})
    assert "round trip - own forward, median 12.0 ms" in text and "(1 threads)" in text


def test_cli_json_and_table(capsys):
    argv = ["bench", "--arch", "tiny", "--cases", "patch", "--repeats", "1", "--warmup", "0", "--no-dissect",
            "--no-eval"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["models"]["tiny"]["cases"]["patch"]
    assert r["forward_ms"] > 0 and r["explain_vs_forward"] > 0 and "whole" not in out["models"]["tiny"]["cases"]
    assert out["startup"]["startup_help_s"] > 0  # a whole run ends with the start-up rows
    assert main(argv + ["--no-startup"]) == 0  # (the start-up subprocesses once is enough)
    assert "tiny   patch  224x224" in capsys.readouterr().out


def test_two_models_in_one_run(tmp_path, capsys):
    from deepminer.models import build_model, save_model

    path = tmp_path / "demo" / "model.pt"
    path.parent.mkdir()
    save_model(build_model("tiny", pretrained=False), path)
    argv = ["bench", "--model", str(path), "--arch", "tiny", "--cases", "patch", "--repeats", "1",
            "--warmup", "0", "--no-dissect", "--no-eval", "--no-startup", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["models"]) == ["demo", "tiny"]
    assert out["models"]["demo"]["weights"] == "checkpoint"


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no/such/model.pt"], "no/such/model.pt: no such model file"),
    (["--arch", "nosuch"], "unknown arch 'nosuch'"),
    (["--arch", "tiny", "--cases", "patch,huge"], "--cases: unknown case 'huge'"),
    (["--arch", "tiny", "--repeats", "0"], "--repeats"),
    (["--arch", "tiny", "--serve", "http://127.0.0.1:9"], "not reachable"),
    pytest.param(["--arch", "tiny", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("deepminer bench: error:")


def test_serve_variants_differ_inside_the_tissue_mask():
    """Each request of `bench --serve` must miss the server's feature cache: the variants must still
    differ after the tissue mask zeroes the background (a changed corner pixel would not)."""
    import io

    import numpy as np
    from PIL import Image

    from deepminer.bench import png8_variants
    from deepminer.data.phantoms import render_phantom
    from deepminer.data.tissue import keep_tissue

    image = render_phantom(3, 0, size=256).image.astype(np.float32) / 4095.0
    masked = []
    for png in png8_variants(image, 4):
        pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255.0
        masked.append(keep_tissue(pixels)[0].tobytes())
    assert len(set(masked)) == 4


# -- start-up rows (subprocess wall times; no assert against their target) -------------------------

def test_command_wall_s_measures_what_runs():
    import sys

    quick = bench.command_wall_s([sys.executable, "-c", "pass"], repeats=2, warmup=0)
    slow = bench.command_wall_s([sys.executable, "-c", "import time; time.sleep(0.5)"], repeats=2, warmup=1)
    assert len(quick) == 2 and len(slow) == 2 and all(t > 0 for t in quick + slow)
    assert min(slow) >= 0.5 and bench.median(slow) > bench.median(quick)
    with pytest.raises(bench.InputError, match="failed: SystemExit: boom"):
        bench.command_wall_s([sys.executable, "-c", "import sys; sys.stderr.write('x\\nSystemExit: boom\\n'); "
                                                  "sys.exit(3)"], repeats=1, warmup=0)


def test_startup_dicom_is_what_inspect_reads(tmp_path):
    from deepminer.data.io import load_image

    loaded = load_image(bench.startup_dicom(tmp_path / "s.dcm", shape=(450, 300)))
    assert (loaded.height, loaded.width, loaded.bits_stored, loaded.format) == (450, 300, 16, "dicom")
    assert (loaded.laterality, loaded.view) == ("L", "CC")
    assert bench.STARTUP_DICOM == (4500, 3000)


def test_cli_startup_rows(capsys):
    assert main(["bench", "--startup-only", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["startup"]
    assert s["startup_help_s"] > 0 and s["startup_inspect_s"] > 0
    assert s["raw"]["startup_help_s"] == [s["startup_help_s"]]
    assert s["check"]["startup_help_s"] == bench.check("startup_help_s", s["startup_help_s"])
    text = "\n".join(bench.format_startup({**s, "startup_help_s": 0.5, "check": {"startup_help_s": "MISS"}}))
    assert "deepminer --help" in text and f"0.50 s MISS (target <= {bench.TARGETS['startup_help_s'][1]} s)" in text
    assert "inspect 4500x3000 16-bit DICOM" in text
    assert main(["bench", "--startup-only", "--no-startup"]) == 2


def test_evaluation_cost_rows(capsys):
    """The evaluation-cost rows: CAM-family localization evaluation vs the bare forward on the same
    phantoms, each peer, faithfulness and sanity; checked against its target (bench.TARGETS)."""
    argv = ["bench", "--arch", "tiny", "--cases", "patch", "--repeats", "1", "--warmup", "0", "--no-dissect",
            "--no-startup", "--json"]
    assert main(argv) == 0
    ev = json.loads(capsys.readouterr().out)["eval"]
    assert ev["images"] == 3 and ev["forward_ms"] > 0 and ev["eval_cam_ms"] > 0
    assert ev["eval_cam_vs_forward"] == pytest.approx(ev["eval_cam_ms"] / ev["forward_ms"], rel=1e-3)
    assert set(ev["peers_vs_forward"]) == {"gradcam", "gradcam++", "guided_backprop", "integrated_gradients",
                                           "smoothgrad"}
    assert ev["check"]["eval_cam_vs_forward"] in ("PASS", "MISS") and ev["sanity_ms"] > ev["forward_ms"]
    assert len(ev["raw"]["forward_ms"]) == 3  # 3 images x 1 repeat, every step timed on each
    from deepminer.evaluation.cost import format_eval_cost

    text = "\n".join(format_eval_cost(ev, ev["check"]["eval_cam_vs_forward"]))
    target = bench.TARGETS["eval_cam_vs_forward"][1]
    assert "CAM/probability map/top units eval" in text and f"target <= {target}x" in text


# -- input rows: full-field decode + tissue mask, word vectors (once timed asserts in tests) -----------

@pytest.mark.slow  # the tiny run above
def test_input_rows_in_the_run(tiny_report):
    d, w = tiny_report["decode"], tiny_report["word_vectors"]
    assert d["formats"] == ["dicom", "dicom-rle", "png"] and d["image"].startswith("450 x 300")
    for kind in d["formats"]:
        assert len(d["raw"][kind]) == 2 and d["per_format_s"][kind] == pytest.approx(float(np.median(d["raw"][kind])))
    assert d["decode_mask_s"] == max(d["per_format_s"].values())
    assert d["check"]["decode_mask_s"] == _verdict("decode_mask_s", d["decode_mask_s"])
    assert w["words"] == 400_000 and w["word_vectors_load_s"] == pytest.approx(float(np.median(w["raw"])))
    assert w["check"]["word_vectors_load_s"] == _verdict("word_vectors_load_s", w["word_vectors_load_s"])
    text = bench.format_table(tiny_report)
    assert f"slowest {d['decode_mask_s']:.2f} s {d['check']['decode_mask_s']}" in text
    assert f"target <= {bench.TARGETS['decode_mask_s'][1]:g} s" in text
    assert f"{w['word_vectors_load_s']:.2f} s {w['check']['word_vectors_load_s']}" in text


def test_decode_inputs_are_one_image_in_three_formats(tmp_path):
    from deepminer.data.io import load_image

    files = bench.decode_inputs(tmp_path, shape=(90, 60))
    images = {k: load_image(p) for k, p in files.items()}
    assert {k: (im.height, im.width) for k, im in images.items()} == {k: (90, 60) for k in files}
    assert images["dicom-rle"].format == images["dicom"].format == "dicom" and images["png"].format == "png"
    assert np.array_equal(images["dicom"].pixels, images["dicom-rle"].pixels)
    np.testing.assert_allclose(images["png"].pixels, images["dicom"].pixels, atol=1e-6)  # the same 16-bit values
