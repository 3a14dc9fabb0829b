"""The explanation engine and its peers. One forward pass explains an image (:func:`explain_image`
in :mod:`.engine`, returning :class:`~deepminer.explanation.Explanation`); units as masks
(:mod:`.units`) and the sketch query (:mod:`.sketch`); DeepMiner and Lu & Perer explanations
(:mod:`.reports`); peer saliency (:func:`saliency`: Grad-CAM & co. on :mod:`.method_base`); a cache
of whole explanations (:class:`ExplanationCache`); the request path shared by the server and the
in-process client (:class:`ExplainService` in :mod:`.service`). See ``docs/explain.md``."""
from deepminer.explain.cache import ExplanationCache
from deepminer.explain.engine import cam_from_features, explain_image, image_probabilities
from deepminer.explain.method_base import prepare_image
from deepminer.explain.peers import METHODS, saliency
from deepminer.explain.reports import deepminer_explanation, label_report
from deepminer.explain.sketch import IOU_SIDE, MATCH_IOU, matching_units, sketch_iou
from deepminer.defaults import QUANTILE, QUANTILE_DISSECTION
from deepminer.explain.units import mask_iou, quantile_thresholds, unit_masks, unit_thresholds, upsample_maps
from deepminer.explanation import Explanation, UnitMaps, normalize_map, rank_by_influence

__all__ = [
    "Explanation", "ExplanationCache", "IOU_SIDE", "MATCH_IOU", "METHODS", "QUANTILE",
    "QUANTILE_DISSECTION", "UnitMaps", "cam_from_features", "deepminer_explanation", "explain_image",
    "image_probabilities", "label_report", "mask_iou", "matching_units", "normalize_map",
    "prepare_image", "quantile_thresholds", "rank_by_influence", "saliency", "sketch_iou", "unit_masks",
    "unit_thresholds", "upsample_maps",
]
