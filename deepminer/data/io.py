"""One loader for mammograms: DICOM (pydicom) and PNG/JPEG/TIFF (8/16 bit).

:func:`load_image` turns a file path or the raw bytes of an upload into a :class:`LoadedImage`: a float32
grey image in [0, 1] with 1 = brightest (densest), plus what the file says about itself. The format is
detected from the magic bytes, never from the file name. Every failure is a one-line
:class:`~deepminer.errors.InputError` (or :class:`~deepminer.errors.TooLargeError`) naming the source.

Intensity rules (also in ``docs/data.md``):

* DICOM: stored values -> Modality LUT / rescale -> VOI LUT or window (first one) when present ->
  scaled so the stored range ``[0, 2**BitsStored - 1]`` (signed: ``±2**(BitsStored-1)``) spans [0, 1]
  -> inverted for MONOCHROME1 (and for MONOCHROME2 with Presentation LUT Shape INVERSE). Applied as one
  lookup table over all stored values, so the pydicom LUT functions run on 65,536 values, not on the image.
* 8-bit raster: value / 255.
* 16-bit raster: the number of bits used is the PNG ``sBIT`` chunk when present, else the smallest of
  10/12/14/16 bits that covers the image's maximum. Values are divided by ``2**bits - 1``; when an
  ``sBIT`` file holds values above that (the PNG-spec way: samples scaled up to the container), they are
  divided by 65535 instead.
* Colour (RGB, palette, CMYK, YBR) becomes grey with the ITU-R 601 luma weights.
* TIFF PhotometricInterpretation 0 (min-is-white) is inverted like DICOM MONOCHROME1.

Laterality and view: DICOM ImageLaterality / Laterality and ViewPosition (or the View Code Sequence),
else a CBIS-DDSM PatientID such as ``Mass-Training_P_00001_LEFT_CC``; PNG text chunks ``Laterality`` and
``View`` (as the phantom generator writes them).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepminer.errors import InputError, TooLargeError

DEFAULT_MAX_PIXELS = 60_000_000
MIN_SIDE = 32
FORMATS = ("png", "jpeg", "tiff", "dicom")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class LoadedImage:
    """A decoded image and what its file says about it."""

    pixels: np.ndarray  #: float32 (H, W) in [0, 1], 1 = brightest / densest
    bits_stored: int  #: bits per sample actually used (e.g. 12 for a 12-bit detector in 16-bit words)
    photometric: str  #: source interpretation: MONOCHROME2, MONOCHROME1, RGB, PALETTE COLOR, ...
    format: str  #: png, jpeg, tiff or dicom (from the magic bytes)
    laterality: str | None = None  #: "L", "R" or None
    view: str | None = None  #: "CC", "MLO" or None
    source: str = "<bytes>"  #: the file name (or the ``name`` given for bytes)
    #: the physical size (mm) of one pixel where the file says: DICOM Pixel Spacing, else Imager Pixel
    #: Spacing (the mean of rows and columns); a PNG text chunk ``PixelSpacing``; else None
    spacing_mm: float | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def sniff_format(head: bytes) -> str | None:
    """The image format from the first 132 bytes (magic numbers), or None."""
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself look like a TIFF header
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    # a DICOM data set without the 128-byte preamble: a little-endian group 0002 or 0008 tag first
    if head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00":
        return "dicom"
    return None


def load_image(src: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> LoadedImage:
    """Decode a mammogram from a path or raw bytes (PNG/JPEG/TIFF/DICOM, 8 or 16 bit).

    ``max_pixels`` guards against decompression bombs: larger images raise
    :class:`~deepminer.errors.TooLargeError` before any pixel is decoded. ``name`` names a bytes input
    in messages and in :attr:`LoadedImage.source`.
    """
    data, source = _read(src, name)
    fmt = sniff_format(data[:132])
    if fmt is None:
        raise InputError(f"{source}: not an image (expected PNG, JPEG, TIFF or DICOM)")
    if fmt == "dicom":
        img = _load_dicom(data, source, max_pixels)
    else:
        img = _load_raster(data, fmt, source, max_pixels)
    np.clip(img.pixels, 0.0, 1.0, out=img.pixels)
    return img


# --------------------------------------------------------------------------------------------- helpers
def _read(src: str | os.PathLike | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        source = name or "<bytes>"
    else:
        path = Path(src)
        source = name or str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{source}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{source}: is a folder, not an image file") from None
        except OSError as err:
            raise InputError(f"{source}: cannot read ({err.strerror or err})") from None
    if not data:
        raise InputError(f"{source}: empty file")
    return data, source


def _short(err: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_dims(source: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooLargeError(f"{source}: {width} x {height} pixels is over the limit of {max_pixels:,} pixels")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(f"{source}: image is {width} x {height} pixels, too small "
                         f"(at least {MIN_SIDE} x {MIN_SIDE} needed)")


def bits_for(max_value: int, sbit: int | None = None) -> tuple[int, int]:
    """``(bits_stored, divisor)`` for a 16-bit raster with this maximum (the rule in the module doc)."""
    if sbit and 0 < sbit <= 16:
        full = (1 << sbit) - 1
        return sbit, (full if max_value <= full else 65535)
    for bits in (10, 12, 14, 16):
        if max_value <= (1 << bits) - 1:
            return bits, (1 << bits) - 1
    return 16, 65535


def png_sbit(data: bytes) -> int | None:
    """Significant bits from a PNG ``sBIT`` chunk (the largest over the colour channels), or None."""
    pos = len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"sBIT":
            body = data[pos + 8:pos + 8 + length]
            return max(body) if body else None
        if ctype in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def png16(image: np.ndarray, *, bits: int = 16, text: dict[str, str] | None = None) -> bytes:
    """A 16-bit greyscale PNG of ``image`` (uint16) with an ``sBIT`` chunk saying how many bits are
    used (:func:`load_image` divides by ``2**bits - 1``) and PNG text chunks ``text`` (the loader
    reads ``Laterality``, ``View`` and ``PixelSpacing`` (mm, :data:`SPACING_TEXT`)). The one 16-bit PNG writer."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add(b"sBIT", bytes([bits]))
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint16)).save(
        buf, format="PNG", pnginfo=info, compress_level=1, compress_type=2)  # zlib Huffman-only: fast
    return buf.getvalue()


