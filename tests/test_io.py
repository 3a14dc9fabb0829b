"""The one image loader: real PNG/JPEG/TIFF files written with PIL/tifffile, real DICOMs written with
pydicom (uncompressed and RLE Lossless), every intensity rule checked against a hand computation, and
every kind of bad input."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image, PngImagePlugin
from pydicom.pixels import pixel_array

from deepminer.data.io import MIN_SIDE, bits_for, load_image, png_sbit, sniff_format
from deepminer.errors import InputError, TooLargeError
from dicomfixtures import rle_frame, write_dicom

RNG = np.random.default_rng(7)


def ramp16(h=48, w=40, top=4095):
    return (np.arange(h * w).reshape(h, w) * top // (h * w - 1)).astype(np.uint16)


def png_bytes(arr, sbit=None, text=None):
    info = PngImagePlugin.PngInfo()
    if sbit:
        info.add(b"sBIT", bytes([sbit]))
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ raster formats
def test_png_8bit_and_format_from_magic_not_name(tmp_path):
    arr = RNG.integers(0, 256, (40, 50), dtype=np.uint8)
    path = tmp_path / "looks_like.dcm"  # the name lies; the bytes decide
    path.write_bytes(png_bytes(arr))
    img = load_image(path)
    assert (img.format, img.bits_stored, img.photometric, img.source) == ("png", 8, "MONOCHROME2", str(path))
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (40, 50)
    np.testing.assert_allclose(img.pixels, arr / 255.0, atol=1e-6)


@pytest.mark.parametrize("top,sbit,bits,divisor", [
    (4095, None, 12, 4095),     # 12 bits used, no sBIT: smallest of 10/12/14/16 covering the max
    (1000, None, 10, 1023),
    (9000, None, 14, 16383),
    (60000, None, 16, 65535),
    (3000, 12, 12, 4095),       # sBIT says 12 and the values fit: divide by 4095
    (4095 << 4, 12, 12, 65535),  # sBIT 12 but values scaled up to the container (PNG spec): 65535
])
def test_png_16bit_bit_depth_rule(top, sbit, bits, divisor):
    arr = ramp16(top=top)
    img = load_image(png_bytes(arr, sbit=sbit), name="x.png")
    assert img.bits_stored == bits and img.source == "x.png"
    np.testing.assert_allclose(img.pixels, arr / divisor, atol=1e-6)
    assert bits_for(top, sbit) == (bits, divisor)


def test_png_sbit_reader_and_text_hints():
    data = png_bytes(ramp16(), sbit=12, text={"Laterality": "R", "View": "MLO"})
    assert png_sbit(data) == 12 and png_sbit(png_bytes(ramp16())) is None
    img = load_image(data)
    assert (img.laterality, img.view) == ("R", "MLO")


def test_rgb_jpeg_becomes_luma_grey():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (200, 40, 10)
    rgb[:, 32:] = (10, 90, 240)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=100)
    img = load_image(buf.getvalue())
    assert (img.format, img.photometric, img.bits_stored) == ("jpeg", "RGB", 8)
    expect_left = (0.299 * 200 + 0.587 * 40 + 0.114 * 10) / 255
    expect_right = (0.299 * 10 + 0.587 * 90 + 0.114 * 240) / 255
    assert abs(float(np.median(img.pixels[:, :24])) - expect_left) < 0.02
    assert abs(float(np.median(img.pixels[:, 40:])) - expect_right) < 0.02


def test_tiff_16bit_and_min_is_white(tmp_path):
    arr = ramp16(top=4000)
    tifffile.imwrite(tmp_path / "a.tif", arr, photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", arr, photometric="miniswhite")
    a, b = load_image(tmp_path / "a.tif"), load_image(tmp_path / "b.tif")
    assert (a.format, a.bits_stored, a.photometric) == ("tiff", 12, "MONOCHROME2")
    np.testing.assert_allclose(a.pixels, arr / 4095, atol=1e-6)
    assert b.photometric == "MONOCHROME1"
    np.testing.assert_allclose(b.pixels, 1 - arr / 4095, atol=1e-6)
    tifffile.imwrite(tmp_path / "be.tif", arr, byteorder=">")  # big-endian 16 bit
    np.testing.assert_allclose(load_image(tmp_path / "be.tif").pixels, arr / 4095, atol=1e-6)
    arr8 = RNG.integers(0, 256, (40, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", arr8, photometric="miniswhite")
    np.testing.assert_allclose(load_image(tmp_path / "c.tif").pixels, 1 - arr8 / 255, atol=1e-6)


def test_tiff_16bit_rgb_via_tifffile(tmp_path):
    rgb = np.zeros((40, 40, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 4000, 2000, 1000
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    expect = (0.299 * 4000 + 0.587 * 2000 + 0.114 * 1000) / 4095
    for name in ("rgb16.tif", "planar.tif"):
        img = load_image(tmp_path / name)
        assert img.photometric == "RGB" and img.pixels.shape == (40, 40)
        np.testing.assert_allclose(img.pixels, expect, atol=1e-4)


# ------------------------------------------------------------------------------------------- DICOM
def test_dicom_16bit_monochrome2_laterality_view(tmp_path):
    arr = ramp16(top=4095)
    path = write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, laterality="L", view="CC")
    img = load_image(path)
    assert (img.format, img.bits_stored, img.photometric, img.laterality, img.view) == \
        ("dicom", 12, "MONOCHROME2", "L", "CC")
    np.testing.assert_allclose(img.pixels, arr / 4095, atol=1e-6)


def test_dicom_monochrome1_is_inverted_and_rle_equals_uncompressed(tmp_path):
    arr = RNG.integers(0, 4096, (50, 37)).astype(np.uint16)
    plain = write_dicom(tmp_path / "p.dcm", arr, photometric="MONOCHROME1", bits_stored=12)
    rle = write_dicom(tmp_path / "r.dcm", arr, photometric="MONOCHROME1", bits_stored=12, rle=True)
    assert str(pydicom.dcmread(rle).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.5"
    a, b = load_image(plain), load_image(rle)
    assert a.photometric == b.photometric == "MONOCHROME1"
    np.testing.assert_allclose(a.pixels, 1 - arr / 4095, atol=1e-6)
    np.testing.assert_array_equal(a.pixels, b.pixels)


@pytest.mark.parametrize("dtype,bits", [(np.uint8, 8), (np.uint16, 16), (np.int16, 12)])
def test_fast_rle_decoder_matches_pydicom(tmp_path, dtype, bits):
    info = np.iinfo(dtype)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if info.min < 0 else (0, (1 << bits) - 1)
    arr = RNG.integers(lo, hi + 1, (45, 300)).astype(dtype)
    arr[:10] = arr[0, 0]  # long replicate runs too
    for kw in ({"rle": True}, {"fast_rle": True}):
        path = write_dicom(tmp_path / f"{kw}.dcm", arr, bits_stored=bits, **kw)
        ref = pixel_array(pydicom.dcmread(path))  # pydicom's own RLE decoder
        np.testing.assert_array_equal(ref, arr)
        img = load_image(path)
        np.testing.assert_allclose(img.pixels, (arr.astype(np.float64) - lo) / (hi - lo), atol=1e-6)


def test_rle_packets_across_rows_and_truncated_rle(tmp_path):
    # a non-conforming encoder: replicate runs of 128 bytes that run across row ends (40 x 40, 8 bit)
    runs = [(7, 128)] * 12 + [(9, 64)]
    seg = b"".join(bytes([257 - n, v]) for v, n in runs)
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + seg
    path = write_dicom(tmp_path / "rows.dcm", np.zeros((40, 40), np.uint8), frame=frame)
    values = np.concatenate([np.full(n, v) for v, n in runs]).reshape(40, 40)
    np.testing.assert_allclose(load_image(path).pixels, values / 255, atol=1e-6)  # 8 bits stored
    arr = RNG.integers(0, 65536, (40, 40)).astype(np.uint16)
    frame = rle_frame(arr)
    cut = write_dicom(tmp_path / "cut.dcm", arr, frame=frame[: len(frame) // 2])
    assert "cut.dcm: truncated or corrupt DICOM pixel data" in _err(cut)


def test_dicom_window_and_rescale_hand_computed(tmp_path):
    arr = np.tile(np.arange(0, 4000, 50, dtype=np.uint16), (40, 1))
    c, w = 2000.0, 1001.0
    img = load_image(write_dicom(tmp_path / "w.dcm", arr, bits_stored=12, window=(c, w)))
    # DICOM PS3.3 C.11.2.1.2 LINEAR window, output range [0, 4095] -> divided by 4095
    x = arr.astype(np.float64)
    expect = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5), 0, 1)
    np.testing.assert_allclose(img.pixels, expect, atol=1e-5)
    assert img.pixels.min() == 0 and img.pixels.max() == 1
    # rescale (slope 2, intercept -100) then a window in rescaled units
    img2 = load_image(write_dicom(tmp_path / "r.dcm", arr, bits_stored=12, rescale=(2, -100),
                                  window=(3900, 2001)))
    y = 2 * x - 100
    ymin, ymax = -100, 2 * 4095 - 100
    windowed = np.clip((y - 3899.5) / 2000 + 0.5, 0, 1) * (ymax - ymin) + ymin
    np.testing.assert_allclose(img2.pixels, (windowed - ymin) / (ymax - ymin), atol=1e-5)


def test_dicom_signed_and_rgb_and_cbis_patient_id(tmp_path):
    arr = np.linspace(-2048, 2047, 40 * 40).reshape(40, 40).astype(np.int16)
    img = load_image(write_dicom(tmp_path / "s.dcm", arr, bits_stored=12))
    np.testing.assert_allclose(img.pixels, (arr + 2048) / 4095, atol=1e-6)
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[...] = (255, 0, 0)
    img = load_image(write_dicom(tmp_path / "c.dcm", rgb, sop_class="1.2.840.10008.5.1.4.1.1.7"))
    assert img.photometric == "RGB"
    np.testing.assert_allclose(img.pixels, 0.299, atol=1e-4)
    img = load_image(write_dicom(tmp_path / "cbis.dcm", ramp16(), patient_id="Calc-Test_P_00038_RIGHT_MLO"))
    assert (img.laterality, img.view) == ("R", "MLO")


def test_bytes_input_equals_path_input(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp16(), view="MLO")
    a, b = load_image(path), load_image(path.read_bytes(), name="upload")
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert b.source == "upload" and b.view == "MLO"


# --------------------------------------------------------------------------------------- bad input
def _err(src, kind=InputError, **kw):
    with pytest.raises(kind) as info:
        load_image(src, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_empty_and_not_an_image(tmp_path):
    assert _err(tmp_path / "nope.png") == f"{tmp_path / 'nope.png'}: no such file"
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert _err(tmp_path / "empty.dcm").endswith("empty.dcm: empty file")
    (tmp_path / "notes.png").write_text("patient notes, not pixels\n" * 20)
    assert "notes.png: not an image" in _err(tmp_path / "notes.png")
    assert "is a folder" in _err(tmp_path)
    assert sniff_format(b"GIF89a" + b"\0" * 200) is None


def test_truncated_png_and_jpeg(tmp_path):
    data = png_bytes(RNG.integers(0, 65535, (200, 200)).astype(np.uint16))
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    assert "t.png: truncated or corrupt PNG" in _err(tmp_path / "t.png")
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (200, 200), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[:600])
    assert "t.jpg: truncated or corrupt JPEG" in _err(tmp_path / "t.jpg")


def _png_header_only(width, height):
    """A PNG whose IHDR claims a size, with one tiny IDAT: decoding it would need width*height pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_too_small_images(tmp_path):
    msg = _err(png_bytes(np.zeros((1, 1), np.uint8)), name="dot.png")
    assert msg == f"dot.png: image is 1 x 1 pixels, too small (at least {MIN_SIDE} x {MIN_SIDE} needed)"
    assert _err(_png_header_only(0, 0), name="zero.png") == \
        f"zero.png: image is 0 x 0 pixels, too small (at least {MIN_SIDE} x {MIN_SIDE} needed)"
    assert "too small" in _err(write_dicom(tmp_path / "thin.dcm", np.zeros((10, 400), np.uint16)))


