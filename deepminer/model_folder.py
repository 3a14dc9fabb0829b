"""The layout of a model folder (``model_store/<name>/``, docs/models.md), written once.

::

    <name>/
      model.pt          the checkpoint (deepminer.models.save_model)
      atlas/            the unit atlas (deepminer dissect): atlas.json, atlas.npz, references.csv,
                        and ablation.json (deepminer atlas-ablation) when measured
      domain.pt         the out-of-domain summary (deepminer domain-fit), optional
      MODEL_CARD.md     the model card of the training run, optional
      metrics.json      the metrics of the training run, optional

``deepminer archive`` ships the checkpoint, the atlas and every other entry of the folder in the
``.mar`` under the same names, so the handler reads the unpacked archive as a model folder too. An
atlas folder may also live elsewhere (``--atlas``): its own files are the ``ATLAS_*`` names below.
No torch here (the CLI's ``--help`` and the workbench import it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODEL = "model.pt"              #: the checkpoint
ATLAS = "atlas"                 #: the unit atlas folder
DOMAIN = "domain.pt"            #: the out-of-domain summary
CARD = "MODEL_CARD.md"          #: the model card (written by deepminer train)
METRICS = "metrics.json"        #: the training metrics (written by deepminer train)

ATLAS_JSON = "atlas.json"       #: an atlas's meta (format, model, units, classes)
ATLAS_NPZ = "atlas.npz"         #: an atlas's arrays
REFERENCES = "references.csv"   #: an atlas's reference patches, in atlas order
ABLATION = "ablation.json"      #: an atlas's measured ablation (deepminer atlas-ablation)
ATLAS_FILES = (ATLAS_JSON, ATLAS_NPZ, REFERENCES)  #: what every atlas folder holds


def is_atlas(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an atlas (its ``atlas.json``)."""
    return (Path(folder) / ATLAS_JSON).is_file()


@dataclass(frozen=True)
class ModelFolder:
    """One model's folder; each path of the layout (module docstring) by name."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of(cls, model_file: str | os.PathLike) -> ModelFolder:
        """The folder a checkpoint lies in (whatever the file is called)."""
        return cls(Path(model_file).parent)

    @property
    def name(self) -> str:
        """The model's name in the store (the folder's name)."""
        return self.root.name

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def atlas(self) -> Path:
        return self.root / ATLAS

    @property
    def domain(self) -> Path:
        return self.root / DOMAIN

    @property
    def card(self) -> Path:
        return self.root / CARD

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def atlas_json(self) -> Path:
        return self.atlas / ATLAS_JSON

    @property
    def ablation(self) -> Path:
        return self.atlas / ABLATION

    def atlas_or_none(self) -> Path | None:
        """The atlas folder when it holds an atlas, else None."""
        return self.atlas if is_atlas(self.atlas) else None


def store_models(store: str | os.PathLike) -> list[ModelFolder]:
    """The model folders of a model store (``<store>/<name>/model.pt``), by name."""
    return [ModelFolder(p.parent) for p in sorted(Path(store).glob(f"*/{MODEL}"))]
