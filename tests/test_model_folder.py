"""``deepminer.model_folder``: the model folder's layout, written once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deepminer.model_folder import ATLAS_FILES, ModelFolder, is_atlas, store_models

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "model_store"


def test_paths_spell_the_documented_layout(tmp_path):
    f = ModelFolder(tmp_path / "demo")
    assert f.name == "demo"
    rel = {k: getattr(f, k).relative_to(f.root).as_posix()
           for k in ("model", "atlas", "domain", "card", "metrics", "atlas_json", "ablation")}
    assert rel == {"model": "model.pt", "atlas": "atlas", "domain": "domain.pt", "card": "MODEL_CARD.md",
                   "metrics": "metrics.json", "atlas_json": "atlas/atlas.json", "ablation": "atlas/ablation.json"}
    assert ATLAS_FILES == ("atlas.json", "atlas.npz", "references.csv")
    assert ModelFolder.of(tmp_path / "run" / "best.pt") == ModelFolder(tmp_path / "run")


def test_an_atlas_is_a_folder_with_its_atlas_json(tmp_path):
    f = ModelFolder(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"x")
    assert f.atlas_or_none() is None and not is_atlas(f.atlas)
    f.atlas.mkdir()
    assert f.atlas_or_none() is None  # an empty folder is not an atlas
    f.atlas_json.write_text("{}")
    assert f.atlas_or_none() == f.atlas and is_atlas(f.atlas)


def test_the_bundled_store_is_laid_out_so():
    folders = store_models(STORE)
    assert [f.name for f in folders] == sorted(p.parent.name for p in STORE.glob("*/model.pt"))
    demo = ModelFolder(STORE / "demo")
    assert demo in folders and demo.model.is_file() and demo.atlas_or_none() == demo.atlas
    assert all((demo.atlas / n).is_file() for n in ATLAS_FILES) and demo.ablation.is_file()
    assert demo.domain.is_file() and demo.card.is_file() and demo.metrics.is_file()


def test_the_layout_module_imports_no_torch():
    code = "import sys, deepminer.model_folder; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
