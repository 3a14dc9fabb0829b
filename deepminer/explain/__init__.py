"""The explanation engine: one forward pass explains an image (:func:`explain_image`), units as
masks (:mod:`.units`), DeepMiner and Lu & Perer explanations (:mod:`.reports`), peer saliency
(:func:`saliency`), and a feature cache (:class:`FeatureCache`). See ``docs/explain.md``."""
from deepminer.explain.base import normalize_map, prepare_image
from deepminer.explain.cache import FeatureCache
from deepminer.explain.core import (PATCH_PX, Explanation, cam_from_features, explain_image,
                                    image_probabilities, rank_units)
from deepminer.explain.peers import METHODS, saliency
from deepminer.explain.reports import deepminer_explanation, label_report
from deepminer.explain.units import (IOU_SIDE, MATCH_IOU, QUANTILE, QUANTILE_DISSECTION, mask_iou,
                                     matching_units, quantile_thresholds, sketch_iou, unit_masks,
                                     unit_thresholds, upsample_maps)

__all__ = [
    "Explanation", "FeatureCache", "IOU_SIDE", "MATCH_IOU", "METHODS", "PATCH_PX", "QUANTILE",
    "QUANTILE_DISSECTION", "cam_from_features", "deepminer_explanation", "explain_image",
    "image_probabilities", "label_report", "mask_iou", "matching_units", "normalize_map",
    "prepare_image", "quantile_thresholds", "rank_units", "saliency", "sketch_iou", "unit_masks",
    "unit_thresholds", "upsample_maps",
]
