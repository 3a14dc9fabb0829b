"""The settings of a ``deepminer evaluate-explanations`` run and what it loads once: :class:`EvalConfig`,
:class:`Context` and :func:`prepare` (every input checked and loaded before anything is written;
bad input is a one-line :class:`~deepminer.errors.InputError`). :mod:`.runner` runs the images,
:mod:`.report` writes what they gave."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepminer.errors import InputError
from deepminer.evaluation.catalog import METRICS
from deepminer.model_folder import ModelFolder, is_atlas


@dataclass
class EvalConfig:
    """The settings of one evaluation run (all of them go into ``report.json``)."""

    model: str
    data: str
    out: str
    split: str = "test"
    methods: list[str] | None = None
    metrics: list[str] | None = None
    limit: int | None = None
    seed: int = 0
    max_side: int | None = None  #: at most this long side; None: the model's own scale (deepminer.model_scale)
    atlas: str | None = None
    labels_url: str | None = None
    model_name: str | None = None
    sanity_images: int = 5
    tolerance_px: float = 15.0
    bootstrap: int = 1000
    resume: bool = True


@dataclass
class Context:
    """What the loop needs, loaded once."""

    cfg: EvalConfig
    model: Any
    rows: list[dict]
    methods: list[str]
    metrics: list[str]
    reference: str
    thresholds: np.ndarray | None
    labels: dict[int, str]
    label_source: str
    atlas: Any
    identity: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# -- checks -------------------------------------------------------------------------------------------

def resolve_metrics(names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise InputError(f"--metrics: unknown {', '.join(unknown)}; known: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def split_rows(data: Path, split: str, limit: int | None) -> list[dict]:
    """:func:`deepminer.image_eval.image_rows` (the rows of ``split``, the first ``limit``), and a
    one-line error for a data set without any lesion mask there."""
    from deepminer.image_eval import image_rows

    rows = image_rows(data, split, limit)  # (read_manifest's one-line errors for a missing folder or manifest)
    if not any(r.get("lesion_mask") for r in rows if r.get("label") != "normal"):
        raise InputError(f"{data}: no lesion mask in split {split!r} (localization needs lesion_mask in manifest.csv)")
    return rows


def _check_classes(model: Any, rows: list[dict], data: Path) -> None:
    labels = sorted({str(r.get("label")) for r in rows})
    missing = [lab for lab in labels if lab not in model.classes]
    if missing:
        raise InputError(f"{data}: labels {', '.join(missing)} are not classes of the model "
                         f"({'/'.join(model.classes)})")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- loading ------------------------------------------------------------------------------------------

def prepare(cfg: EvalConfig) -> Context:
    """Check every input and load the model, atlas and labels (nothing is written yet)."""
    from deepminer.evaluation.methods import reference_method, resolve_methods
    from deepminer.models import load_model, weights_sha256

    model_path, data = Path(cfg.model), Path(cfg.data)
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such model file")
    if not data.is_dir():
        raise InputError(f"{data}: no such dataset folder")
    metrics = resolve_metrics(cfg.metrics)
    rows = split_rows(data, cfg.split, cfg.limit)
    model = load_model(model_path).eval()
    methods = resolve_methods(model, cfg.methods)
    _check_classes(model, rows, data)
    atlas_dir = Path(cfg.atlas) if cfg.atlas else ModelFolder.of(model_path).atlas
    atlas = None
    if is_atlas(atlas_dir):
        from deepminer.atlas import Atlas

        atlas = Atlas.load(atlas_dir)
    elif cfg.atlas:
        raise InputError(f"{atlas_dir}: no atlas.json (--atlas)")
    digest = weights_sha256(model)
    name = cfg.model_name or (model_path.parent.name if model_path.stem == "model" else model_path.stem)
    labels, source = _unit_labels(cfg.labels_url, name, digest, atlas)
    identity = {
        "model": {"name": name, "path": str(model_path.resolve()), "weights_sha256": digest, "arch": model.arch,
                  "head": model.head_type, "classes": list(model.classes),
                  "trained_on": (model.meta or {}).get("trained_on", "not recorded in the checkpoint")},
        "data": {"folder": str(data.resolve()), "manifest_sha256": _file_sha256(data / "manifest.csv"),
                 "split": cfg.split, "images": len(rows)},
        "atlas": None if atlas is None else {"path": str(atlas_dir.resolve()),
                                             "weights_sha256": (atlas.meta.get("model") or {}).get("weights_sha256")},
    }
    return Context(cfg, model, rows, methods, metrics, reference_method(methods),
                   None if atlas is None else np.asarray(atlas.thresholds, dtype=np.float64), labels, source,
                   atlas, identity)


def _unit_labels(url: str | None, name: str, digest: str, atlas: Any) -> tuple[dict[int, str], str]:
    """Unit labels from the label store for these weights, else the atlas's suggested labels."""
    if url:
        from deepminer.labels import LabelStore

        labels = LabelStore(url).labels_for(name, digest)
        if labels:
            return labels, f"label store ({len(labels)} units labelled for {name} @ {digest[:12]})"
    if atlas is not None:
        out = {}
        for u in range(atlas.num_units):
            s = atlas.suggested_label(u)
            if s is not None:
                out[u] = s[0]
        return out, f"atlas suggestions ({len(out)} units with a concept at IoU >= 0.04)"
    return {}, "none (no label store entry and no atlas)"