def png16_of_pixels(pixels: np.ndarray, *, text: dict[str, str] | None = None) -> bytes:
    """A grey float image in [0, 1] (clipped) as a 16-bit PNG with all 16 bits used (rounded to the
    nearest of 65,536 levels): what the workbench sends the model; :func:`load_image` reads back
    ``pixels`` to within 1/131070. ``text``: PNG text chunks (:func:`png16`)."""
    levels = np.rint(np.asarray(pixels, dtype=np.float32) * 65535.0)
    return png16(np.clip(levels, 0, 65535).astype(np.uint16), bits=16, text=text)


def _to_grey(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) colour -> (H, W) float32 luma in the input's units (alpha dropped)."""
    if arr.ndim == 2:
        return arr.astype(np.float32)
    if arr.shape[2] >= 3:
        return arr[..., :3].astype(np.float32) @ _LUMA
    return arr[..., 0].astype(np.float32)


def _scale(arr: np.ndarray, divisor: float) -> np.ndarray:
    out = arr.astype(np.float32)
    out *= np.float32(1.0 / divisor)
    return out


# ---------------------------------------------------------------------------------- PNG / JPEG / TIFF
def _load_raster(data: bytes, fmt: str, source: str, max_pixels: int) -> LoadedImage:
    from PIL import Image

    label = fmt.upper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": not worth a line of its own
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _pil_bomb(source, err) from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a broken header
            if fmt == "tiff":
                return _load_tiff_fallback(data, source, max_pixels, err)
            if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":  # e.g. a 0 x 0 PNG
                png_width, png_height = struct.unpack(">II", data[16:24])
                _check_dims(source, png_width, png_height, max_pixels)
            raise InputError(f"{source}: not a readable {label} file ({_short(err)})") from None
        width, height = im.size
        _check_dims(source, width, height, max_pixels)
        if fmt == "tiff" and _tiff_needs_tifffile(im):
            return _load_tiff_fallback(data, source, max_pixels, ValueError(f"PIL mode {im.mode}"))
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _pil_bomb(source, err) from None
        except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types for broken data
            if fmt == "tiff" and "truncated" not in str(err).lower():
                return _load_tiff_fallback(data, source, max_pixels, err)
            raise InputError(f"{source}: truncated or corrupt {label} data ({_short(err)})") from None

    mode = im.mode
    photometric = "MONOCHROME2"
    invert = False
    if fmt == "tiff" and getattr(im, "tag_v2", {}).get(262) == 0:
        photometric = "MONOCHROME1"
        invert = mode not in ("1", "L")  # PIL already inverts 1- and 8-bit min-is-white
    if mode == "1":
        pixels, bits = np.asarray(im, dtype=np.float32), 1
    elif mode in ("L", "LA", "La"):
        pixels, bits = _scale(np.asarray(im.getchannel(0) if mode != "L" else im), 255.0), 8
    elif mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            pixels, bits = _float_to_unit(arr), 32
        else:
            if (arr.dtype.kind == "u" and arr.dtype.itemsize == 2) or (
                    mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
                arr = arr.astype(np.uint16)  # native byte order (I;16B) or 16-bit data in 32-bit "I"
            if arr.dtype != np.uint16:
                pixels, bits = _float_to_unit(arr.astype(np.float32)), 32
            else:
                sbit = png_sbit(data) if fmt == "png" else None
                bits, divisor = bits_for(int(arr.max()), sbit)
                pixels = _scale(arr, divisor)
    else:  # P, PA, RGB, RGBA, CMYK, YCbCr, ...
        photometric = "PALETTE COLOR" if mode in ("P", "PA") else ("CMYK" if mode == "CMYK" else "RGB")
        pixels, bits = _scale(_to_grey(np.asarray(im.convert("RGB"))), 255.0), 8
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if invert:
        pixels = 1.0 - pixels
    laterality, view = _text_hints(im.info)
    return LoadedImage(pixels=pixels, bits_stored=bits, photometric=photometric, format=fmt,
                       laterality=laterality, view=view, source=source,
                       spacing_mm=_spacing(str(im.info.get(SPACING_TEXT, "")).split("\\")))


#: the PNG text chunk carrying a pixel spacing in mm (``"0.1"`` or DICOM's ``"0.1\\0.1"``)
SPACING_TEXT = "PixelSpacing"


def _spacing(values) -> float | None:
    """A pixel spacing (mm) from a DICOM-style pair (or one value); None when absent or not positive."""
    try:
        vals = [float(v) for v in (values or ()) if str(v).strip()]
    except (TypeError, ValueError):
        return None
    vals = [v for v in vals if np.isfinite(v) and v > 0]
    return float(np.mean(vals[:2])) if vals else None


def dicom_spacing(ds) -> float | None:
    """The pixel spacing (mm) of a DICOM data set: Pixel Spacing (0028,0030), else Imager Pixel
    Spacing (0018,1164), the mean of rows and columns; None when neither is there."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        raw = ds.get(keyword)
        if raw is None:
            continue
        v = _spacing([raw] if isinstance(raw, (str, bytes, int, float)) else list(raw))
        if v is not None:
            return v
    return None


def _text_hints(info: dict) -> tuple[str | None, str | None]:
    """Laterality/view from PNG text chunks ``Laterality`` (L/R/LEFT/RIGHT) and ``View`` (CC/MLO), as
    the phantom generator writes them."""
    lat = str(info.get("Laterality", "")).strip().upper()[:1]
    view = str(info.get("View", "")).strip().upper()
    return (lat if lat in ("L", "R") else None), (view if view in ("CC", "MLO") else None)


def _pil_bomb(source: str, err: BaseException) -> TooLargeError:
    """PIL's own decompression-bomb guard (it fires first when ``max_pixels`` is above PIL's limit)."""
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(err))
    if m:
        return TooLargeError(f"{source}: image of {int(m.group(1)):,} pixels is over the limit of "
                             f"{int(m.group(2)):,} pixels")
    return TooLargeError(f"{source}: too large to decode ({_short(err)})")


def _tiff_needs_tifffile(im) -> bool:
    """PIL reads 16-bit colour TIFF as 8-bit: send those to tifffile."""
    bps = getattr(im, "tag_v2", {}).get(258, (8,))
    bps = bps if isinstance(bps, tuple) else (bps,)
    return max(bps, default=8) > 8 and not (im.mode.startswith("I") or im.mode == "F")


def _float_to_unit(arr: np.ndarray) -> np.ndarray:
    """Float data: kept when already in [0, 1], else min-max scaled."""
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _load_tiff_fallback(data: bytes, source: str, max_pixels: int, first: BaseException) -> LoadedImage:
    """TIFFs that PIL cannot read (16-bit RGB, odd sample formats) through tifffile."""
    try:
        import tifffile

        with _quiet("tifffile"), tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            if not isinstance(page, tifffile.TiffPage):  # never: the first page is always read as a TiffPage
                raise ValueError(f"first page is a {type(page).__name__}")
            axes, shape = page.axes, page.shape  # e.g. "YX", "YXS" or planar "SYX"
            if "Y" not in axes or "X" not in axes:
                raise ValueError(f"no image plane in axes {axes}")
            _check_dims(source, int(shape[axes.index("X")]), int(shape[axes.index("Y")]), max_pixels)
            arr = page.asarray()
            if arr.ndim == 3 and axes.index("S" if "S" in axes else "Y") == 0:
                arr = np.moveaxis(arr, 0, -1)  # planar samples last
            photometric_code = int(page.photometric)
    except (InputError, TooLargeError):
        raise
    except Exception as err:  # noqa: BLE001 - tifffile raises many types for a damaged file
        raise InputError(f"{source}: not a readable TIFF file ({_short(first)}; {_short(err)})") from None
    grey = _to_grey(arr) if arr.ndim == 3 else arr
    if arr.dtype == np.uint8:
        pixels, bits = _scale(grey, 255.0), 8
    elif arr.dtype == np.uint16:
        bits, divisor = bits_for(int(np.max(grey)))
        pixels = _scale(grey, divisor)
    else:
        pixels, bits = _float_to_unit(np.asarray(grey, np.float32)), 32
    photometric = {0: "MONOCHROME1", 1: "MONOCHROME2", 2: "RGB", 3: "PALETTE COLOR"}.get(photometric_code, "RGB")
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return LoadedImage(pixels=np.ascontiguousarray(pixels, np.float32), bits_stored=bits,
                       photometric=photometric, format="tiff", source=source)


# --------------------------------------------------------------------------------------------- DICOM
def _load_dicom(data: bytes, source: str, max_pixels: int) -> LoadedImage:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID

    try:
        with warnings.catch_warnings():  # pydicom warns about what we report in one line anyway
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise InputError(f"{source}: not a readable DICOM file ({_short(err)})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(f"{source}: DICOM file has no pixel data")
    from deepminer.dicom_source import check_image

    check_image(ds, source)
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        raise InputError(f"{source}: DICOM Rows/Columns are not numbers") from None
    _check_dims(source, cols, rows, max_pixels)

    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:  # a bare data set: take what the reader found
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    ts = UID(str(meta.TransferSyntaxUID))
    _check_transfer_syntax(ts, source)
    try:
        with _quiet("pydicom"):  # pydicom logs a traceback before raising; we say it in one line
            arr = _decode_first_frame(ds, ts)
    except (InputError, TooLargeError):
        raise
    except Exception as err:  # noqa: BLE001 - pydicom's pixel handlers raise many types for bad data
        if "does not support" in str(err):  # e.g. Pillow and 12-bit JPEG
            raise InputError(f"{source}: unsupported DICOM pixel encoding ({_short(err)})") from None
        raise InputError(f"{source}: truncated or corrupt DICOM pixel data ({_short(err)})") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() or "MONOCHROME2"
    try:
        if arr.ndim == 3 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            pixels, bits = _dicom_colour(arr, ds, photometric)
        else:
            invert = photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
            pixels = _dicom_grey(arr, ds, invert)
            bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    except (InputError, TooLargeError):
        raise
    except Exception as err:  # noqa: BLE001 - LUT/window tags of any shape come from the file
        raise InputError(f"{source}: cannot apply the DICOM LUT/window ({_short(err)})") from None
    laterality, view = _dicom_laterality_view(ds)
    return LoadedImage(pixels=pixels, bits_stored=bits, photometric=photometric, format="dicom",
                       laterality=laterality, view=view, source=source, spacing_mm=dicom_spacing(ds))


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a library's logger and warnings for the block (their news becomes our one-line error)."""
    logger = logging.getLogger(logger_name)
    before = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = before


