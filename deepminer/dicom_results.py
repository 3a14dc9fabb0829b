"""An explanation as DICOM a viewer and a PACS file with the study: a Segmentation, a Structured
Report and a Secondary Capture (docs/dicom.md), written with highdicom.

* **SEG** (Segmentation Storage, FRACTIONAL, PROBABILITY, 8 bits: ``value / 255``): segment 1 is the
  CAM of the predicted class, min-max normalised to [0, 1] and upsampled bilinearly onto the source
  image's pixel grid; segments 2.. are the masks (0 or 1) of the most influential units of the predicted
  class, labelled units first (:func:`pick_units`), each described by its concept (:func:`unit_concept`).
* **SR** (Comprehensive 3D SR, TID 1500 Measurement Report): an image-level group with the
  prediction (coded), the probability of every class and the model (algorithm name, version, weights
  sha256), and one planar-ROI group per SEG segment referencing it (and, through it, the source image),
  with the segment's concept as the finding type.
* **SC** (Secondary Capture): the CAM overlay as an RGB picture (long side at most
  :data:`SC_MAX_SIDE`), with the warning burned in.

Every object: a series description marking it as an unverified AI result not for diagnostic use
(:data:`SERIES_DESCRIPTION`), Contributing Equipment naming DeepMiner Studio, its version and the
model's weights sha256, new Study-level-compatible UIDs (new series and instances, the source's study
and patient kept). The SR's Verification Flag is UNVERIFIED.

Concepts: a unit label that names a project concept or a BI-RADS term of pydicom's code dictionaries
(CID 6004-6015, :func:`deepminer.concepts.birads_terms`) is coded with that term (SCT); any other label
gets a code of the local scheme :data:`LOCAL_SCHEME` (value ``L-`` + the first 12 hex digits of the
sha1 of the label's comparison form, the label as meaning), and an unlabelled unit ``U-<id>``
("DeepMiner unit <id> (unlabelled)"). No torch, Streamlit or TorchServe here.
"""
from __future__ import annotations

import copy
import hashlib
import io
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepminer import __version__
from deepminer.errors import InputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from deepminer.explanation import Explanation

MANUFACTURER = "DeepMiner Studio"
SERIES_DESCRIPTION = "UNVERIFIED AI result - not for diagnostic use"  #: every object's (LO, <= 64 chars)
WARNING = "UNVERIFIED AI RESULT - NOT FOR DIAGNOSTIC USE"
LOCAL_SCHEME = "99DEEPMINER"  #: private coding scheme (PS3.16 8.2: "99" prefix) for non-BI-RADS concepts
TOP_SEGMENTS = 3  #: unit masks written as segments after the CAM
SC_MAX_SIDE = 1536  #: long side of the Secondary Capture
SERIES_NUMBERS = {"seg": 9901, "sr": 9902, "sc": 9903}
NEED_DICOM = "DICOM results need a DICOM source"
SEGMENTATION_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  #: Segmentation Storage


@dataclass
class DicomResults:
    """The three objects of one explained image (pydicom datasets, highdicom subclasses)."""

    seg: Any
    sr: Any
    sc: Any
    units: list[int]  #: the units written as segments 2.. (in order)
    repairs: list[str] = field(default_factory=list)  #: what was repaired in the source's header

    def datasets(self) -> dict[str, Any]:
        return {"seg": self.seg, "sr": self.sr, "sc": self.sc}

    def to_bytes(self) -> dict[str, bytes]:
        """``{"seg.dcm": ..., "sr.dcm": ..., "sc.dcm": ...}``: DICOM Part 10 files."""
        out = {}
        for kind, ds in self.datasets().items():
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out[f"{kind}.dcm"] = buf.getvalue()
        return out

    def write(self, folder: str | Path) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, data in self.to_bytes().items():
            (folder / name).write_bytes(data)
            paths.append(folder / name)
        return paths

    def zip_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for name, data in self.to_bytes().items():
                z.writestr(name, data)
        return buf.getvalue()


def read_source(data: bytes | str | Path, *, name: str = "image") -> Dataset:
    """The source image's DICOM dataset (pixel data kept), or the one-line :class:`InputError`
    ``DICOM results need a DICOM source`` for anything else."""
    import pydicom

    from deepminer.data.io import sniff_format

    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
    if sniff_format(raw[:256]) != "dicom":
        raise InputError(f"{name}: {NEED_DICOM} (this is not a DICOM file)")
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is bad input, said in one line
        raise InputError(f"{name}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns"):
        if kw not in ds:
            raise InputError(f"{name}: {NEED_DICOM} with {kw}; this file has none")
    return ds


