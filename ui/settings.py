"""Settings of the workbench, read once from the environment (no Streamlit here).

| variable | default | meaning |
|---|---|---|
| ``DEEPMINER_SERVE_URL`` | ``http://127.0.0.1:8080`` | TorchServe inference address |
| ``DEEPMINER_MODEL`` | ``demo`` | model name registered in TorchServe |
| ``DEEPMINER_KEY_FILE`` | ``var/serve/key_file.json`` when present | TorchServe token key file |
| ``DEEPMINER_TOKEN`` | (none) | an inference token (instead of the key file) |
| ``DEEPMINER_MANAGEMENT_URL`` | inference port + 1 | where a refused key is renewed (lab profile) |
| ``DEEPMINER_BACKEND`` | ``serve`` | ``serve`` (HTTP to TorchServe) or ``local`` (in-process, no server) |
| ``DEEPMINER_MODEL_DIR`` | ``model_store/demo`` | ``model.pt`` (for ``local``) and ``atlas/`` |
| ``DEEPMINER_DATA_ROOT`` | (the atlas's own) | dataset folder the atlas patches come from |
| ``DEEPMINER_SAMPLES`` | ``var/samples`` | dataset folder of sample images (phantoms made on first use) |
| ``DEEPMINER_LABELS_URL`` | ``sqlite:///var/labels.db`` | label store (any SQLAlchemy URL) |
| ``DEEPMINER_TIMEOUT`` | ``60`` | seconds per explain request |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deepminer.labels import default_url

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("serve", "local")


def _path(value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else ROOT / p


@dataclass(frozen=True)
class Settings:
    serve_url: str = "http://127.0.0.1:8080"
    model: str = "demo"
    key_file: Path | None = None
    token: str | None = None
    management_url: str | None = None
    backend: str = "serve"
    model_dir: Path = ROOT / "model_store" / "demo"
    data_root: Path | None = None
    samples: Path = ROOT / "var" / "samples"
    labels_url: str = "sqlite:///var/labels.db"
    timeout: float = 60.0
    #: the longest side sent to the model (None: as uploaded); keeps a 4k x 3k DICOM interactive
    max_side: int | None = 1024

    @property
    def model_path(self) -> Path:
        return self.model_dir / "model.pt"

    @property
    def atlas_path(self) -> Path:
        return self.model_dir / "atlas"


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Settings from ``env`` (default: ``os.environ``); relative paths are taken from the repo root."""
    env = dict(os.environ if env is None else env)
    backend = env.get("DEEPMINER_BACKEND", "serve").strip().lower() or "serve"
    if backend not in BACKENDS:
        backend = "serve"
    key = env.get("DEEPMINER_KEY_FILE")
    key_file = _path(key) if key else None
    if key_file is None and (ROOT / "var" / "serve" / "key_file.json").is_file():
        key_file = ROOT / "var" / "serve" / "key_file.json"
    labels_url = env.get("DEEPMINER_LABELS_URL") or default_url()
    if labels_url.startswith("sqlite:///") and not labels_url.startswith("sqlite:////"):
        # a relative SQLite path is relative to the repo root, wherever Streamlit was started
        rel = labels_url.removeprefix("sqlite:///")
        if rel and rel != ":memory:":
            labels_url = f"sqlite:///{_path(rel)}"
    try:
        timeout = float(env.get("DEEPMINER_TIMEOUT", "60"))
    except ValueError:
        timeout = 60.0
    max_side = env.get("DEEPMINER_MAX_SIDE", "1024").strip()
    return Settings(
        serve_url=env.get("DEEPMINER_SERVE_URL", "http://127.0.0.1:8080").rstrip("/"),
        model=env.get("DEEPMINER_MODEL", "demo"),
        key_file=key_file,
        token=env.get("DEEPMINER_TOKEN") or None,
        management_url=env.get("DEEPMINER_MANAGEMENT_URL") or None,
        backend=backend,
        model_dir=_path(env.get("DEEPMINER_MODEL_DIR", "model_store/demo")),
        data_root=_path(env["DEEPMINER_DATA_ROOT"]) if env.get("DEEPMINER_DATA_ROOT") else None,
        samples=_path(env.get("DEEPMINER_SAMPLES", "var/samples")),
        labels_url=labels_url,
        timeout=timeout,
        max_side=int(max_side) if max_side.isdigit() and int(max_side) > 0 else None,
    )
