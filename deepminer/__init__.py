"""DeepMiner Studio: the library (models, data, explanations, unit atlas, labels, metrics).

Free of Streamlit and TorchServe by design. Importing it makes ``import torchvision`` safe on the
CPU-only torch of this environment (see :mod:`deepminer._tv_compat`).
"""
from deepminer._tv_compat import ensure_torchvision as _ensure_torchvision
from deepminer.errors import DeepMinerError

__version__ = "0.1.0"
CLASSES = ("normal", "benign", "malignant")

_ensure_torchvision()

__all__ = ["CLASSES", "DeepMinerError", "__version__"]