# -- concepts ---------------------------------------------------------------------------------------

def _birads_by_name() -> dict[str, tuple[str, str, str]]:
    """Comparison form of a name -> (code value, scheme, meaning), from the project's concepts and
    every BI-RADS term pydicom lists."""
    from deepminer.concepts import CONCEPTS, birads_terms
    from deepminer.labels import normalize_label

    out: dict[str, tuple[str, str, str]] = {}
    for _group, meaning, value, scheme in birads_terms():
        out.setdefault(normalize_label(meaning), (value, scheme, meaning))
    for c in CONCEPTS:
        for n in (c.name, c.name.replace("_", " "), c.display, c.code_meaning):
            out.setdefault(normalize_label(n), (c.code_value, c.code_scheme, c.code_meaning))
    return out


def unit_concept(unit: int, label: str | None) -> tuple[Any, bool]:
    """The coded concept of ``unit`` with ``label`` and whether it is a BI-RADS (SCT) term."""
    from pydicom.sr.coding import Code

    from deepminer.labels import normalize_label

    if not label:
        return Code(f"U-{int(unit)}", LOCAL_SCHEME, f"DeepMiner unit {int(unit)} (unlabelled)"), False
    hit = _birads_by_name().get(normalize_label(label))
    if hit is not None:
        return Code(hit[0], hit[1], hit[2]), True
    digest = hashlib.sha1(normalize_label(label).encode("utf-8")).hexdigest()[:12]
    return Code(f"L-{digest}", LOCAL_SCHEME, " ".join(str(label).split())[:64]), False


def pick_units(expl: Explanation, labels: Mapping[int, str] | None, n: int = TOP_SEGMENTS,
               among: int = 8) -> list[int]:
    """The units written as segments: among the ``among`` most influential units of the predicted
    class that have a map, the labelled ones first (by influence), then unlabelled ones, ``n`` at most."""
    labels = labels or {}
    ranked = [u for u in expl.ranked_units(expl.prediction, among) if u in expl.unit_maps]
    labelled = [u for u in ranked if labels.get(u)]
    return (labelled + [u for u in ranked if u not in labelled])[:n]


# -- the objects ------------------------------------------------------------------------------------

def _weights(expl: Explanation) -> str:
    return str(expl.model.get("weights_sha256") or "unknown")


def _equipment(expl: Explanation):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = expl.model
    return [hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=str(model.get("name") or "model")[:64],
        software_versions=[__version__, _weights(expl)[:64]],
        contribution_description=(f"{WARNING}. DeepMiner Studio {__version__}, model {model.get('name', '?')} "
                                  f"version {model.get('version', '?')}, weights sha256 {_weights(expl)}"))]


