"""The PACS and the exam against a real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, started
unprivileged on a free loopback port under a tmp folder): store a 4-view phantom exam and other
studies (STOW-RS), list them with paging and patient/accession filters (QIDO-RS), retrieve the views
(WADO-RS) pixel-exact, open the study as a hung exam explained by a tiny model (in-process), store the
DICOM results back and read them from Orthanc as valid DICOM. Failures: the PACS down, a study with no
mammogram, an image that fails to decode. And the exam rules, against independent computations."""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from serve.launch import free_port

pytestmark = pytest.mark.skipif(shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").is_file(),
                                reason="Orthanc is missing: bash scripts/setup.sh (as root)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    from deepminer.pacs import Orthanc

    orth = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port()).start(timeout=60)
    print(f"\nOrthanc ready in {orth.started_s:.2f} s")
    yield orth
    orth.stop()


@pytest.fixture(scope="module")
def filled(orthanc, tmp_path_factory):
    """The PACS holding: a 4-view phantom exam (EXAM0001 / ACC-EXAM), five small studies of patients
    PAGE-0..4 (accessions A-0..4), and a study with a secondary capture of modality OT only."""
    from dicomfixtures import SECONDARY_CAPTURE, write_dicom, write_exam

    from deepminer.pacs import Pacs

    folder = tmp_path_factory.mktemp("exam")
    exam = write_exam(folder / "exam", seed=5, patients=(0, 1), height=512, accession="ACC-EXAM")
    small = [write_dicom(folder / f"s{i}.dcm", np.full((32, 24), 100 * i, np.uint16), patient_id=f"PAGE-{i}",
                         accession=f"A-{i}", laterality="L", view="CC") for i in range(5)]
    other = write_dicom(folder / "ot.dcm", np.zeros((16, 16), np.uint8), patient_id="NO-MAMMO",
                        sop_class=SECONDARY_CAPTURE)
    ot = pydicom.dcmread(other)
    ot.Modality = "OT"
    ot.save_as(other, enforce_file_format=True)
    with Pacs(orthanc.dicomweb_url) as p:
        stored = p.store([pydicom.dcmread(f) for f in [*exam.values(), *small, other]])
    assert len(stored) == 4 + 5 + 1
    return {"exam": exam, "small": small, "other": other}


