"""Sources from real archives (docs/dicom.md, "Sources from real archives"): a corpus of the quirks
real mammography DICOMs have (tests/dicomfixtures.py ``write_quirk``), each taken through
``deepminer inspect``, ``deepminer explain`` and ``--dicom-out``; every result object is checked by
``dciodvfy`` (no errors) and read back with highdicom. What cannot give a valid result is refused in
one line (exit 2). Plus the pieces: where laterality and view were found, the Mammography IOD's
Patient Orientation, person names, dates and times, and the RLE Lossless encoder."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicomfixtures import QUIRKS, REFUSED, dciodvfy_errors, write_quirk

from deepminer.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from modelfixtures import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("quirk-model"))


def _expected_orientation(quirk: str, laterality: str, view: str) -> list[str]:
    row = "A" if laterality == "L" else "P"  # write_quirk: chest wall left for L, right for R
    other = "R" if laterality == "L" else "L"
    return [row, other if view == "CC" else "F" + other]


@pytest.mark.parametrize("quirk", QUIRKS)
def test_quirk_inspect_explain_dicom_out(quirk, model, tmp_path, capsys):
    import highdicom as hd

    laterality, view = ("L", "MLO") if quirk in ("film_mlo", "jpegls") else ("R", "CC") \
        if quirk in ("rle", "utf8_name") else ("L", "CC")
    src = write_quirk(tmp_path / f"{quirk}.dcm", quirk, laterality=laterality, view=view)
    assert main(["inspect", str(src)]) == 0
    facts = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert (facts["laterality"], facts["view"]) == (laterality, view), facts
    if quirk == "film_cc":  # where they were found, said
        assert facts["inferred"] == (f"laterality {laterality} from Laterality (series); "
                                     f"view {view} from PatientOrientation"), facts
    elif quirk == "patient_id_only":
        assert facts["inferred"] == f"laterality {laterality} from PatientID; view {view} from PatientID", facts

    out = tmp_path / "results"
    assert main(["explain", str(src), "--model", str(model), "--dicom-out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    for name in ("seg.dcm", "sr.dcm", "sc.dcm"):
        assert dciodvfy_errors(out / name) == [], (quirk, name, dciodvfy_errors(out / name))
    seg = hd.seg.segread(out / "seg.dcm")
    sc = pydicom.dcmread(out / "sc.dcm")
    source = pydicom.dcmread(src)
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless and sc.pixel_array.shape[2] == 3
    assert seg.pixel_array.shape == (seg.NumberOfFrames, source.Rows, source.Columns)
    expected = _expected_orientation(quirk, laterality, view)
    assert list(seg.PatientOrientation) == expected and list(sc.PatientOrientation) == expected, quirk
    assert sc.Laterality == laterality
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    name = str(seg.PatientName)
    if quirk in ("latin1_name", "utf8_name"):  # non-ASCII names carried, written as UTF-8
        assert name == str(source.PatientName) and seg.SpecificCharacterSet == "ISO_IR 192"
        assert str(pydicom.dcmread(out / "sr.dcm").PatientName) == name
    elif quirk == "retired_pn":
        assert name == "SMITH^MARY^ANN" and str(sc.ReferringPhysicianName) == "JONES^P"
    else:
        assert name == "DOE^JANE"
    if quirk == "no_dates":
        assert seg.StudyDate == "" and seg.StudyTime == ""
    elif quirk == "old_dates":
        assert (seg.StudyDate, seg.StudyTime) == ("19980312", "101500") and seg.PatientBirthDate == ""
    else:
        assert seg.StudyDate == "19980312"


@pytest.mark.parametrize("quirk", sorted(REFUSED))
def test_refused_sources_one_line(quirk, model, tmp_path, capsys):
    src = write_quirk(tmp_path / f"{quirk}.dcm", quirk)
    for argv in (["inspect", str(src)], ["explain", str(src), "--model", str(model), "--dicom-out",
                                         str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and REFUSED[quirk] in err[0], err
    assert not (tmp_path / "out").exists()


def test_unknown_orientation_left_out(model, tmp_path, capsys):
    """No laterality anywhere: Patient Orientation cannot be known and is written empty (Type 2C),
    never invented; the results stay valid."""
    src = write_quirk(tmp_path / "x.dcm", "film_cc")
    ds = pydicom.dcmread(src)
    del ds.Laterality
    ds.save_as(src)
    out = tmp_path / "r"
    assert main(["explain", str(src), "--model", str(model), "--dicom-out", str(out)]) == 0
    for name in ("seg.dcm", "sr.dcm", "sc.dcm"):
        assert dciodvfy_errors(out / name) == [], (name, dciodvfy_errors(out / name))
    assert pydicom.dcmread(out / "seg.dcm").PatientOrientation in ("", None)
    assert pydicom.dcmread(out / "sc.dcm").PatientOrientation in ("", None)


def test_placement_says_where():
    from pydicom.dataset import Dataset

    from deepminer.dicom_source import placement

    ds = Dataset()
    ds.Laterality, ds.PatientOrientation = "L", "MLO"
    p = placement(ds)
    assert (p.laterality, p.view) == ("L", "MLO")
    assert p.inferred() == ["laterality L from Laterality (series)", "view MLO from PatientOrientation"]
    ds = Dataset()
    ds.PatientID = "Calc-Test_P_00038_RIGHT_CC"
    assert placement(ds).inferred() == ["laterality R from PatientID", "view CC from PatientID"]
    ds.ImageLaterality, ds.ViewPosition = "L", "MLO"  # the image's own attributes win
    p = placement(ds)
    assert (p.laterality, p.view, p.inferred()) == ("L", "MLO", [])
    assert placement(Dataset()) == placement(Dataset())
    assert placement(Dataset()).laterality is None


def test_orientation_names_and_dates():
    from deepminer.dicom_source import _date, _time, mg_orientation, person_name, valid_orientation

    assert mg_orientation("L", "CC", "left") == ("A", "R")
    assert mg_orientation("R", "CC", "right") == ("P", "L")
    assert mg_orientation("L", "MLO", "left") == ("A", "FR")
    assert mg_orientation("R", "MLO", "right") == ("P", "FL")
    assert mg_orientation("R", "MLO", "left") == ("A", "FL")
    assert mg_orientation(None, "CC", "left") is None and mg_orientation("L", "ML", "left") is None
    assert valid_orientation(["A", "FR"]) == ("A", "FR")
    assert valid_orientation("CC") is None and valid_orientation(["M", "O"]) is None
    assert person_name("DOE, JANE Q") == "DOE^JANE^Q"
    assert person_name("A^B^C^D^E^F") == "A^B^C^D^E F"
    assert person_name("Müller^Jürgen") == "Müller^Jürgen"
    assert person_name("X" * 80) == "X" * 64
    assert _date("1998.03.12") == "19980312" and _date("19980312") == "19980312"
    assert _date("19451345") is None and _date("") is None
    assert _time("10:15:00") == "101500" and _time("101500.123") == "101500.123" and _time("2599") is None


@pytest.mark.parametrize("dtype,samples", [(np.uint8, 1), (np.uint16, 1), (np.uint8, 3)])
def test_rle_round_trip(dtype, samples):
    """The vectorised encoder against pydicom's RLE decoder: random bytes (literal packets), long runs
    (replicate packets over 128), rows of odd widths, 8/16 bit, RGB."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate

    from deepminer.rle import encode_frame

    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    for shape in [(1, 1), (3, 5), (7, 300), (20, 257)]:
        full = (*shape, samples) if samples > 1 else shape
        for arr in (rng.integers(0, top, full, endpoint=True).astype(dtype), np.zeros(full, dtype),
                    (rng.integers(0, 2, full) * top).astype(dtype), np.repeat(rng.integers(0, 3, (*full[:1], 1, *full[2:])),
                                                                            shape[1], axis=1).astype(dtype)):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
            ds.Rows, ds.Columns, ds.SamplesPerPixel = shape[0], shape[1], samples
            ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
            if samples == 3:
                ds.PlanarConfiguration = 0
            ds.BitsAllocated = ds.BitsStored = np.dtype(dtype).itemsize * 8
            ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
            ds.PixelData = encapsulate([encode_frame(arr)])
            assert np.array_equal(ds.pixel_array.reshape(arr.shape), arr), (shape, dtype)


