"""DICOM results (deepminer/dicom_results.py): a real explanation (the tiny model, in-process) of a
phantom MG DICOM written as SEG + SR + SC, validated by ``dciodvfy`` (dicom3tools: no errors) and read
back with highdicom: the CAM within its 8-bit quantization (checked at the cell centres against the
explanation's own grid, not through the writer's resampling), the references, the marks of an
unverified AI result. And the CLI: ``--dicom-out`` writes them; a PNG gets the one-line error."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicomfixtures import dciodvfy_errors

from deepminer.cli import main

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _walk(item):
    """Every content item under ``item`` (depth first)."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A phantom R CC as MG DICOM (1024 x 604, 12 of 16 bits) and its explanation by a tiny model."""
    from dicomfixtures import write_dicom
    from modelfixtures import tiny_checkpoint

    from deepminer.client import local_explain
    from deepminer.data.phantoms import render_phantom

    folder = tmp_path_factory.mktemp("dicom-results")
    ph = render_phantom(3, 0, size=1024, view="CC", laterality="R")
    src = write_dicom(folder / "RCC.dcm", np.clip(ph.image, 0, 4095).astype(np.uint16), bits_stored=12,
                      laterality="R", view="CC", patient_id="PHANTOM-7", accession="ACC-7", orientation=("P", "L"))
    model = tiny_checkpoint(folder / "m")
    expl = local_explain(model, src, max_side=1024, unit_maps="top")
    return {"folder": folder, "src": src, "model": model, "expl": expl}


