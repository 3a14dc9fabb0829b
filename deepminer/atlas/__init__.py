"""The unit atlas: dissection of every unit of a model over a reference set (thresholds, top-k
galleries, embedding + PCA, DeepMiner influence ranking, Network Dissection labels)."""
from deepminer.atlas.atlas import Atlas, TopPatch
from deepminer.atlas.dissect import dissect

__all__ = ["Atlas", "TopPatch", "dissect"]