def test_decompression_bomb_guard_before_decoding(tmp_path):
    # 100,000 x 100,000 claimed: refused from the header alone (decoding would need 10 GB)
    msg = _err(_png_header_only(100_000, 100_000), TooLargeError, name="bomb.png")
    assert msg.startswith("bomb.png: ") and "10,000,000,000 pixels is over the limit" in msg
    msg = _err(_png_header_only(9000, 9000), TooLargeError, name="bomb.png")
    assert msg == "bomb.png: 9000 x 9000 pixels is over the limit of 60,000,000 pixels"
    assert "over the limit of 1,000" in _err(png_bytes(np.zeros((40, 40), np.uint8)), TooLargeError,
                                            max_pixels=1000)
    # PIL's own guard (its limit is below ours here) also becomes TooLargeError
    for side in (20_000, 10_000):  # PIL's error (> 2x its limit) and its warning (> its limit)
        msg = _err(_png_header_only(side, side), TooLargeError, max_pixels=10**10)
        assert f"<bytes>: image of {side * side:,} pixels is over the limit of" in msg
    # DICOM: Rows*Columns from the header, pixel data never touched
    path = write_dicom(tmp_path / "big.dcm", ramp16(64, 64), rows_cols=(60_000, 60_000))
    assert "big.dcm: 60000 x 60000 pixels is over the limit" in _err(path, TooLargeError)