def _upsample_u8(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map in [0, 1] quantized to 8 bits, then upsampled bilinearly to ``shape`` (Pillow's "L"
    mode: four times faster than float, and the stored values are 8-bit anyway)."""
    from PIL import Image

    q = np.clip(np.rint(np.asarray(values, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if q.shape == tuple(shape):
        return q
    return np.asarray(Image.fromarray(q, mode="L").resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR))


def cam_for_seg(expl: Explanation, shape: tuple[int, int]) -> np.ndarray:
    """The predicted class's CAM as segment 1 holds it: min-max normalised to [0, 1], stored as
    ``round(255 x value)`` and upsampled bilinearly to ``shape`` (uint8 ``(H, W)``, 255 = 1.0)."""
    return _upsample_u8(expl.cam_normalized(expl.prediction), shape)


def unit_mask(expl: Explanation, unit: int, shape: tuple[int, int], threshold: float | None = None) -> np.ndarray:
    """The unit's mask on the image: its map (scaled by its maximum) upsampled bilinearly, ``>
    threshold`` (the atlas's quantile threshold when given, else half the unit's maximum on this
    image); bool ``(H, W)``."""
    m = np.asarray(expl.unit_maps[unit], dtype=np.float32)
    top = float(m.max())
    if top <= 0:
        return np.zeros(shape, dtype=bool)
    t = float(threshold) if threshold is not None else 0.5 * top
    return _upsample_u8(np.clip(m / top, 0, 1), shape) > t / top * 255.0


def build_results(source: Dataset, expl: Explanation, *, labels: Mapping[int, str] | None = None,
                  thresholds: Sequence[float] | np.ndarray | None = None, pixels: np.ndarray | None = None,
                  n_units: int = TOP_SEGMENTS) -> DicomResults:
    """SEG + SR + SC of ``expl`` (the explanation of ``source``). ``labels`` {unit: label} names the
    units' concepts; ``thresholds`` (the atlas's per-unit thresholds) cut the unit masks; ``pixels``
    (the decoded image, grey float [0, 1]) saves decoding ``source`` again for the SC."""
    from pydicom.uid import generate_uid

    from deepminer.dicom_source import check_image, result_header

    shape = (int(source.Rows), int(source.Columns))
    check_image(source, "source")
    labels = dict(labels or {})
    units = pick_units(expl, labels, n_units)
    if pixels is None:
        pixels = decode_pixels(source)
    header = result_header(source, pixels)
    source = header.dataset
    equipment = _equipment(expl)
    from concurrent.futures import ThreadPoolExecutor

    # the SEG's identity is fixed first, so the SR (pure Python) is built beside the SEG's and the
    # SC's pixel work (numpy, Pillow, CharLS: mostly outside the GIL)
    seg_ref = copy.deepcopy(source)  # a header (no pixel data): small
    seg_ref.SOPClassUID = SEGMENTATION_CLASS
    seg_ref.SOPInstanceUID, seg_ref.SeriesInstanceUID = generate_uid(), generate_uid()
    with ThreadPoolExecutor(2) as pool:
        sc_job = pool.submit(_capture, source, header, expl, pixels, equipment, generate_uid())
        sr_job = pool.submit(_report, source, seg_ref, expl, units, labels, equipment, generate_uid())
        seg = _segmentation(source, header, expl, units, labels, thresholds, shape, equipment, seg_ref)
        sr, sc = sr_job.result(), sc_job.result()
    for ds in (seg, sr, sc):  # the text as the header holds it (UTF-8 when not ASCII)
        if "SpecificCharacterSet" in source:
            ds.SpecificCharacterSet = source.SpecificCharacterSet
        elif "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    return DicomResults(seg, sr, sc, units, header.repairs)


def decode_pixels(source: Dataset) -> np.ndarray:
    """The source's pixels as the loader reads them (grey float [0, 1], VOI and MONOCHROME1 applied)."""
    from deepminer.data.io import load_image

    buf = io.BytesIO()
    source.save_as(buf, enforce_file_format=False)
    return load_image(buf.getvalue()).pixels


def _segment_algorithm(expl: Explanation):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=f"DeepMiner {expl.model.get('name', 'model')}"[:64], family=codes.DCM.ArtificialIntelligence,
        version=str(expl.model.get("version") or __version__)[:64], source=MANUFACTURER,
        parameters={"weights_sha256": _weights(expl)})


