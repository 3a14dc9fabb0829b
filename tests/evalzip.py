"""A small evaluation zip for the Evaluate page's tests: phantom images with lesion masks in the
``images/`` + ``masks/`` layout, one mask of the wrong size and one hostile ``../evil.png`` member."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path


def eval_zip(folder: Path, count: int = 7, seed: int = 21, size: int = 256) -> tuple[bytes, list[str], str]:
    """``(zip bytes, ids of the usable images, id of the one with a mismatched mask)``: ``count``
    abnormal phantoms (``generate_dataset``), the last one's mask at half size, plus ``../evil.png``."""
    from PIL import Image

    from deepminer.data.dataset import read_manifest
    from deepminer.data.phantoms import generate_dataset

    data = generate_dataset(folder, count, seed, size, label_mix={"benign": 0.5, "malignant": 0.5})
    rows = [r for r in read_manifest(data) if r.get("lesion_mask")]
    buf = io.BytesIO()
    ids = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, r in enumerate(rows):
            stem = r["image_id"]
            z.write(data / r["image"], f"images/{stem}.png")
            mask = (data / r["lesion_mask"]).read_bytes()
            if i == len(rows) - 1:
                with Image.open(io.BytesIO(mask)) as im:
                    small = im.resize((im.width // 2, im.height // 2))
                    out = io.BytesIO()
                    small.save(out, format="PNG")
                    mask = out.getvalue()
            else:
                ids.append(stem)
            z.writestr(f"masks/{stem}.png", mask)
        z.writestr("../evil.png", b"\x89PNG\r\n\x1a\n not really")
    return buf.getvalue(), ids, rows[-1]["image_id"]