def test_dicom_without_pixels_truncated_and_unsupported(tmp_path):
    nopix = write_dicom(tmp_path / "nopix.dcm", None)
    assert _err(nopix) == f"{nopix}: DICOM file has no pixel data"
    full = write_dicom(tmp_path / "full.dcm", ramp16(64, 64))
    data = full.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    assert "cut.dcm: truncated or corrupt DICOM pixel data" in _err(tmp_path / "cut.dcm")
    sv1 = write_dicom(tmp_path / "sv1.dcm", ramp16(64, 64), transfer_syntax="1.2.840.10008.1.2.4.70")
    msg = _err(sv1)
    assert "sv1.dcm: unsupported DICOM transfer syntax JPEG Lossless" in msg and "RLE Lossless" in msg
    jls = write_dicom(tmp_path / "jls.dcm", ramp16(64, 64), transfer_syntax="1.2.840.10008.1.2.4.80")
    assert "jls.dcm: truncated or corrupt DICOM pixel data" in _err(jls)  # pyjpegls decodes; bytes are junk
    j2k = write_dicom(tmp_path / "j2k.dcm", ramp16(64, 64), transfer_syntax="1.2.840.10008.1.2.4.90")
    assert "j2k.dcm: truncated or corrupt DICOM pixel data" in _err(j2k)  # a decoder exists; bytes are junk
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    assert "junk.dcm: " in _err(tmp_path / "junk.dcm")


