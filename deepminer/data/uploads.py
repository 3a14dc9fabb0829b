"""Evaluation sets from an untrusted zip upload or a server folder: a list of (image, lesion mask) pairs.

Two layouts are understood (also in ``docs/data.md``, "Evaluation sets"):

1. **Dataset-folder layout**: ``manifest.csv`` with (at least) the columns ``image`` and ``lesion_mask``
   (paths relative to the folder) and optionally ``label``; rows with an empty ``lesion_mask`` are
   skipped with a reason. In a zip the manifest may sit at the top or inside one top-level folder.
2. **images/ + masks/**: ``images/<stem>.<ext>`` (``.png .jpg .jpeg .tif .tiff .dcm``) and
   ``masks/<stem>.png`` (or ``.tif``/``.tiff``) with the same stem; non-zero mask pixels are lesion.
   Also accepted inside one top-level folder of a zip.

Every image is decoded once with :func:`deepminer.data.io.load_image` (so "not an image" is judged by
the content, not only the name) and every mask must be a PNG/TIFF of exactly its image's size.
Anything unusable becomes a :class:`Skipped` with a one-line reason; only a broken or hostile upload as
a whole raises :class:`~deepminer.errors.InputError`.

Safety of :func:`extract_eval_zip` (the zip is untrusted):

* the upload over ``max_upload_bytes``, more than ``max_members`` members, or a total uncompressed size
  (from the central directory) over ``max_total_bytes`` -> ``InputError`` before anything is extracted;
* the bytes actually decompressed are counted again while streaming each member in chunks, so a zip
  whose headers lie stops at the limit (or at its first bad CRC) with an ``InputError``, never a full disk;
* members with absolute paths, drive letters, backslashes or ``..`` components, symbolic links and
  encrypted members are refused (listed as skipped, never extracted); directories are ignored;
* no uploaded name is ever used as a path: files are written to generated names
  ``dest/images/00001<ext>`` and ``dest/masks/00001<ext>``; ``image_id`` is a sanitised display name.

``dest`` must be empty or not exist. The caller passes a per-session temporary folder and removes it
afterwards (also after an ``InputError``, which may leave partly extracted files there).

:func:`folder_items` reads the same layouts in a folder on the server without copying (a
lab-configured folder, the bundled phantom test set); paths that leave the folder, through ``..`` or a
symbolic link pointing outside it, are refused.
"""
from __future__ import annotations

import csv
import io
import posixpath
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deepminer.errors import DeepMinerError, InputError

MAX_UPLOAD_BYTES = 200 * 2**20  #: the zip itself
MAX_TOTAL_BYTES = 1 * 2**30  #: sum of uncompressed member sizes
MAX_MEMBERS = 5000
MAX_MANIFEST_BYTES = 16 * 2**20

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")
MASK_EXTS = (".png", ".tif", ".tiff")
MANIFEST = "manifest.csv"
_CHUNK = 2**20
_UNSAFE = "absolute path or '..' refused"


@dataclass(frozen=True)
class EvalItem:
    image_id: str  #: a display name (the member's stem, sanitised; never used as a path)
    image: Path  #: where the image file is (inside dest for zips)
    mask: Path  #: its lesion mask
    label: str | None  #: from manifest.csv when the dataset-folder layout gave one


@dataclass(frozen=True)
class Skipped:
    name: str  #: the member / file name as given (for display only)
    reason: str  #: one line


# ------------------------------------------------------------------------------------------ helpers
def _mb(n: int) -> str:
    """Bytes as MB for a message: ``200 MB``, ``10.5 MB``, ``0.000954 MB``."""
    mb = n / 2**20
    return (f"{mb:.1f}".removesuffix(".0") if mb >= 1 else f"{mb:.3g}") + " MB"