def _check_transfer_syntax(ts, source: str) -> None:
    from pydicom.pixels import get_decoder

    if not ts.is_transfer_syntax:
        raise InputError(f"{source}: unknown DICOM transfer syntax {ts}")
    if not ts.is_compressed:
        return
    try:
        available = get_decoder(ts).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InputError(f"{source}: unsupported DICOM transfer syntax {ts.name} ({ts}): no decoder for it is "
                         "installed (uncompressed, RLE Lossless, JPEG baseline/extended, JPEG-LS and JPEG 2000 work)")


def _decode_first_frame(ds, ts) -> np.ndarray:
    """The first frame as stored values (RGB for colour); RLE through PIL's C PackBits decoder."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import RLELossless

    if ts == RLELossless:
        fast = _decode_rle_fast(ds)
        if fast is not None:
            return fast
    return pixel_array(ds, index=0)


def _decode_rle_fast(ds) -> np.ndarray | None:
    """Single-sample 8/16-bit RLE Lossless decoded with PIL's PackBits codec (the same byte-level
    scheme), ~10x faster than pydicom's loop. Each segment is decoded as one long row, so encoders
    whose packets cross row ends (several archives' are) take this path too, and the byte segments
    of a 16-bit image are decoded in two threads (PIL's decoder releases the GIL). None when the
    file is outside that case."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from pydicom.encaps import generate_frames

    rows, cols = int(ds.Rows), int(ds.Columns)
    bits_alloc = int(ds.get("BitsAllocated") or 0)
    if int(ds.get("SamplesPerPixel") or 1) != 1 or bits_alloc not in (8, 16):
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
    except Exception:  # noqa: BLE001 - any damaged encapsulation: pydicom's decoder decides
        return None
    nseg = bits_alloc // 8
    if len(frame) < 64 or struct.unpack("<I", frame[:4])[0] != nseg:
        return None
    offsets = list(struct.unpack(f"<{nseg}I", frame[4:4 + 4 * nseg])) + [len(frame)]

    def plane(k: int) -> np.ndarray:
        seg = frame[offsets[k]:offsets[k + 1]]
        return np.asarray(Image.frombytes("L", (cols * rows, 1), seg, "packbits", "L")).reshape(rows, cols)

    try:
        if nseg == 1:
            planes = [plane(0)]
        else:
            with ThreadPoolExecutor(nseg) as pool:
                planes = list(pool.map(plane, range(nseg)))
    except Exception:  # noqa: BLE001 - a short segment: pydicom's decoder decides
        return None
    if nseg == 1:
        arr = planes[0]
    else:  # segment 1 holds the most significant bytes
        arr = (planes[0].astype(np.uint16) << 8) | planes[1]
    if int(ds.get("PixelRepresentation") or 0) == 1:
        arr = arr.view(np.int8 if nseg == 1 else np.int16)
        stored = int(ds.get("BitsStored") or bits_alloc)
        if stored < bits_alloc:  # sign-extend from BitsStored
            shift = bits_alloc - stored
            arr = (arr << shift) >> shift
    return arr


def _stored_range(ds, arr: np.ndarray) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _dicom_grey(arr: np.ndarray, ds, invert: bool) -> np.ndarray:
    """Stored values -> [0, 1] through the Modality LUT, the VOI LUT/window and the inversion, as one
    lookup table (see the module doc)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    lo, hi = _stored_range(ds, arr)
    if arr.dtype.itemsize <= 2 and arr.dtype.kind in "iu":
        unsigned = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
        codes = np.arange(1 << (8 * arr.dtype.itemsize), dtype=np.int64).astype(unsigned).view(arr.dtype)
        values = np.clip(codes.astype(np.int64), lo, hi)
        lut = apply_voi_lut(apply_modality_lut(values, ds), ds, index=0).astype(np.float64)
        mn, mx = float(lut.min()), float(lut.max())
        lut = (lut - mn) / (mx - mn) if mx > mn else np.zeros_like(lut)
        if invert:
            lut = 1.0 - lut
        return lut.astype(np.float32)[arr.view(unsigned)]
    # 32-bit or float data: apply directly, normalised by the mapped stored range
    ends = apply_voi_lut(apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds), ds, index=0)
    out = apply_voi_lut(apply_modality_lut(np.clip(arr, lo, hi), ds), ds, index=0).astype(np.float64)
    mn, mx = float(np.min(ends)), float(np.max(ends))
    out = (out - mn) / (mx - mn) if mx > mn else np.zeros_like(out)
    if invert:
        out = 1.0 - out
    return out.astype(np.float32)


def _dicom_colour(arr: np.ndarray, ds, photometric: str) -> tuple[np.ndarray, int]:
    """Colour (RGB, YBR converted to RGB by pydicom, palette) -> grey luma in [0, 1], and its bits."""
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize >= 2 else 8
    else:
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return _scale(_to_grey(arr), float((1 << bits) - 1)), bits


def _dicom_laterality_view(ds) -> tuple[str | None, str | None]:
    from deepminer.dicom_source import placement

    place = placement(ds)
    return place.laterality, place.view