def test_rle_frame_helper_is_valid_rle():
    arr = RNG.integers(0, 65536, (7, 300)).astype(np.uint16)
    frame = rle_frame(arr)
    from pydicom.pixels.decoders.rle import _rle_decode_segment, _rle_parse_header
    offsets = _rle_parse_header(frame[:64]) + [len(frame)]
    hi = np.frombuffer(bytes(_rle_decode_segment(frame[offsets[0]:offsets[1]])), np.uint8)[:7 * 300]
    lo = np.frombuffer(bytes(_rle_decode_segment(frame[offsets[1]:offsets[2]])), np.uint8)[:7 * 300]
    np.testing.assert_array_equal((hi.astype(np.uint16) << 8 | lo).reshape(7, 300), arr)


# ------------------------------------------------------------------------------ deepminer inspect
def test_inspect_prints_facts_and_writes_pngs(tmp_path, capsys):
    from deepminer.cli import main
    from dicomfixtures import synthetic_film

    values, truth = synthetic_film(300, 200, seed=4)
    path = write_dicom(tmp_path / "case 1.dcm", (4095 - values).astype(np.uint16), photometric="MONOCHROME1",
                       bits_stored=12, rle=True, laterality="L", view="CC")
    assert main(["inspect", str(path), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    facts = dict(line.split(": ", 1) for line in lines)
    assert facts["format"] == "dicom" and facts["size"] == "200 x 300" and facts["bit depth"] == "12"
    assert facts["photometric"] == "MONOCHROME1" and facts["laterality"] == "L" and facts["view"] == "CC"
    assert abs(float(facts["tissue fraction"]) - truth["breast"].mean()) < 0.03
    image = np.asarray(Image.open(tmp_path / "out" / "case 1_image.png"))
    tissue = np.asarray(Image.open(tmp_path / "out" / "case 1_tissue.png"))
    assert image.dtype == np.uint8 and np.abs(image.astype(int) - np.rint(values / 4095 * 255)).max() <= 1
    assert set(np.unique(tissue)) == {0, 255} and not (tissue[truth["text"]] > 0).any()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case 1_image.png", "case 1_tissue.png"]


def test_inspect_bad_input_one_line_nothing_written(tmp_path, capsys):
    from deepminer.cli import main

    (tmp_path / "note.txt").write_text("not an image")
    for src in (tmp_path / "missing.dcm", tmp_path / "note.txt"):
        assert main(["inspect", str(src), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(src) in err[0], err
    assert not (tmp_path / "out").exists()


def test_third_party_dicoms_shipped_with_pydicom():
    """Files written by other encoders (in pydicom's wheel): RLE from another encoder through the fast
    decoder equals the uncompressed file; a DICOM whose preamble is a TIFF header is still DICOM."""
    from pydicom.data import get_testdata_file

    plain, rle = get_testdata_file("MR_small.dcm"), get_testdata_file("MR_small_RLE.dcm")
    tiffish = get_testdata_file("examples_rgb_color.dcm")
    if not (plain and rle and tiffish):
        pytest.skip("pydicom test files not installed")
    with pytest.raises(InputError, match="Modality MR is not a mammogram"):
        load_image(plain)  # an MR slice is refused by name; its pixels, relabelled OT, decode below

    def as_other(path):
        ds = pydicom.dcmread(path)
        ds.Modality = "OT"  # the encoded pixel data stays as the other encoder wrote it
        buf = io.BytesIO()
        ds.save_as(buf)
        return buf.getvalue()

    a, b = load_image(as_other(plain)), load_image(as_other(rle))
    np.testing.assert_array_equal(a.pixels, b.pixels)
    ds = pydicom.dcmread(plain)
    raw = pixel_array(ds).astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)  # LINEAR window by hand, no rescale in this file
    assert "RescaleSlope" not in ds
    np.testing.assert_allclose(a.pixels, np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-6)
    with open(tiffish, "rb") as fh:
        assert fh.read(4) == b"II*\x00"
    us = as_other(tiffish)  # an ultrasound frame, its TIFF-header preamble kept
    assert us[:4] == b"II*\x00"
    c = load_image(us)
    assert c.format == "dicom" and c.photometric == "RGB"


def test_rle_fast_path_takes_packets_across_rows(tmp_path, monkeypatch):
    """RLE whose PackBits packets run over row ends (some archives' encoders) is decoded by the fast
    path (PIL, one long row per segment), equal to pydicom's own decoding."""
    import pydicom.pixels
    from dicomfixtures import write_quirk

    src = write_quirk(tmp_path / "x.dcm", "rle_cross_rows")
    expect = load_image(src).pixels
    assert np.array_equal(pydicom.dcmread(src).pixel_array, pydicom.dcmread(write_quirk(
        tmp_path / "y.dcm", "bits12")).pixel_array)

    def no(*a, **k):
        raise AssertionError("pydicom's decoder was used")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no)
    np.testing.assert_array_equal(load_image(src).pixels, expect)