def _unsafe(name: str) -> bool:
    """An absolute path, a drive letter, a backslash, a NUL or a ``..`` component."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return True
    if re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in name.split("/"))


def _display_id(name: str) -> str:
    stem = posixpath.splitext(posixpath.basename(name.rstrip("/")))[0]
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return clean[:100]


def _ext(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def _one_line(err: BaseException, name: str) -> str:
    text = str(err)
    if text.startswith(name + ": "):
        text = text[len(name) + 2:]
    return " ".join(text.split())


def _check_pair(image: Path, mask: Path, image_name: str, mask_name: str) -> str | None:
    """None when the image decodes and the mask is a PNG/TIFF of the same size; else the reason."""
    from PIL import Image

    from deepminer.data.io import load_image

    try:
        img = load_image(image, name=image_name)
    except DeepMinerError as err:
        return f"not an image ({_one_line(err, image_name)})"
    width, height = img.width, img.height
    del img
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(mask) as im:
                if im.format not in ("PNG", "TIFF"):
                    return f"mask {mask_name} is not a PNG or TIFF image"
                mw, mh = im.size
                if (mw, mh) != (width, height):
                    return (f"mask {mw}x{mh} differs from its image {width}x{height} (width x height)")
                im.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a broken mask
        return f"mask {mask_name} is not a readable image ({' '.join(str(err).split())[:120]})"
    return None


class _Budget:
    """Counts the bytes really decompressed against ``max_total_bytes``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def copy(self, src: IO[bytes], out: IO[bytes], name: str, declared: int) -> None:
        written = 0
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                return
            written += len(chunk)
            self.used += len(chunk)
            if self.used > self.limit:
                raise InputError(f"zip expands to more than {_mb(self.limit)} (stopped in {name}): refused "
                                 "as a possible zip bomb")
            if written > declared:
                raise InputError(f"{name}: holds more data than its zip header says: refused")
            out.write(chunk)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: _Budget) -> None:
    with open(target, "xb") as out:  # "x": a generated name, never an existing file
        _read_member(zf, info, out, budget)


def _parse_manifest(text: str, where: str) -> list[tuple[str, str, str | None]]:
    """``(image, lesion_mask, label)`` per row of a manifest."""
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    missing = [c for c in ("image", "lesion_mask") if c not in fields]
    if missing:
        raise InputError(f"{where}: missing columns {', '.join(missing)}")
    rows = []
    for row in reader:
        label = (row.get("label") or "").strip() or None
        rows.append(((row.get("image") or "").strip(), (row.get("lesion_mask") or "").strip(), label))
    return rows


def _pair_by_stem(images: dict[str, str], masks: dict[str, str], skipped: list[Skipped]
                  ) -> list[tuple[str, str]]:
    """(image name, mask name) for equal stems; the rest skipped. Both dicts map stem -> name."""
    pairs = []
    for stem in sorted(images):
        if stem in masks:
            pairs.append((images[stem], masks[stem]))
        else:
            skipped.append(Skipped(images[stem], "no mask with the same name"))
    for stem in sorted(set(masks) - set(images)):
        skipped.append(Skipped(masks[stem], "mask without an image of the same name"))
    return pairs


def _sort_layout_files(names: list[str], root: str, skipped: list[Skipped]
                       ) -> tuple[dict[str, str], dict[str, str]]:
    """Split the files under ``root`` into images/ and masks/ by stem (direct children only)."""
    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    for name in names:
        rel = name[len(root):]
        folder, _, base = rel.partition("/")
        if folder not in ("images", "masks") or not base or "/" in base:
            skipped.append(Skipped(name, "not in images/ or masks/"))
            continue
        stem, ext = posixpath.splitext(base)
        allowed, bucket = (IMAGE_EXTS, images) if folder == "images" else (MASK_EXTS, masks)
        if ext.lower() not in allowed:
            skipped.append(Skipped(name, "not an image" if folder == "images" else "mask is not PNG or TIFF"))
        elif stem in bucket:
            skipped.append(Skipped(name, f"another file in {folder}/ has the same name"))
        else:
            bucket[stem] = name
    return images, masks


