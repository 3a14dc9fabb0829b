"""Build a TorchServe ``.mar`` for a deepminer checkpoint (the archiver wrapper).

The archive is self-contained: it holds the weights (``model.pt``), the handler, a copy of the
``deepminer`` library (so a host with torch and torchvision but without this project serves it), the
unit atlas (``atlas/``, optional), the per-model config (``model-config.yaml``: workers, batch size,
max batch delay, device type, handler settings) and a ``requirements.txt`` with the third-party
libraries ``deepminer`` imports besides torch/torchvision (installed by TorchServe only when the host
sets ``install_py_dep_per_model=true``).

Also the ``deepminer archive`` command (``NAME``, ``HELP``, ``DESCRIPTION``, :func:`add_arguments`,
:func:`run`): ``pyproject.toml`` declares this module under the ``deepminer.commands`` entry-point
group, which :mod:`deepminer.cli` reads, so the library never imports ``serve``. Keep module-level
imports light: ``deepminer --help`` imports this module to list the command.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import deepminer
from deepminer.atomic import atomic_path
from deepminer.errors import InputError
from deepminer.model_folder import ATLAS, MODEL

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "handlers" / "deepminer_handler.py"
MODEL_CONFIG = ROOT / "serve" / "model-config.yaml"
LIBRARY = Path(deepminer.__file__).resolve().parent
DEVICES = ("auto", "cpu", "gpu")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# import name -> distribution name, where they differ
_DIST = {"PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn", "yaml": "PyYAML",
         "cv2": "opencv-python-headless"}
_HOST_PROVIDES = {"torch", "torchvision", "deepminer"}


def model_config(*, workers: int | None = None, batch_size: int | None = None,
                 max_batch_delay: int | None = None, device: str = "auto",
                 response_timeout: int | None = None) -> dict[str, Any]:
    """The per-model config: ``serve/model-config.yaml`` with the given overrides."""
    import yaml

    cfg = yaml.safe_load(MODEL_CONFIG.read_text(encoding="utf-8"))
    if workers is not None:
        if workers < 1:
            raise InputError(f"--workers: must be >= 1, got {workers}")
        cfg["minWorkers"] = cfg["maxWorkers"] = int(workers)
    if batch_size is not None:
        if batch_size < 1:
            raise InputError(f"--batch-size: must be >= 1, got {batch_size}")
        cfg["batchSize"] = int(batch_size)
    if max_batch_delay is not None:
        if max_batch_delay < 1:  # TorchServe reads 0 as "unset" and waits its 100 ms default
            raise InputError(f"--max-batch-delay: must be >= 1 ms (TorchServe treats 0 as its 100 ms "
                             f"default), got {max_batch_delay}")
        cfg["maxBatchDelay"] = int(max_batch_delay)
    if response_timeout is not None:
        cfg["responseTimeout"] = int(response_timeout)
    if device not in DEVICES:
        raise InputError(f"--device: {device!r} not in {'/'.join(DEVICES)}")
    if device != "auto":
        cfg["deviceType"] = device
    return cfg


def runtime_requirements() -> list[str]:
    """Pinned third-party distributions the ``deepminer`` package imports (torch/torchvision excluded:
    the TorchServe host provides them), taken from the project's ``requirements.txt``."""
    pins: dict[str, str] = {}
    req = ROOT / "requirements.txt"
    if req.is_file():
        for line in req.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
            if m:
                pins[m.group(1).lower()] = f"{m.group(1)}=={m.group(2)}"
    stdlib = set(sys.stdlib_module_names)
    wanted: set[str] = set()
    for py in LIBRARY.rglob("*.py"):
        try:
            tree = ast.parse(py.read_text(encoding="utf-8"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top not in stdlib and top not in _HOST_PROVIDES:
                    wanted.add(_DIST.get(top, top).lower())
    return sorted(pins[w] for w in wanted if w in pins)


def _check_model(model: Path, atlas: Path | None) -> tuple[int, str]:
    """Load the checkpoint (and atlas) once so a bad input fails here, not on the server."""
    from deepminer.models import load_model

    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    try:
        net = load_model(model)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any load failure is a bad input here
        raise InputError(f"{model}: not a deepminer checkpoint ({type(err).__name__}: {err})") from None
    if atlas is not None:
        from deepminer.atlas import Atlas

        if not atlas.is_dir():
            raise InputError(f"{atlas}: no such atlas folder")
        thresholds = Atlas.load(atlas).thresholds
        if len(thresholds) != net.num_units:
            raise InputError(f"{atlas}: {len(thresholds)} unit thresholds for a model with {net.num_units} units")
    return net.num_units, net.arch


def build_mar(model: str | os.PathLike, out_dir: str | os.PathLike, *, name: str = "demo",
              atlas: str | os.PathLike | None = None, version: str = "1.0", workers: int | None = None,
              batch_size: int | None = None, max_batch_delay: int | None = None, device: str = "auto",
              response_timeout: int | None = None, force: bool = True,
              extra: "list[str | os.PathLike] | tuple[str | os.PathLike, ...]" = ()) -> Path:
    """Build ``out_dir/<name>.mar`` and return its path. The archive appears only when complete.
    ``extra``: more files or folders shipped next to ``model.pt`` in the archive (e.g. a model's
    ``domain.pt``), under their own names."""
    import yaml

    model = Path(model)
    atlas = Path(atlas) if atlas is not None else None
    out_dir = Path(out_dir)
    if not _NAME.match(name):
        raise InputError(f"--name: {name!r} must be letters, digits, '_', '-' or '.'")
    target = out_dir / f"{name}.mar"
    if target.exists() and not force:
        raise InputError(f"{target}: already exists")
    cfg = model_config(workers=workers, batch_size=batch_size, max_batch_delay=max_batch_delay,
                       device=device, response_timeout=response_timeout)
    _check_model(model, atlas)
    extras = [Path(e) for e in extra]
    for e in extras:
        if not e.exists():
            raise InputError(f"--extra: {e}: no such file or folder")
        if e.name in (MODEL, ATLAS, "deepminer", "model-config.yaml", "requirements.txt"):
            raise InputError(f"--extra: {e.name!r} is a name the archive itself uses")
    if atlas is None:
        cfg["handler"].pop("atlas", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deepminer-mar-") as tmp:
        stage = Path(tmp)
        payload = stage / "payload"
        shutil.copytree(LIBRARY, payload / "deepminer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if atlas is not None:
            shutil.copytree(atlas, payload / ATLAS, ignore=shutil.ignore_patterns(".*"))
        for e in extras:
            if e.is_dir():
                shutil.copytree(e, payload / e.name, ignore=shutil.ignore_patterns(".*", "__pycache__"))
            else:
                shutil.copy2(e, payload / e.name)
        shutil.copy2(model, stage / MODEL)
        (stage / "model-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        (stage / "requirements.txt").write_text("\n".join(runtime_requirements()) + "\n", encoding="utf-8")
        export = stage / "export"
        export.mkdir()
        (stage / "tmp").mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name,
               "--version", str(version), "--handler", str(HANDLER), "--serialized-file", str(stage / MODEL),
               "--extra-files", str(payload), "--config-file", str(stage / "model-config.yaml"),
               "--requirements-file", str(stage / "requirements.txt"), "--export-path", str(export), "--force"]
        env = {**os.environ, "TMPDIR": str(stage / "tmp")}  # the archiver stages in $TMPDIR/<name>
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        built = export / f"{name}.mar"
        if proc.returncode != 0 or not built.is_file():
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise InputError(f"torch-model-archiver failed: {msg[-1] if msg else proc.returncode}")
        with atomic_path(target, suffix=".partial") as tmp_target:
            shutil.move(str(built), tmp_target)
    return target


def mar_contents(mar: str | os.PathLike) -> dict[str, Any]:
    """What a ``.mar`` holds: ``files`` (names), ``manifest`` (dict) and ``config`` (the model yaml)."""
    import json

    import yaml

    with zipfile.ZipFile(mar) as z:
        names = z.namelist()
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        cfg_name = manifest["model"].get("configFile")
        cfg = yaml.safe_load(z.read(cfg_name)) if cfg_name else {}
    return {"files": names, "manifest": manifest, "config": cfg}


# -- the ``deepminer archive`` command (entry point ``deepminer.commands: archive``) ----------------

NAME = "archive"
HELP = "build a TorchServe .mar (weights, handler, the deepminer library, unit atlas, per-model config)"
DESCRIPTION = (
    "Package a deepminer checkpoint for TorchServe: the weights, the DeepMiner handler, a copy of the "
    "deepminer library (the .mar serves on a host with torch and torchvision but without this project), "
    "the unit atlas (thresholds for unit masks and sketch queries) and a per-model config with workers, "
    "batch size, max batch delay and device type. Writes OUT/NAME.mar (only when complete)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="deepminer checkpoint (.pt, from train or save_model)")
    parser.add_argument("--atlas", default=None, help="unit atlas folder (atlas.json + atlas.npz from dissect)")
    parser.add_argument("--name", default="demo", help="model name: the URL is /predictions/NAME")
    parser.add_argument("--out", default="model_store", help="folder for NAME.mar")
    parser.add_argument("--version", default="1.0", help="model version reported by the API")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers for this model, spread over the server's GPUs (None: 1, from serve/model-config.yaml)")
    parser.add_argument("--batch-size", type=int, default=None, help="max requests per batch (None: 4)")
    parser.add_argument("--max-batch-delay", type=int, default=None, help="ms a request waits for others to fill a batch, >= 1 (None: 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="deviceType: auto = a GPU when the server has one, else the CPU")
    parser.add_argument("--no-overwrite", action="store_true", help="fail if OUT/NAME.mar exists")
    parser.add_argument("--extra", action="append", default=[], metavar="PATH",
                        help="a file or folder shipped next to model.pt in the archive (repeatable; "
                             "scripts/model_store.sh passes every other file of model_store/NAME/)")


def run(args: argparse.Namespace) -> int:
    mar = build_mar(args.model, args.out, name=args.name, atlas=args.atlas, version=args.version,
                    workers=args.workers, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
                    device=args.device, force=not args.no_overwrite, extra=args.extra)
    info = mar_contents(mar)
    cfg = info["config"]
    print(f"{mar}: {mar.stat().st_size / 2**20:.1f} MiB, {len(info['files'])} files; workers "
          f"{cfg.get('minWorkers')}, batch {cfg.get('batchSize')}, delay {cfg.get('maxBatchDelay')} ms, "
          f"device {cfg.get('deviceType', 'auto')}, atlas {'yes' if args.atlas else 'no'}", file=sys.stderr)
    return 0