def test_search_paging_and_filters(orthanc, filled):
    from deepminer.pacs import Pacs

    with Pacs(orthanc.dicomweb_url) as p:
        pages, offset = [], 0
        while True:
            page = p.search_studies(limit=3, offset=offset)
            pages.append(page)
            if not page.has_more:
                break
            offset += 3
        uids = [s.uid for pg in pages for s in pg.studies]
        assert [len(pg.studies) for pg in pages] == [3, 3, 1]
        assert len(set(uids)) == 7  # every study once
        hits = p.search_studies(patient_id="PAGE-").studies
        assert sorted(s.patient_id for s in hits) == [f"PAGE-{i}" for i in range(5)]
        hit, = p.search_studies(accession="ACC-EX").studies
        assert hit.patient_id == "EXAM0001" and hit.modalities == ("MG",) and hit.instances == 4
        assert p.search_studies(patient_id="PAGE-3", accession="A-3").studies[0].accession == "A-3"
        assert p.search_studies(patient_id="nobody").studies == []
        insts = p.instances(hit.uid)
        assert sorted((i.laterality, i.view) for i in insts) == [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
        assert all(i.is_mammogram for i in insts)
        rcc = next(i for i in insts if (i.laterality, i.view) == ("R", "CC"))
        got = pydicom.dcmread(io.BytesIO(p.retrieve_bytes(rcc)))
        assert np.array_equal(got.pixel_array, pydicom.dcmread(filled["exam"]["RCC"]).pixel_array)
        nomammo, = p.search_studies(patient_id="NO-MAMMO").studies
        assert [i.is_mammogram for i in p.instances(nomammo.uid)] == [False]


def test_pacs_down_and_refusals(orthanc):
    from deepminer.errors import InputError
    from deepminer.pacs import Pacs, PacsError, PacsUnavailable

    with Pacs(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5) as p:
        with pytest.raises(PacsUnavailable) as e:
            p.search_studies()
        assert "not reachable" in str(e.value) and "\n" not in str(e.value)
        assert p.ping() is False
    with Pacs(orthanc.url + "/no-such-root", timeout=5) as p:
        with pytest.raises(PacsError, match=r"answered 404"):
            p.search_studies()
    with Pacs(orthanc.dicomweb_url) as p, pytest.raises(InputError, match="limit"):
        p.search_studies(limit=0)


def test_open_exam_explain_and_store_results(orthanc, filled, tmp_path):
    """A study from the PACS opened as an exam (tiny model, in-process), hung, scored; its SEG/SR/SC
    stored back and read from Orthanc: dciodvfy clean, the CAM and the references right."""
    import highdicom as hd
    from modelfixtures import tiny_checkpoint
    from dicomfixtures import dciodvfy_errors

    from deepminer.client import local_explain
    from deepminer.dicom_results import cam_for_seg
    from deepminer.pacs import Pacs
    from ui import studies

    model = tiny_checkpoint(tmp_path / "m")
    with Pacs(orthanc.dicomweb_url) as p:
        study, = p.search_studies(accession="ACC-EXAM").studies
        insts = [i for i in p.instances(study.uid) if i.is_mammogram]
        fetch = [(i.sop_uid, f"{i.laterality}{i.view}", lambda i=i: p.retrieve_bytes(i)) for i in insts]
        fetch.append(("broken", "broken.dcm", lambda: filled["exam"]["RCC"].read_bytes()[:2000]))  # fails to decode
        exam = studies.open_exam(fetch, lambda b: local_explain(model, b, max_side=512, unit_maps="top"), 512,
                                 study_uid=study.uid)
        assert exam.problem is None and exam.hanging.missing == []
        broken = next(v for v in exam.views if v.key == "broken")
        assert broken.error and broken.result is None and "\n" not in broken.error
        assert len(exam.explained) == 4
        for lat in ("R", "L"):
            for vw in ("CC", "MLO"):
                v = exam.slot(lat, vw)
                assert (v.laterality, v.view) == (lat, vw)
                assert v.mirror is False  # phantoms: chest wall already on the hanging side
                pic = studies.picture(v)
                assert pic.shape[:2] == v.preview.shape and pic.dtype == np.uint8
        scores = exam.scores()
        for lat in ("R", "L"):  # the rule, computed again here
            pm = {vw: exam.slot(lat, vw).result.probabilities["malignant"] for vw in ("CC", "MLO")}
            assert scores[lat].score == pytest.approx(max(pm.values()))
            preds = {vw: exam.slot(lat, vw).result.prediction for vw in ("CC", "MLO")}
            assert scores[lat].agree == (preds["CC"] == preds["MLO"])

        datasets, skipped = studies.dicom_results(exam)
        assert len(datasets) == 12 and skipped == ["broken.dcm: not explained"]
        assert len(p.store(datasets, study_uid=study.uid)) == 12
        after = p.instances(study.uid)
        assert sorted(i.modality for i in after) == sorted(["MG"] * 4 + ["SEG"] * 4 + ["SR"] * 4 + ["OT"] * 4)
        assert sum(i.is_mammogram for i in after) == 4  # our results are not opened as views
        rcc = exam.slot("R", "CC")
        for inst in after:
            if inst.modality == "MG":
                continue
            data = p.retrieve_bytes(inst)
            path = tmp_path / f"{inst.modality}-{inst.sop_uid}.dcm"
            path.write_bytes(data)
            assert dciodvfy_errors(path) == [], (inst.modality, dciodvfy_errors(path))
            ds = pydicom.dcmread(path)
            assert ds.SeriesDescription.startswith("UNVERIFIED AI result")
            if inst.modality == "SEG" and ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
                    .ReferencedSOPInstanceUID == rcc.key:
                seg = hd.seg.segread(path)
                px = seg.get_pixels_by_source_instance([rcc.key], segment_numbers=[1], rescale_fractional=True)
                expect = cam_for_seg(rcc.result, px.shape[1:3]) / 255.0
                assert np.abs(px[0, :, :, 0] - expect).max() <= 0.5 / 255 + 1e-6


def test_no_mammogram_and_bad_exams():
    from deepminer.exam import ExamView, hang
    from ui import studies

    exam = studies.open_exam([("x", "x.png", lambda: b"not an image at all")], lambda b: None, 256)
    assert exam.hanging is None and exam.views[0].error
    with pytest.raises(Exception, match="no mammogram"):
        hang([ExamView("a", None, "CC"), ExamView("b", "L", "ML")])
    h = hang([ExamView("a", "R", "CC"), ExamView("b", "R", "CC"), ExamView("c", "L", None)])
    assert list(h.slots) == [("R", "CC")] and [why for _, why in h.unplaced] == ["a second RCC image",
                                                                                 "view is not CC or MLO"]
    assert h.missing == ["LCC", "RMLO", "LMLO"]
    assert [[None if v is None else v.key for v in row] for row in h.grid()] == [["a", None], [None, None]]


def test_mirroring_and_scores_rules():
    from deepminer.exam import breast_scores, chest_wall_side, needs_mirror

    img = np.zeros((40, 30), np.float32)
    img[:, :12] = 0.8  # breast against the left edge
    assert chest_wall_side(img) == "left"
    assert needs_mirror("R", img) and not needs_mirror("L", img)
    assert not needs_mirror("R", img[:, ::-1]) and needs_mirror("L", img[:, ::-1])
    assert needs_mirror("R", img[:, ::-1], orientation=("A", "R"))  # the tag wins over the pixels
    assert not needs_mirror("R", img, orientation=("P", "L"))

    def r(pm, pred):
        return SimpleNamespace(probabilities={"normal": 0.1, "benign": 0.9 - pm, "malignant": pm}, prediction=pred)

    s = breast_scores({("R", "CC"): r(0.2, "benign"), ("R", "MLO"): r(0.7, "malignant"), ("L", "MLO"): r(0.4, "benign")})
    assert (s["R"].score, s["R"].from_view, s["R"].agree) == (0.7, "MLO", False)
    assert s["R"].difference == pytest.approx(0.5) and "disagree" in s["R"].agreement_text
    assert (s["L"].score, s["L"].agree, s["L"].agreement_text) == (0.4, None, "one view only")


def test_quirk_exam_from_pacs(orthanc, tmp_path):
    """A 4-view exam of DICOMs as film archives hold them (laterality only in the series' Laterality,
    the view only in a single-valued Patient Orientation or in ViewPosition; RLE, JPEG-LS; a retired
    name, ISO_IR 100), plus a view with no laterality anywhere: stored, opened from the PACS, the four
    hung with what was inferred and from where, the fifth named as not hung; the results stored back
    and read from Orthanc, dciodvfy clean, with the derived Patient Orientation."""
    from dicomfixtures import write_quirk
    from modelfixtures import tiny_checkpoint
    from pydicom.uid import generate_uid
    from dicomfixtures import dciodvfy_errors

    from deepminer.client import local_explain
    from deepminer.pacs import Pacs
    from ui import studies

    study_uid = generate_uid()
    kinds = {("R", "CC"): "film_cc", ("L", "CC"): "series_laterality", ("R", "MLO"): "film_mlo",
             ("L", "MLO"): "jpegls"}
    files = [write_quirk(tmp_path / f"{lat}{vw}.dcm", q, laterality=lat, view=vw, study_uid=study_uid,
                         patient_id="QUIRK-EXAM") for (lat, vw), q in kinds.items()]
    stray = write_quirk(tmp_path / "stray.dcm", "film_cc", study_uid=study_uid, patient_id="QUIRK-EXAM")
    ds = pydicom.dcmread(stray)
    del ds.Laterality
    ds.save_as(stray)
    model = tiny_checkpoint(tmp_path / "m")
    with Pacs(orthanc.dicomweb_url) as p:
        assert len(p.store([pydicom.dcmread(f) for f in [*files, stray]])) == 5
        study, = p.search_studies(patient_id="QUIRK-EXAM").studies
        insts = [i for i in p.instances(study.uid) if i.is_mammogram]
        assert len(insts) == 5
        fetch = [(i.sop_uid, i.sop_uid[-6:], lambda i=i: p.retrieve_bytes(i)) for i in insts]
        exam = studies.open_exam(fetch, lambda b: local_explain(model, b, max_side=384, unit_maps="top"), 384,
                                 study_uid=study.uid)
        assert exam.problem is None and exam.hanging.missing == [] and len(exam.explained) == 4
        for (lat, vw), q in kinds.items():
            v = exam.slot(lat, vw)
            assert (v.laterality, v.view) == (lat, vw) and v.mirror is False
            assert f"laterality {lat} from Laterality (series)" in v.inferred, v.inferred
            assert (f"view {vw} from PatientOrientation" in v.inferred) == (q != "series_laterality"), v.inferred
        (unplaced, why), = exam.hanging.unplaced
        assert why == "no laterality"
        assert unplaced.key == pydicom.dcmread(stray).SOPInstanceUID

        datasets, skipped = studies.dicom_results(exam)
        assert len(datasets) == 12
        assert len(p.store(datasets, study_uid=study.uid)) == 12
        for inst in p.instances(study.uid):
            if inst.modality == "MG":
                continue
            path = tmp_path / f"{inst.modality}-{inst.sop_uid}.dcm"
            path.write_bytes(p.retrieve_bytes(inst))
            assert dciodvfy_errors(path) == [], (inst.modality, dciodvfy_errors(path))
            got = pydicom.dcmread(path)
            assert str(got.PatientName) == "DOE^JANE"
            if inst.modality in ("SEG", "OT"):
                assert len(got.PatientOrientation) == 2 and got.PatientOrientation[0] in ("A", "P")


def test_every_quirk_through_the_pacs(orthanc, tmp_path):
    """Each source of the quirk corpus stored in Orthanc (STOW-RS), retrieved (WADO-RS), explained,
    its SEG/SR/SC stored back and read from Orthanc: dciodvfy clean, the patient's name as repaired."""
    from dicomfixtures import QUIRKS, dciodvfy_errors, write_quirk
    from modelfixtures import tiny_checkpoint
    from pydicom.uid import generate_uid

    from deepminer.client import local_explain
    from deepminer.dicom_results import build_results, read_source
    from deepminer.pacs import Pacs

    model = tiny_checkpoint(tmp_path / "m")
    study_uid = generate_uid()
    sources = {q: write_quirk(tmp_path / f"{q}.dcm", q, study_uid=study_uid, patient_id="QUIRKS", height=256)
               for q in QUIRKS}
    with Pacs(orthanc.dicomweb_url) as p:
        assert len(p.store([pydicom.dcmread(f) for f in sources.values()])) == len(QUIRKS)
        study, = p.search_studies(patient_id="QUIRKS").studies
        insts = [i for i in p.instances(study.uid) if i.is_mammogram]
        assert len(insts) == len(QUIRKS)
        results = []
        for inst in insts:
            data = p.retrieve_bytes(inst)
            expl = local_explain(model, data, max_side=256, unit_maps="top")
            results += list(build_results(read_source(data), expl).datasets().values())
        assert len(p.store(results, study_uid=study.uid)) == 3 * len(QUIRKS)
        written = [i for i in p.instances(study.uid) if i.modality != "MG"]
        assert len(written) == 3 * len(QUIRKS)
        for inst in written:
            path = tmp_path / f"{inst.modality}-{inst.sop_uid}.dcm"
            path.write_bytes(p.retrieve_bytes(inst))
            assert dciodvfy_errors(path) == [], (inst.modality, dciodvfy_errors(path))
            assert str(pydicom.dcmread(path, stop_before_pixels=True).PatientName) in ("DOE^JANE", "SMITH^MARY^ANN",
                                                                                    "Müller^Jürgen",
                                                                                    "山田^太郎=ヤマダ^タロウ")
