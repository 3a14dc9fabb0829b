"""Shared test setup. Torch is kept to few threads so the suite behaves on 2 cores."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests save things a person should look at (screenshots, overlays)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
