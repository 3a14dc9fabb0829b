"""Models: backbones, the FCN form every explanation runs on, the WILDCAT head, checkpoints."""
from deepminer.models.fcn import FCN, GAPHead

__all__ = ["FCN", "GAPHead"]
