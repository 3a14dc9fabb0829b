"""Shared test setup. Torch is kept to few threads so the suite behaves on 2 cores."""
import os
from pathlib import Path

import pytest
import torch

from deepminer.runtime import keep_freed_memory

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
keep_freed_memory()  # as every deepminer command and the server run (faster forward passes)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests save things a person should look at (screenshots, overlays)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict:
    """A tiny model (seed 0) saved as ``demo/model.pt`` with its atlas profiled on a small phantom
    data set (also usable as sample images), built once per session:
    ``{"root", "data", "model_dir"}``."""
    from deepminer.atlas import dissect
    from deepminer.data.phantoms import generate_dataset
    from deepminer.models import build_model, save_model

    root = tmp_path_factory.mktemp("tiny-demo")
    data = generate_dataset(root / "data", 2, 3, 256)
    torch.manual_seed(0)
    save_model(build_model("tiny", pretrained=False), root / "demo" / "model.pt", patch_size=48)
    dissect(root / "demo" / "model.pt", data, split="train", out=root / "demo" / "atlas", progress=False,
            batch_size=64, topk=8)
    return {"root": root, "data": data, "model_dir": root / "demo"}