def test_seg_sr_sc_valid_and_read_back(explained, tmp_path):
    import highdicom as hd

    from deepminer import __version__
    from deepminer.concepts import get as concept
    from deepminer.dicom_results import SC_MAX_SIDE, SERIES_DESCRIPTION, build_results, read_source

    expl = explained["expl"]
    source = read_source(explained["src"])
    top = expl.ranked_units(expl.prediction, 8)
    labels = {top[1]: "Spiculated margin", top[3]: "my own idea"}  # a BI-RADS term and a local one
    res = build_results(source, expl, labels=labels)
    paths = dict(zip(("seg", "sr", "sc"), res.write(tmp_path)))

    for kind, p in paths.items():  # dciodvfy: no errors
        assert dciodvfy_errors(p) == [], (kind, dciodvfy_errors(p))

    seg_ds, sr_ds, sc_ds = (pydicom.dcmread(paths[k]) for k in ("seg", "sr", "sc"))
    assert (seg_ds.SOPClassUID, sr_ds.SOPClassUID, sc_ds.SOPClassUID) == (SEG_CLASS, SR_3D_CLASS, SC_CLASS)
    uids = {source.SOPInstanceUID, seg_ds.SOPInstanceUID, sr_ds.SOPInstanceUID, sc_ds.SOPInstanceUID}
    series = {source.SeriesInstanceUID, seg_ds.SeriesInstanceUID, sr_ds.SeriesInstanceUID, sc_ds.SeriesInstanceUID}
    assert len(uids) == 4 and len(series) == 4  # new instances in new series
    weights = expl.model["weights_sha256"]
    for ds in (seg_ds, sr_ds, sc_ds):  # filed with the study, marked, named
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert (ds.PatientID, ds.AccessionNumber) == ("PHANTOM-7", "ACC-7")
        assert ds.SeriesDescription == SERIES_DESCRIPTION and "not for diagnostic use" in ds.SeriesDescription
        eq = ds.ContributingEquipmentSequence[0]
        assert eq.Manufacturer == "DeepMiner Studio"
        assert list(eq.SoftwareVersions) == [__version__, weights]
        assert weights in eq.ContributionDescription
    assert sr_ds.VerificationFlag == "UNVERIFIED" and sr_ds.CompletionFlag == "COMPLETE"
    assert sc_ds.BurnedInAnnotation == "YES"

    # SEG: FRACTIONAL 8-bit; segment 1 = the CAM of the prediction, checked at the cell centres
    seg = hd.seg.segread(paths["seg"])
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 255
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    n = 1 + len(res.units)
    assert len(seg.SegmentSequence) == n == 1 + 3
    px = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=list(range(1, n + 1)),
                                           combine_segments=False, rescale_fractional=True)[0]
    H, W = int(source.Rows), int(source.Columns)
    assert px.shape == (H, W, n)
    cam = expl.cam[expl.class_index(expl.prediction)].astype(np.float64)
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)  # min-max, independently of the library
    h, w = cam.shape
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ys, xs = ((ii + 0.5) * H / h).astype(int), ((jj + 0.5) * W / w).astype(int)  # cell centres
    inner = (ii > 0) & (jj > 0) & (ii < h - 1) & (jj < w - 1)
    err = np.abs(px[ys, xs, 0] - cam)[inner]
    assert err.max() < 0.5 / 255 + 0.03, err.max()  # quantization + the half pixel off a cell's exact centre
    assert np.abs(np.rint(px[..., 0] * 255) - px[..., 0] * 255).max() < 1e-3  # 8-bit steps
    assert px[..., 0].max() > 0.99 and px[..., 0].min() < 0.01
    for k, u in enumerate(res.units, start=1):  # unit masks: 0/1, where the unit fires most
        m = px[..., k]
        assert set(np.unique(m)) <= {0.0, 1.0} and m.any()
        fmap = np.asarray(expl.unit_maps[u], dtype=np.float32)
        i, j = np.unravel_index(fmap.argmax(), fmap.shape)
        assert m[int((i + 0.5) * H / h), int((j + 0.5) * W / w)] == 1.0
    assert res.units[:2] == [top[1], top[3]]  # labelled units first, by influence
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence]
    assert (types[0].CodeValue, types[0].CodingSchemeDesignator) == ("130402", "DCM")  # Class activation
    spic = concept("mass_spiculated_margin")
    assert (types[1].CodeValue, types[1].CodingSchemeDesignator) == (spic.code_value, "SCT")
    assert types[2].CodingSchemeDesignator == "99DEEPMINER" and types[2].CodeMeaning == "my own idea"
    assert types[3].CodeValue == f"U-{res.units[2]}"

    # SR: TID 1500 with the prediction, every class probability and one ROI group per segment
    sr = hd.sr.srread(paths["sr"])
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    found = {m.name.meaning: m.value for m in groups[0].get_measurements()}
    for c, p in expl.probabilities.items():
        name = "Probability of cancer" if c == "malignant" else f"Probability of {c}"
        assert abs(float(found[name]) - p) < 1e-5
    evals = [e for e in groups[0].get_qualitative_evaluations() if e.name.value == "278201002"]  # Classification
    assert [e.value.meaning.lower() for e in evals] == [expl.prediction]
    texts = [i.TextValue for i in _walk(groups[0][0]) if i.get("ValueType") == "TEXT"]
    assert f"weights_sha256={weights}" in texts  # the model's identity, in the algorithm's parameters
    rois = sr.content.get_planar_roi_measurement_groups()
    assert len(rois) == n
    seen_frames = []
    for g in rois:
        item = next(i for i in g[0].ContentSequence if i.ValueType == "IMAGE")
        sop = item.ReferencedSOPSequence[0]
        assert sop.ReferencedSOPInstanceUID == seg_ds.SOPInstanceUID and "ReferencedSegmentNumber" not in sop
        seen_frames.append(int(sop.ReferencedFrameNumber))
    assert seen_frames == list(range(1, n + 1))
    finding_codes = [g.finding_type.value for g in rois]
    assert finding_codes[0] == "130402" and finding_codes[1] == spic.code_value
    evidence = {i.ReferencedSOPInstanceUID for s in sr_ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID, seg_ds.SOPInstanceUID}

    # SC: RGB overlay at most SC_MAX_SIDE long, the source's laterality and orientation
    assert sc_ds.PhotometricInterpretation == "RGB" and max(sc_ds.Rows, sc_ds.Columns) <= SC_MAX_SIDE
    assert sc_ds.Laterality == "R" and list(sc_ds.PatientOrientation) == ["P", "L"]


