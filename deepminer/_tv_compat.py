"""Make ``import torchvision`` work against the CPU-only torch build of this environment.

torchvision 0.28.0 ships only a CUDA build of its compiled ops (``torchvision._C``). Against the CPU
build of torch 2.13.0 the shared library does not load, and ``torchvision/_meta_registrations.py``
then fails at import with ``operator torchvision::nms does not exist`` because it registers fake
kernels for ``torchvision::nms`` / ``torchvision::qnms`` whose schemas were never defined.

:func:`ensure_torchvision` defines those two schemas (declarations only: ``torchvision.ops`` still
refuses to run them) *only* when torchvision's compiled ops cannot be loaded. Models and transforms
then work; ``nms``, ``roi_pool``, ``deform_conv`` and ``torchvision.io`` stay unavailable.
Call it before the first ``import torchvision`` (``deepminer/__init__.py`` does).
"""
from __future__ import annotations

import importlib.util
import os
import sys

_LIB = None  # keeps the torch.library.Library alive for the life of the process


def _compiled_ops_load() -> bool:
    """True when torchvision's own ``_C`` extension loads against this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to patch
    pkg_dir = list(spec.submodule_search_locations)[0]
    for name in os.listdir(pkg_dir):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(pkg_dir, name))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def ensure_torchvision() -> None:
    """Define the missing ``torchvision::nms``/``qnms`` schemas when the compiled ops cannot load."""
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return
    if _compiled_ops_load():
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