def _segmentation(source, header, expl, units, labels, thresholds, shape, equipment, ref):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = _segment_algorithm(expl)
    from concurrent.futures import ThreadPoolExecutor

    frames = np.empty((1 + len(units), *shape), dtype=np.uint8)  # stored values, 255 = 1.0

    def fill(k: int) -> None:  # Pillow resizes without the GIL: the segments upsample in parallel
        if k == 0:
            frames[0] = cam_for_seg(expl, shape)
        else:
            u = units[k - 1]
            frames[k] = unit_mask(expl, u, shape, None if thresholds is None else thresholds[u]) * np.uint8(255)

    with ThreadPoolExecutor(min(4, len(frames))) as pool:
        list(pool.map(fill, range(len(frames))))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=1, segment_label=f"CAM {expl.prediction}"[:64],
        segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
        segmented_property_type=codes.DCM.ClassActivation, algorithm_type="AUTOMATIC",
        algorithm_identification=algo, tracking_uid=hd.UID(), tracking_id=f"CAM of {expl.prediction}")]
    for i, u in enumerate(units, start=2):
        code, _ = unit_concept(u, labels.get(u))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=f"unit {u}: {labels.get(u) or 'unlabelled'}"[:64],
            segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
            segmented_property_type=code, algorithm_type="AUTOMATIC", algorithm_identification=algo,
            tracking_uid=hd.UID(), tracking_id=f"unit {u}"))
    # highdicom builds the object from an all-zero stack of the same shape (its checks of a float
    # stack sort all 13.5 M x segments values: seconds for a full-field image), then the frames get
    # the 8-bit values computed above; tests read them back with highdicom
    # highdicom builds the object around an all-zero stack (checked and copied: 0.4 s for a
    # full-field image); it is given a 2 x 2 one, against the source's header with that size, and the
    # object gets the source's size with the real frames below (no plane geometry depends on it: an
    # MG image has no Frame of Reference)
    small = copy.deepcopy(source)
    small.Rows = small.Columns = 2
    zeros = np.zeros((1, 2, 2, len(frames)), dtype=np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[small], pixel_array=zeros, segmentation_type="FRACTIONAL",
        segment_descriptions=descriptions, series_instance_uid=ref.SeriesInstanceUID,
        series_number=SERIES_NUMBERS["seg"], sop_instance_uid=ref.SOPInstanceUID, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=str(expl.model.get("name") or "model")[:64],
        software_versions=__version__, device_serial_number=_weights(expl)[:64],
        fractional_type="PROBABILITY", max_fractional_value=255,
        content_description=WARNING[:64], content_label="DEEPMINER", content_creator_name=None,
        omit_empty_frames=False, contributing_equipment=equipment)
    if int(seg.NumberOfFrames) != len(frames) or seg.BitsAllocated != 8:
        raise RuntimeError(f"SEG layout: {seg.NumberOfFrames} frames of {seg.BitsAllocated} bits")
    seg.Rows, seg.Columns = shape
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures and "SliceThickness" not in measures[0]:
        # highdicom copies a projection image's Pixel Spacing into Pixel Measures without a Slice
        # Thickness, then cannot read its own object back; without a Frame of Reference the
        # functional group is not required: left out
        del shared.PixelMeasuresSequence
    _encapsulate_rle(seg, frames)  # frame k = segment k (one frame per segment, none omitted)
    seg.SeriesDescription = SERIES_DESCRIPTION
    seg.PatientOrientation = list(header.orientation or []) or ""  # type 2C (no Image Orientation here)
    return seg