def _manifest_pairs(rows: list[tuple[str, str, str | None]], root: str, exists, skipped: list[Skipped]
                    ) -> list[tuple[str, str, str | None]]:
    """Manifest rows -> (image name, mask name, label) under ``root``; ``exists(name)`` says a file is there."""
    out = []
    for image, mask, label in rows:
        shown = image or "(empty image column)"
        if not image:
            skipped.append(Skipped(shown, "manifest row without an image"))
            continue
        if not mask:
            skipped.append(Skipped(image, "no lesion mask in manifest.csv"))
            continue
        if _unsafe(image) or _unsafe(mask):
            skipped.append(Skipped(image, _UNSAFE))
            continue
        img_name = posixpath.normpath(root + image)
        mask_name = posixpath.normpath(root + mask)
        if _ext(img_name) not in IMAGE_EXTS:
            skipped.append(Skipped(image, "not an image"))
        elif _ext(mask_name) not in MASK_EXTS:
            skipped.append(Skipped(image, f"mask {mask} is not PNG or TIFF"))
        elif not exists(img_name):
            skipped.append(Skipped(image, "image file not found"))
        elif not exists(mask_name):
            skipped.append(Skipped(image, f"mask {mask} not found"))
        else:
            out.append((img_name, mask_name, label))
    return out


# ------------------------------------------------------------------------------------------------ zip
def extract_eval_zip(data: bytes, dest: Path, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                     max_total_bytes: int = MAX_TOTAL_BYTES, max_members: int = MAX_MEMBERS
                     ) -> tuple[list[EvalItem], list[Skipped]]:
    """Extract the (image, mask) pairs of an untrusted zip into ``dest`` (empty or absent), safely.

    The layouts and the safety rules are in the module docstring. Raises a one-line ``InputError`` for
    an upload that is too large, not a zip, has too many members, expands past ``max_total_bytes``, has
    no recognised layout, or whose data is corrupt. ``dest`` is a per-session temporary folder the
    caller removes afterwards.
    """
    if len(data) > max_upload_bytes:
        raise InputError(f"upload is {_mb(len(data))}, over the limit of {_mb(max_upload_bytes)}")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest}: must be an empty folder or not exist")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError):
        raise InputError("upload: not a zip file") from None
    with zf:
        if len(infos) > max_members:
            raise InputError(f"zip has {len(infos)} members, over the limit of {max_members}")
        total = sum(max(int(i.file_size), 0) for i in infos if not i.is_dir())
        if total > max_total_bytes:
            raise InputError(f"zip expands to {_mb(total)}, over the limit of {_mb(max_total_bytes)}")

        skipped: list[Skipped] = []
        files: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if info.is_dir():
                continue
            if _unsafe(name):
                skipped.append(Skipped(name, _UNSAFE))
            elif stat.S_ISLNK(info.external_attr >> 16):
                skipped.append(Skipped(name, "symbolic link refused"))
            elif info.flag_bits & 0x1:
                skipped.append(Skipped(name, "encrypted member refused"))
            elif name.startswith("__MACOSX/") or posixpath.basename(name) == ".DS_Store":
                continue
            elif name in files:
                skipped.append(Skipped(name, "duplicate member name"))
            else:
                files[name] = info

        budget = _Budget(max_total_bytes)
        root = _zip_root(list(files))
        triples: list[tuple[str, str, str | None]]
        if root is not None and root + MANIFEST in files:
            info = files[root + MANIFEST]
            if info.file_size > MAX_MANIFEST_BYTES:
                raise InputError(f"{info.filename}: over {_mb(MAX_MANIFEST_BYTES)}")
            buf = io.BytesIO()
            _read_member(zf, info, buf, budget)
            try:
                text = buf.getvalue().decode("utf-8-sig")
            except UnicodeDecodeError:
                raise InputError(f"{info.filename}: not a UTF-8 CSV file") from None
            triples = _manifest_pairs(_parse_manifest(text, info.filename), root, files.__contains__, skipped)
        elif root is not None:
            images, masks = _sort_layout_files(sorted(files), root, skipped)
            triples = [(i, m, None) for i, m in _pair_by_stem(images, masks, skipped)]
        else:
            raise InputError("zip has neither manifest.csv nor images/ and masks/ folders "
                             "(see 'Evaluation sets' in docs/data.md)")

        (dest / "images").mkdir(parents=True, exist_ok=True)
        (dest / "masks").mkdir(parents=True, exist_ok=True)
        items: list[EvalItem] = []
        for k, (img_name, mask_name, label) in enumerate(triples, start=1):
            img_path = dest / "images" / f"{k:05d}{_ext(img_name)}"
            mask_path = dest / "masks" / f"{k:05d}{_ext(mask_name)}"
            _copy_member(zf, files[img_name], img_path, budget)
            _copy_member(zf, files[mask_name], mask_path, budget)
            reason = _check_pair(img_path, mask_path, img_name, mask_name)
            if reason:
                skipped.append(Skipped(img_name, reason))
                img_path.unlink(missing_ok=True)
                mask_path.unlink(missing_ok=True)
                continue
            items.append(EvalItem(_display_id(img_name), img_path, mask_path, label))
    return items, skipped


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: IO[bytes], budget: _Budget) -> None:
    try:
        with zf.open(info) as src:
            budget.copy(src, out, info.filename, info.file_size)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - zipfile/zlib raise many types for a damaged stream
        raise InputError(f"{info.filename}: corrupt zip member ({' '.join(str(err).split())[:120]})") from None


