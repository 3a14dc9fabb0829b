"""deepminer.data.uploads: evaluation sets from an untrusted zip or a server folder."""
from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepminer.data import uploads
from deepminer.data.uploads import EvalItem, extract_eval_zip, folder_items
from deepminer.errors import InputError


def _png(w: int, h: int, value: int = 0, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w), dtype=np.uint8) if value == 0 else np.full((h, w), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mask(w: int, h: int) -> bytes:
    arr = np.zeros((h, w), np.uint8)
    arr[h // 4:h // 2, w // 4:w // 2] = 1
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def _all_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def _assert_only_inside(tmp_path: Path, dest: Path, before: set[Path]) -> None:
    new = set(_all_files(tmp_path)) - before
    assert all(p.resolve().is_relative_to(dest.resolve()) for p in new), new


def test_images_masks_layout_with_hostile_members(tmp_path: Path) -> None:
    members = {f"images/case{i}.png": _png(64, 48, seed=i) for i in range(6)}
    members.update({f"masks/case{i}.png": _mask(64, 48) for i in range(6)})
    members["images/bad size.png"] = _png(64, 48, seed=9)
    members["masks/bad size.png"] = _mask(10, 12)
    members["images/lonely.png"] = _png(64, 48, seed=10)
    members["images/notes.txt"] = b"hello"
    members["images/fake.png"] = b"this is not a png at all"
    members["masks/fake.png"] = _mask(64, 48)
    link = zipfile.ZipInfo("images/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    extra = [(zipfile.ZipInfo("../evil.png"), _png(40, 40)), (zipfile.ZipInfo("/etc/x.png"), _png(40, 40)),
             (zipfile.ZipInfo("images\\win.png"), _png(40, 40)), (zipfile.ZipInfo("C:/x.png"), _png(40, 40)),
             (zipfile.ZipInfo("images/sub/"), b""), (link, b"/etc/passwd")]
    data = _zip(members, extra)
    dest = tmp_path / "session" / "eval"
    before = set(_all_files(tmp_path))

    items, skipped = extract_eval_zip(data, dest)

    assert sorted(i.image_id for i in items) == [f"case{i}" for i in range(6)]
    for item in items:
        assert isinstance(item, EvalItem) and item.label is None
        assert item.image.parent == dest / "images" and item.mask.parent == dest / "masks"
        assert item.image.name[:5].isdigit() and item.image.is_file() and item.mask.is_file()
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["../evil.png"] == "absolute path or '..' refused"
    assert reasons["/etc/x.png"] == "absolute path or '..' refused"
    assert reasons["images\\win.png"] == "absolute path or '..' refused"
    assert reasons["C:/x.png"] == "absolute path or '..' refused"
    assert reasons["images/link.png"] == "symbolic link refused"
    assert reasons["images/notes.txt"] == "not an image"
    assert reasons["images/lonely.png"] == "no mask with the same name"
    assert reasons["images/bad size.png"] == "mask 10x12 differs from its image 64x48 (width x height)"
    assert reasons["images/fake.png"].startswith("not an image")
    assert "images/sub/" not in reasons
    # nothing outside dest, no uploaded name used as a path, rejected pairs removed
    _assert_only_inside(tmp_path, dest, before)
    written = sorted(p.name for p in _all_files(dest))
    assert len(written) == 12 and all(n[:5].isdigit() for n in written)
    assert not (tmp_path / "evil.png").exists()


def test_manifest_layout_in_top_folder(tmp_path: Path) -> None:
    manifest = ("image_id,label,image,lesion_mask\n"
                "a,malignant,images/a.png,lesions/a.png\n"
                "b,benign,images/b.png,\n"
                "c,benign,../c.png,lesions/a.png\n"
                "d,benign,images/d.png,lesions/d.png\n")
    data = _zip({"set/manifest.csv": manifest.encode(), "set/images/a.png": _png(50, 40),
                 "set/lesions/a.png": _mask(50, 40), "set/images/b.png": _png(50, 40)})
    items, skipped = extract_eval_zip(data, tmp_path / "d")
    assert [(i.image_id, i.label) for i in items] == [("a", "malignant")]
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["images/b.png"] == "no lesion mask in manifest.csv"
    assert reasons["../c.png"] == "absolute path or '..' refused"
    assert reasons["images/d.png"] == "image file not found"


def test_limits_refuse_before_extracting(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    data = _zip({"images/a.png": _png(40, 40), "masks/a.png": _mask(40, 40)})
    with pytest.raises(InputError, match=r"^upload is [0-9.]+ MB, over the limit of 0\.000954 MB$"):
        extract_eval_zip(data, dest, max_upload_bytes=1000)
    with pytest.raises(InputError, match="members, over the limit of 1"):
        extract_eval_zip(data, dest, max_members=1)
    with pytest.raises(InputError, match="not a zip file"):
        extract_eval_zip(b"PK\x03\x04 broken" * 10, dest)
    bomb = _zip({"images/a.png": b"\0" * (50 * 2**20), "masks/a.png": _mask(40, 40)})
    assert len(bomb) < 2**20
    with pytest.raises(InputError, match=r"expands to 50 MB, over the limit of 10 MB"):
        extract_eval_zip(bomb, dest, max_total_bytes=10 * 2**20)
    assert not dest.exists() or not any(dest.iterdir())
    (dest / "x").mkdir(parents=True)
    with pytest.raises(InputError, match="empty folder"):
        extract_eval_zip(data, dest)


def _lie_about_sizes(data: bytes, size: int) -> bytes:
    """Rewrite every uncompressed size in the local and central headers to ``size``."""
    buf = bytearray(data)
    pos = 0
    while (pos := buf.find(b"PK\x03\x04", pos)) != -1:
        struct.pack_into("<I", buf, pos + 22, size)
        pos += 4
    pos = 0
    while (pos := buf.find(b"PK\x01\x02", pos)) != -1:
        struct.pack_into("<I", buf, pos + 24, size)
        pos += 4
    return bytes(buf)


def test_lying_headers_stop_at_the_limit(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    honest = _zip({"images/a.png": b"\0" * (50 * 2**20), "masks/a.png": b"\0" * (50 * 2**20)})
    liar = _lie_about_sizes(honest, 1000)
    with zipfile.ZipFile(io.BytesIO(liar)) as zf:
        assert sum(i.file_size for i in zf.infolist()) == 2000  # the central directory check passes
    with pytest.raises(InputError, match="images/a.png"):
        extract_eval_zip(liar, dest, max_total_bytes=10 * 2**20)
    assert sum(p.stat().st_size for p in _all_files(dest)) <= 10 * 2**20


def test_streaming_budget_counts_real_bytes() -> None:
    budget = uploads._Budget(10 * 2**20)
    with pytest.raises(InputError, match="more than 10 MB .*zip bomb"):
        budget.copy(io.BytesIO(b"\0" * (50 * 2**20)), io.BytesIO(), "a.png", 100 * 2**20)
    assert budget.used <= 11 * 2**20
    with pytest.raises(InputError, match="more data than its zip header says"):
        uploads._Budget(2**30).copy(io.BytesIO(b"\0" * 5000), io.BytesIO(), "b.png", 1000)


def test_folder_items_on_phantoms_and_images_masks(tmp_path: Path) -> None:
    from deepminer.data.phantoms import generate_dataset

    ds = generate_dataset(tmp_path / "ph", 4, 3, 128)
    items, skipped = folder_items(ds)
    normal = [f"images/{i}.png" for i in ("P00001_R_CC", "P00001_R_MLO")]  # normal: no lesion mask
    assert [i.image_id for i in items] == ["P00000_R_CC", "P00000_R_MLO"]
    assert [(s.name, s.reason) for s in skipped] == [(n, "no lesion mask in manifest.csv") for n in normal]
    for item in items:
        assert item.image.resolve().is_relative_to(ds.resolve()) and item.mask.is_file()
        assert item.label == "benign"
    # the same folder zipped (inside one top-level folder) gives the same pairs
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in _all_files(ds):
            zf.write(p, "phantoms/" + p.relative_to(ds).as_posix())
    zitems, zskipped = extract_eval_zip(buf.getvalue(), tmp_path / "z")
    assert [(i.image_id, i.label) for i in zitems] == [(i.image_id, i.label) for i in items]
    assert [s.name for s in zskipped] == normal

    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "masks").mkdir()
    (flat / "images" / "a.png").write_bytes(_png(40, 40))
    (flat / "masks" / "a.png").write_bytes(_mask(40, 40))
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(40, 40))
    (flat / "images" / "b.png").symlink_to(outside)
    (flat / "masks" / "b.png").write_bytes(_mask(40, 40))
    items, skipped = folder_items(flat)
    assert [i.image_id for i in items] == ["a"]
    assert [s.name for s in skipped] == ["images/b.png"] and "outside" in skipped[0].reason
    with pytest.raises(InputError, match="neither"):
        folder_items(tmp_path)
