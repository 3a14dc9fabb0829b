"""The unit atlas: dissection of every unit of a model over a reference set (thresholds, top-k
galleries, embedding + PCA, DeepMiner influence ranking, Network Dissection labels)."""
from deepminer.atlas.atlas import Atlas, TopPatch
from deepminer.atlas.dissect import ProfileResult, ProfileState, dissect, profile_batch

__all__ = ["Atlas", "ProfileResult", "ProfileState", "TopPatch", "dissect", "profile_batch"]