def _encapsulate_rle(ds, frames) -> None:
    """Pixel Data as RLE Lossless frames (:mod:`deepminer.rle`): the lossless syntax both OHIF's SEG
    reader and Weasis decode; the frames are encoded in parallel (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    from deepminer.rle import encode_frame

    with ThreadPoolExecutor(min(4, len(frames))) as pool:
        encoded = list(pool.map(encode_frame, frames))
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless


def _local(value: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, LOCAL_SCHEME, meaning)


def class_code(cls: str):
    """The coded concept of a class name: SCT Normal / Benign / Malignant, else a local code."""
    from pydicom.sr.codedict import codes

    known = {"normal": codes.SCT.Normal, "benign": codes.SCT.Benign, "malignant": codes.SCT.Malignant}
    return known.get(cls, _local(f"C-{cls}"[:16], cls))


def probability_code(cls: str):
    """The measurement name of P(``cls``): DCM "Probability of cancer" for malignant, else local."""
    from pydicom.sr.codedict import codes

    if cls == "malignant":
        return codes.DCM.ProbabilityOfCancer
    return _local(f"P-{cls}"[:16], f"Probability of {cls}")


def _report(source, seg, expl, units, labels, equipment, series_uid):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = expl.model
    algo = hd.sr.AlgorithmIdentification(
        name=f"DeepMiner {model.get('name', 'model')}"[:64], version=str(model.get("version") or __version__)[:64],
        parameters=[f"weights_sha256={_weights(expl)}", f"arch={model.get('arch', '?')}"],
        family=codes.DCM.ArtificialIntelligence, manufacturer=MANUFACTURER)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=str(model.get("name") or "model")[:64], serial_number=_weights(expl)[:64]))
    context = hd.sr.ObservationContext(observer_device_context=device)
    src = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    unity = codes.UCUM.NoUnits
    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="image classification"),
        algorithm_id=algo, finding_type=class_code(expl.prediction), source_images=[src],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.SCT.Classification,
                                                              class_code(expl.prediction))],
        measurements=[hd.sr.Measurement(probability_code(c), round(float(expl.probabilities[c]), 6), unity,
                                        algorithm_id=algo) for c in expl.classes])
    groups: list[Any] = [image_group]
    seg_src = hd.sr.SourceImageForSegmentation.from_source_image(source)
    c = expl.class_index(expl.prediction)
    for number, u in enumerate([None, *units], start=1):
        # one frame per segment: frame k holds segment k
        ref = hd.sr.ReferencedSegmentationFrame(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                                frame_number=number, segment_number=number, source_image=seg_src)
        if u is None:
            finding, ident, meas = codes.DCM.ClassActivation, f"CAM of {expl.prediction}", []
        else:
            finding = unit_concept(u, labels.get(u))[0]
            ident = f"unit {u}" + (f" ({labels[u]})" if labels.get(u) else "")
            meas = [hd.sr.Measurement(_local("INFLUENCE", "DeepMiner influence on the predicted class"),
                                      round(float(expl.influence[c, u]), 6), unity),
                    hd.sr.Measurement(_local("MAXACT", "Maximum activation of the unit"),
                                      round(float(expl.unit_max[u]), 6), unity)]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=ident[:64]),
            referenced_segment=ref, finding_type=finding, algorithm_id=algo, measurements=meas or None))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.Mammography,
                                     imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, seg], content=report, series_instance_uid=series_uid,  # headers: UIDs
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        contributing_equipment=equipment)
    _frame_or_segment(sr)
    sr.SeriesDescription = SERIES_DESCRIPTION
    return sr


def _encapsulate_jpegls(ds, rgb: np.ndarray) -> None:
    """The SC's RGB picture as JPEG-LS Lossless (CharLS through pyjpegls: a quarter of RLE's size
    at a fifth of its time on this picture), which the image decoders of OHIF (cornerstone's
    codec-charls) and Weasis read; one frame, colour-by-pixel (Planar Configuration 0)."""
    import jpeg_ls
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds.PixelData = encapsulate([bytes(jpeg_ls.encode(np.ascontiguousarray(rgb)))])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless


def _frame_or_segment(ds) -> None:
    """PS3.3 C.10.9: a reference to a Segmentation names the frame OR the segment, not both (highdicom
    writes both); the frame stays (frame k holds segment k)."""
    for elem in list(ds):
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if elem.keyword == "ReferencedSOPSequence" and "ReferencedFrameNumber" in item \
                    and "ReferencedSegmentNumber" in item:
                del item.ReferencedSegmentNumber
            _frame_or_segment(item)


def overlay_picture(expl: Explanation, pixels: np.ndarray, max_side: int = SC_MAX_SIDE) -> np.ndarray:
    """The predicted class's CAM over the image (uint8 RGB, long side <= ``max_side``) with the
    warning and the prediction burned in along the top."""
    from PIL import Image, ImageDraw, ImageFont

    from deepminer.geometry import fit_image
    from deepminer.overlay import heat_overlay

    grey = fit_image(np.asarray(pixels, dtype=np.float32), max_side, reduce_first=True)
    h, w = grey.shape
    rgb = heat_overlay(grey, expl.cam[expl.class_index(expl.prediction)])
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    size = max(10, w // 40)
    font = ImageFont.load_default(size=size)
    p = expl.probabilities[expl.prediction]
    lines = [WARNING, f"CAM of {expl.prediction} (p = {p:.2f}); model trained on synthetic phantoms"]
    draw.rectangle((0, 0, w, int(2.6 * size) + 4), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((4, 2 + int(1.3 * size) * i), line, fill=(255, 255, 0), font=font)
    return np.asarray(im)


def _capture(source, header, expl, pixels, equipment, series_uid):
    import highdicom as hd

    rgb = overlay_picture(expl, pixels)
    orient = header.orientation
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=("A", "F"), laterality=header.placement.laterality,
        contributing_equipment=equipment)
    # highdicom takes one letter per value only (an MLO's column is e.g. "FR"): set here; not known:
    # Type 2, empty (never an invented orientation)
    sc.PatientOrientation = list(orient) if orient else ""
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C for a paired body part: empty when no attribute says it
    _encapsulate_jpegls(sc, rgb)
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{WARNING}. Overlay of the CAM of {expl.prediction}."
    sc.DerivationDescription = "CAM overlay by DeepMiner Studio (heat map blended over the image)"
    return sc
