"""The ``deepminer`` CLI itself: a light start-up (no torch unless a model runs), an explicit list of
command modules, and the ``deepminer.commands`` entry points (``archive`` comes from ``serve``).

The start-up checks run in a fresh subprocess: this test process has torch loaded already."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from dicomfixtures import write_dicom
from PIL import Image

from deepminer import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "pandas", "scipy", "cv2", "matplotlib", "sklearn", "streamlit",
         "pytorch_grad_cam", "ts")


def loaded_after(code: str, cwd: Path = ROOT) -> dict:
    """Run ``code`` in a fresh interpreter, then report which of :data:`HEAVY` it imported, and what
    it printed to stdout before that."""
    probe = (f"{code}\nimport json as _j, sys as _s\n"
             f"print('@@' + _j.dumps(sorted(m for m in {HEAVY!r} if m in _s.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, _, heavy = proc.stdout.rpartition("@@")
    return {"heavy": json.loads(heavy), "out": out, "err": proc.stderr}


def test_help_imports_no_torch():
    res = loaded_after("import sys; from deepminer.cli import main\n"
                       "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0")
    assert res["heavy"] == []
    assert "inspect" in res["out"] and "archive" in res["out"]  # built-ins and the entry point


def test_python_m_deepminer_help_runs_and_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "deepminer", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for mod in cli.commands():
        assert f"    {mod.NAME}" in proc.stdout


def test_building_the_parser_imports_no_torch():
    res = loaded_after("from deepminer.cli import build_parser\nbuild_parser()\nbuild_parser(['inspect', 'x.png'])\n"
                       "import deepminer\nprint(deepminer.CLASSES, deepminer.__version__)")
    assert res["heavy"] == []
    assert "('normal', 'benign', 'malignant') 0.1.0" in res["out"]


# Commands whose --help still imports torch: their add_arguments takes choices/defaults from modules
# that import torch at the top. Known, listed here so that any other command doing it fails.
@pytest.mark.parametrize("command", sorted({m.NAME for m in cli.commands()}))
def test_command_help_imports_no_torch(command):
    res = loaded_after(f"from deepminer.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
                       "except SystemExit as e:\n    assert e.code == 0")
    assert f"usage: deepminer {command}" in res["out"]
    assert res["heavy"] == [], res["heavy"]  # the paper defaults come from deepminer.defaults (no torch)


@pytest.mark.parametrize("kind", ["dicom", "png"])
def test_inspect_imports_no_torch(tmp_path, kind):
    values = np.zeros((300, 200), np.uint16)
    values[60:240, :120] = 40000
    if kind == "dicom":
        path = write_dicom(tmp_path / "mg.dcm", values, laterality="R", view="MLO")
    else:
        path = tmp_path / "mg.png"
        Image.fromarray(values).save(path)
    res = loaded_after(f"from deepminer.cli import main\nassert main(['inspect', {str(path)!r}]) == 0")
    assert "size: 200 x 300" in res["out"] and "bit depth: 16" in res["out"], res["err"]
    assert "torch" not in res["heavy"] and "torchvision" not in res["heavy"], res["heavy"]
    assert not {"pandas", "scipy", "matplotlib"} & set(res["heavy"]), res["heavy"]


def test_importing_deepminer_keeps_torchvision_importable_without_importing_torch():
    res = loaded_after("import sys, deepminer\nassert 'torch' not in sys.modules\nimport torchvision\n"
                       "print(torchvision.models.resnet18(weights=None, num_classes=3).fc.out_features)")
    assert res["out"].strip() == "3"


def test_the_command_list_is_explicit_and_complete():
    """Every module of deepminer/commands is in cli.COMMANDS, imported by name (no discovery)."""
    files = {p.stem for p in (ROOT / "deepminer" / "commands").glob("*.py") if not p.stem.startswith("_")}
    assert {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS} == files
    source = (ROOT / "deepminer" / "cli.py").read_text()
    assert "pkgutil" not in source and "import_module" not in source and "sys.path" not in source
    for mod in cli.COMMANDS:
        assert isinstance(mod.NAME, str) and isinstance(mod.HELP, str) and callable(mod.run)
        assert callable(mod.add_arguments)


def test_archive_comes_from_the_serve_entry_point():
    eps = {ep.name: ep.value for ep in entry_points(group=cli.ENTRY_POINT_GROUP)}
    assert eps.get("archive") == "serve.archive"
    assert not (ROOT / "deepminer" / "commands" / "archive.py").exists()
    import serve.archive

    assert serve.archive in cli.commands() and serve.archive.NAME == "archive"


def test_a_builtin_command_does_not_load_the_entry_points():
    res = loaded_after("from deepminer.cli import build_parser\nimport sys\n"
                       "build_parser(['inspect', 'x.png']).parse_args(['inspect', 'x.png'])\n"
                       "print('importlib.metadata' in sys.modules, 'serve.archive' in sys.modules)")
    assert res["out"].split() == ["False", "False"]


def test_archive_help_works_from_any_folder(tmp_path):
    """`archive` reaches the CLI through the installed entry point, not through the current folder."""
    proc = subprocess.run([sys.executable, "-m", "deepminer", "archive", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: deepminer archive" in proc.stdout and "--max-batch-delay" in proc.stdout


def test_unknown_command_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nosuch"])
    assert e.value.code == 2 and "invalid choice: 'nosuch'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "archive" in capsys.readouterr().out
