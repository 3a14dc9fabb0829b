"""``deepminer inspect``: what the loader and the tissue mask make of one mammogram."""
from __future__ import annotations

import argparse

NAME = "inspect"
HELP = "print what an image file holds (size, bit depth, photometric, laterality/view, tissue fraction)"
DESCRIPTION = (
    "Load one mammogram (DICOM, PNG, JPEG or TIFF; 8 or 16 bit) through the project's loader and print "
    "one 'key: value' line per fact: file, format, size (width x height), bit depth, photometric "
    "interpretation, laterality and view (when the file says; for a DICOM, also where they were found when "
    "not in ImageLaterality/ViewPosition), tissue fraction. With --out, also write "
    "<stem>_image.png (the normalized image, 8 bit) and <stem>_tissue.png (the breast tissue mask, 0/255)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deepminer.data.io import DEFAULT_MAX_PIXELS

    parser.add_argument("image", help="the image file (format detected from its content)")
    parser.add_argument("--out", default=None, help="folder for <stem>_image.png and <stem>_tissue.png")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse larger images (decompression-bomb guard)")


def facts(loaded, mask, inferred: list[str] | None = None) -> list[tuple[str, str]]:
    """The printed facts, in order; ``inferred``: what a DICOM's laterality/view were read from
    (:meth:`deepminer.dicom_source.Placement.inferred`), a line when not empty."""
    from deepminer.data.tissue import tissue_fraction

    return [
        ("file", loaded.source),
        ("format", loaded.format),
        ("size", f"{loaded.width} x {loaded.height}"),
        ("bit depth", str(loaded.bits_stored)),
        ("photometric", loaded.photometric),
        ("laterality", loaded.laterality or "unknown"),
        ("view", loaded.view or "unknown"),
        *([("inferred", "; ".join(inferred))] if inferred else []),
        ("tissue fraction", f"{tissue_fraction(mask):.3f}"),
    ]


def run(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from deepminer.atomic import atomic_file
    from deepminer.data.io import load_image
    from deepminer.data.tissue import tissue_mask
    from deepminer.errors import InputError

    loaded = load_image(args.image, max_pixels=args.max_pixels)
    mask = tissue_mask(loaded.pixels)
    written = []
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder")
        stem = Path(args.image).stem or "image"
        targets = {
            out / f"{stem}_image.png": np.rint(loaded.pixels * 255.0).astype(np.uint8),
            out / f"{stem}_tissue.png": mask.astype(np.uint8) * np.uint8(255),
        }
        try:
            with contextlib.ExitStack() as files:  # write both, then move both into place
                for target, arr in targets.items():
                    Image.fromarray(arr).save(files.enter_context(atomic_file(target)), format="PNG")
                    written.append(target)
        except OSError as err:
            raise InputError(f"{out}: cannot write ({err.strerror or err})") from None
    inferred: list[str] = []
    if loaded.format == "dicom":
        import pydicom

        from deepminer.dicom_source import placement

        inferred = placement(pydicom.dcmread(args.image, stop_before_pixels=True, force=True)).inferred()
    for key, value in facts(loaded, mask, inferred):
        print(f"{key}: {value}")
    for target in written:
        print(f"wrote: {target}")
    return 0