def test_workbench_upload_quirks(app_env, tmp_path):
    """The Explain page (AppTest, in-process model): every quirk DICOM is explained and offered as DICOM
    results; a multi-frame or non-MG file gets a one-line message on the page, no exception."""
    from apptest import run_app

    at = run_app()
    for quirk in QUIRKS:
        src = write_quirk(tmp_path / f"{quirk}.dcm", quirk)
        at.file_uploader(key="upload").upload(src.name, src.read_bytes(), "application/dicom").run()
        assert not at.exception, (quirk, at.exception)
        assert "DICOM results (SEG, SR, SC)" in [b.proto.label for b in at.get("download_button")], quirk
    for quirk, words in REFUSED.items():
        src = write_quirk(tmp_path / f"{quirk}.dcm", quirk)
        at.file_uploader(key="upload").upload(src.name, src.read_bytes(), "application/dicom").run()
        assert not at.exception, (quirk, at.exception)
        said = [m.value.replace("\\", "") for m in [*at.error, *at.warning]]  # markdown escapes off
        assert any(words in m and "\n" not in m.strip() for m in said), (quirk, said)
        assert "DICOM results (SEG, SR, SC)" not in [b.proto.label for b in at.get("download_button")]


def test_refused_over_http_answer(model, tmp_path):
    """The request path the TorchServe handler runs (ExplainService + error_json): a multi-frame or
    non-MG DICOM answers 400 with the one-line reason; a quirk source is explained."""
    from deepminer.explain.service import ExplainService, error_json

    service = ExplainService.load(model)
    ok = service.explain(write_quirk(tmp_path / "ok.dcm", "film_mlo", view="MLO").read_bytes())
    assert ok.input["format"] == "dicom"
    for quirk, words in REFUSED.items():
        with pytest.raises(Exception) as info:
            service.explain(write_quirk(tmp_path / f"{quirk}.dcm", quirk).read_bytes())
        status, body = error_json(info.value)
        assert status == 400 and words in body["message"] and "\n" not in body["message"], (quirk, body)