def _zip_root(names: list[str]) -> str | None:
    """``""`` or ``"top/"`` where the layout starts (a manifest or images/), or None."""
    if MANIFEST in names or any(n.startswith("images/") for n in names):
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        top = tops.pop() + "/"
        if top + MANIFEST in names or any(n.startswith(top + "images/") for n in names):
            return top
    return None


# --------------------------------------------------------------------------------------------- folder
def folder_items(folder: Path) -> tuple[list[EvalItem], list[Skipped]]:
    """The (image, mask) pairs of a server folder in one of the two layouts, in place (no copying).

    Paths are inside ``folder``; anything resolving outside it (``..``, absolute paths, symbolic links
    pointing out) is skipped. Raises ``InputError`` when the folder is missing or has neither layout.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    base = folder.resolve()
    skipped: list[Skipped] = []

    def inside(rel: str) -> bool:
        p = (folder / rel)
        try:
            return p.resolve().is_relative_to(base) and p.is_file()
        except (OSError, RuntimeError):
            return False

    manifest = folder / MANIFEST
    triples: list[tuple[str, str, str | None]]
    if manifest.is_file():
        if not manifest.resolve().is_relative_to(base):
            raise InputError(f"{manifest}: points outside {folder}")
        try:
            text = manifest.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"{manifest}: not a UTF-8 CSV file") from None
        rows = _parse_manifest(text, str(manifest))
        triples = []
        for img, msk, label in _manifest_pairs(rows, "", lambda n: (folder / n).exists(), skipped):
            if inside(img) and inside(msk):
                triples.append((img, msk, label))
            else:
                skipped.append(Skipped(img, "points outside the folder (symbolic link) or is not a file"))
    elif (folder / "images").is_dir():
        names = []
        for sub in ("images", "masks"):
            d = folder / sub
            if d.is_dir():
                names += [f"{sub}/{p.name}" for p in sorted(d.iterdir()) if not p.is_dir()]
        images, masks = _sort_layout_files(names, "", skipped)
        triples = []
        for img, msk in _pair_by_stem(images, masks, skipped):
            if inside(img) and inside(msk):
                triples.append((img, msk, None))
            else:
                skipped.append(Skipped(img, "points outside the folder (symbolic link) or is not a file"))
    else:
        raise InputError(f"{folder}: has neither manifest.csv nor images/ and masks/ folders")

    items: list[EvalItem] = []
    for img, msk, label in triples:
        reason = _check_pair(folder / img, folder / msk, img, msk)
        if reason:
            skipped.append(Skipped(img, reason))
        else:
            items.append(EvalItem(_display_id(img), folder / img, folder / msk, label))
    return items, skipped