def test_results_zip_and_not_dicom(explained):
    import io
    import zipfile

    from deepminer.dicom_results import build_results, read_source
    from deepminer.errors import InputError

    res = build_results(read_source(explained["src"].read_bytes()), explained["expl"])
    with zipfile.ZipFile(io.BytesIO(res.zip_bytes())) as z:
        assert sorted(z.namelist()) == ["sc.dcm", "seg.dcm", "sr.dcm"]
        assert pydicom.dcmread(io.BytesIO(z.read("sr.dcm"))).VerificationFlag == "UNVERIFIED"
    with pytest.raises(InputError, match="DICOM results need a DICOM source"):
        read_source(b"\x89PNG\r\n\x1a\n" + b"\0" * 100, name="x.png")


def test_cli_dicom_out(explained, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "dcm"
    assert main(["explain", str(explained["src"]), "--model", str(explained["model"]), "--dicom-out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sc.dcm", "seg.dcm", "sr.dcm"]
    assert "wrote SEG, SR and SC" in capsys.readouterr().out
    assert dciodvfy_errors(out / "seg.dcm") == []
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png)
    assert main(["explain", str(png), "--model", str(explained["model"]), "--dicom-out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DICOM results need a DICOM source" in err[0], err
    assert not (tmp_path / "no").exists()


def test_bench_row_full_field():
    """The ``deepminer bench`` row: SEG + SR + SC of a 4,500 x 3,000 DICOM, built and serialised
    (the target, <= 500 ms, is checked by the bench, not here: a shared machine's load moves it)."""
    from modelfixtures import tiny_model

    from deepminer import bench

    r = bench.measure_dicom_results(tiny_model(0), repeats=1, warmup=0)
    assert r["dicom_results_ms"] > 0 and r["check"]["dicom_results_ms"] in ("PASS", "MISS")
    # four full-size 8-bit frames (54 MB raw) and a 1536-px RGB picture (4.7 MB raw), RLE Lossless
    assert 0 < r["bytes"]["seg.dcm"] <= bench.DICOM_RESULT_MB * 1e6, r["bytes"]
    assert 0 < r["bytes"]["sc.dcm"] <= bench.DICOM_RESULT_MB * 1e6, r["bytes"]
    line = "\n".join(bench.format_table({"environment": {"torch": "x", "device": "cpu", "torch_threads": 1,
                                                         "cpu_count": 2, "load_average": None},
                                         "settings": {"repeats": 1, "warmup": 0, "dissect": False},
                                         "targets": {k: {"bound": b} for k, (_, b, _) in bench.TARGETS.items()},
                                         "models": {}, "dicom_results": r}).splitlines())
    assert "DICOM results (SEG + SR + SC" in line, line


def test_workbench_download_and_studies_messages(app_env, monkeypatch, tmp_path):  # noqa: F811 - the fixture
    """AppTest (in-process model): the Explain page offers the DICOM results for a DICOM only; the
    Studies page without a PACS, with one that is down: a message each, no exception."""

    from dicomfixtures import write_dicom
    from apptest import run_app, sample_png

    from deepminer.data.phantoms import render_phantom

    at = run_app()
    ph = render_phantom(3, 1, size=512, view="MLO", laterality="L")
    dcm = write_dicom(tmp_path / "LMLO.dcm", np.clip(ph.image, 0, 4095).astype(np.uint16), bits_stored=12,
                      laterality="L", view="MLO")
    at.file_uploader(key="upload").upload("LMLO.dcm", dcm.read_bytes(), "application/dicom").run()
    assert not at.exception, at.exception
    labels = [b.proto.label for b in at.get("download_button")]
    assert "DICOM results (SEG, SR, SC)" in labels, labels
    name, data = sample_png(app_env, 0)
    at.file_uploader(key="upload").upload(name, data, "image/png").run()
    assert not at.exception, at.exception
    assert "DICOM results (SEG, SR, SC)" not in [b.proto.label for b in at.get("download_button")]

    monkeypatch.delenv("DEEPMINER_DICOMWEB_URL", raising=False)
    monkeypatch.delenv("DEEPMINER_PACS", raising=False)
    at = run_app("views/studies.py")
    assert any("No PACS is configured" in i.value for i in at.info)
    from serve.launch import free_port

    port = free_port()
    monkeypatch.setenv("DEEPMINER_DICOMWEB_URL", f"http://127.0.0.1:{port}/dicom-web")
    at = run_app("views/studies.py")
    assert not at.exception, at.exception
    assert any("the PACS is not reachable at" in w.value for w in at.warning), [w.value for w in at.warning]
