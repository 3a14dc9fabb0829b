"""DeepMiner Studio: the library (models, data, explanations, unit atlas, labels, metrics).

Free of Streamlit and TorchServe by design. Importing it makes ``import torchvision`` safe on the
CPU-only torch of this environment (see :mod:`deepminer._tv_compat`) without importing torch itself:
the fix runs just before the first ``import torchvision`` of the process (:class:`_TorchvisionFix`),
so ``import deepminer`` and the ``deepminer`` CLI start fast (``deepminer --help`` needs no torch).
"""
from __future__ import annotations

import sys

from deepminer.errors import DeepMinerError

__version__ = "0.1.0"
CLASSES = ("normal", "benign", "malignant")


class _TorchvisionFix:
    """A ``sys.meta_path`` entry that calls :func:`deepminer._tv_compat.ensure_torchvision` when
    ``torchvision`` is first imported, then removes itself. It finds nothing itself (``None``): the
    import then proceeds as usual. Only the top-level ``torchvision`` name triggers it."""

    @classmethod
    def find_spec(cls, name: str, path: object = None, target: object = None) -> None:
        if name == "torchvision":
            cls.uninstall()  # first: ensure_torchvision itself looks torchvision up
            from deepminer._tv_compat import ensure_torchvision

            ensure_torchvision()
        return None

    @classmethod
    def uninstall(cls) -> None:
        while cls in sys.meta_path:
            sys.meta_path.remove(cls)


if "torchvision" not in sys.modules and _TorchvisionFix not in sys.meta_path:
    sys.meta_path.insert(0, _TorchvisionFix)

__all__ = ["CLASSES", "DeepMinerError", "__version__"]
