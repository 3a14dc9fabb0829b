"""The numbers taken from the papers (and the few budgets around them), in one torch-free place:
the engine, the atlas and the CLI's ``--help`` read them from here.

References: DeepMiner (Wu et al. 2018), Lu & Perer's interactive system, Network Dissection
(Bau et al. 2017); see docs/explain.md and docs/atlas.md for where each is used.
"""
from __future__ import annotations

#: the backbones of the model registry (deepminer.models.backbones.ARCHS has exactly these keys)
ARCH_NAMES = ("tiny", "resnet18", "resnet50", "resnet152", "efficientnet_lite0")

PATCH_PX = 224             #: side (model-input px) of the patches a model is trained on (DeepMiner)
QUANTILE = 0.99            #: a unit's mask threshold: this activation quantile (Lu & Perer)
QUANTILE_DISSECTION = 0.995  #: the same in Network Dissection
MATCH_IOU = 0.2            #: a unit matches a sketch above this IoU (Lu & Perer)
INFLUENCE_TOP = 8          #: DeepMiner: the top 8 units of each image/patch by influence
TOP_UNITS = 20             #: DeepMiner: the 20 most frequently influential units per class
MIN_LABEL_IOU = 0.04       #: Network Dissection: a unit detects its best concept above this IoU
TOPK = 16                  #: top-activating reference patches kept per unit in an atlas
IOU_SIZE = 64              #: concept grid (cells per patch side) of the dissection IoU
MEMORY_MB = 1024           #: memory budget (MiB) of dissection's streaming statistics
PROBE = "head"             #: ``--train-from head``: freeze the whole backbone, train only the head (a linear probe)
