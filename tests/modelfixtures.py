"""Small builders the engine tests share: a seeded tiny model, a seeded random grey image, a
rectangular sketch, a breast-like PNG."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from deepminer.models import build_model

TINY_MODEL = "tiny"  # the name the session's shared tiny TorchServe (conftest.py ``tiny_server``) serves it as


def tiny_model(seed: int = 0):
    """The registry's ``tiny`` FCN (32 units, stride 16), random weights from ``seed``, eval mode."""
    torch.manual_seed(seed)
    return build_model("tiny", pretrained=False).eval()


def random_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A float32 grey image of uniform noise in [0, 1)."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def box_sketch(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    """A bool mask of ``shape``, True on ``[rows, cols]``."""
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def tiny_checkpoint(folder, seed: int = 1):
    """The tiny model (random weights from ``seed``) saved as ``folder/model.pt``."""
    from pathlib import Path

    from deepminer.models import save_model

    return save_model(tiny_model(seed), Path(folder) / "model.pt")


def start_tiny_server(tmp_path_factory, model_path, name: str, *, env=None, **mar_options):
    """A real TorchServe (demo profile) serving ``model_path`` as ``name`` (archived with
    ``mar_options``), started; the caller stops it."""
    from serve.archive import build_mar
    from serve.launch import TorchServe

    store = tmp_path_factory.mktemp("store")
    build_mar(model_path, store, name=name, **mar_options)
    ts = TorchServe(store, {name: f"{name}.mar"}, tmp_path_factory.mktemp("ts"), profile="demo", env=env)
    ts.start(timeout=300)
    print(f"\nTorchServe (demo profile) ready in {ts.started_s:.1f} s")
    return ts


def two_model_store(tiny_demo: dict, folder, *, second_seed: int = 3) -> dict:
    """A model store of two tiny models with their atlases over the same phantoms, laid out as
    ``model_store/`` is (``<folder>/alpha`` = the session's tiny demo, seed 0; ``<folder>/beta`` = seed
    ``second_seed``, same recipe; each ``model.pt`` + ``atlas/`` + ``MODEL_CARD.md``):
    ``{"store", "a", "b", "data"}``."""
    import shutil
    from pathlib import Path

    from deepminer.atlas import dissect
    from deepminer.models import save_model

    store = Path(folder)
    a, b = store / "alpha", store / "beta"
    a.mkdir(parents=True)
    shutil.copy2(tiny_demo["model_dir"] / "model.pt", a / "model.pt")
    shutil.copytree(tiny_demo["model_dir"] / "atlas", a / "atlas")
    save_model(tiny_model(second_seed), b / "model.pt", patch_size=48)
    dissect(b / "model.pt", tiny_demo["data"], split="train", out=b / "atlas", progress=False, batch_size=64, topk=8)
    for d in (a, b):
        (d / "MODEL_CARD.md").write_text(f"# {d.name}: a tiny test model (random weights)\n", encoding="utf-8")
    return {"store": store, "a": a, "b": b, "data": tiny_demo["data"]}


def breast_png(h: int = 256, w: int = 192, seed: int = 0) -> bytes:
    """A bright textured half-ellipse with a blob on black (enough for the tissue mask), 8-bit PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.8 * w)) ** 2 < 1
    blob = np.exp(-(((yy - h * 0.4) ** 2 + (xx - w * 0.35) ** 2) / (2 * (0.06 * min(h, w)) ** 2)))
    img = np.clip(inside * (0.55 + 0.25 * rng.random((h, w)) + 0.3 * blob), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
