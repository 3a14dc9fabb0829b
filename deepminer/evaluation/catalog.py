"""What an evaluation can compare and measure, in words: the method and metric names with one line
each (the command's ``--help`` lists them; no numpy or torch here, so ``--help`` stays fast)."""
from __future__ import annotations

from deepminer.defaults import INFLUENCE_TOP

ONE_PASS = ("cam", "class_map", "wildcat", "top_units")
PEERS = ("gradcam", "gradcam++", "guided_backprop", "integrated_gradients", "smoothgrad")
BASELINES = ("random", "tissue_prior")
ALL_METHODS = (*ONE_PASS, *PEERS, *BASELINES)

DESCRIPTIONS = {
    "cam": "class activation map (FC weights x unit maps), from the explanation pass",
    "class_map": "per-cell probability of the explained class, from the explanation pass",
    "wildcat": "the WILDCAT head's class map (models with that head; with a surround, each cell's local contrast)",
    "top_units": f"union of the masks of the explained class's {INFLUENCE_TOP} most influential units",
    "gradcam": "Grad-CAM (Selvaraju et al.; not meaningful on a WILDCAT head with a surround: its weights change sign)",
    "gradcam++": "Grad-CAM++ (Chattopadhay et al.)",
    "guided_backprop": "Guided Backpropagation (Springenberg et al.)",
    "integrated_gradients": "Integrated Gradients (Sundararajan et al.), 32 steps",
    "smoothgrad": "SmoothGrad (Smilkov et al.), 16 samples",
    "random": "baseline: uniform noise on the CAM grid (seeded per image)",
    "tissue_prior": "baseline: the blurred breast mask (knows where the breast is, nothing else)",
}


LOCALIZATION = ("auprc", "pointing", "iou", "dice", "relevance_mass")
FAITHFULNESS = ("deletion", "insertion")
METRICS: dict[str, str] = {
    "auprc": "per-image average precision of the normalised map against the lesion, breast pixels only (Arun et al.)",
    "pointing": "the map's peak lies in the lesion, 15 px tolerance at the original scale (Zhang et al.)",
    "iou": "IoU of the map binarised at Otsu's threshold with the lesion (CheXlocalize)",
    "dice": "Dice of the same binarised map with the lesion",
    "relevance_mass": "share of the map's positive mass inside the lesion (Arras et al.)",
    "deletion": "AUC of the class probability as the most relevant 10%..100% of the breast is blurred (lower = better; Petsiuk et al.)",
    "insertion": "AUC of the class probability as the most relevant breast area is restored into a blurred image (higher = better)",
    "sanity": "cascading randomization: Spearman of the map against the model-randomized map; passes below the bound (Adebayo et al.)",
    "gms": "Greedy Matching Score of the top-1 / top-8 labelled units' labels against the report line (DeepMiner)",
    "concepts": "per concept the best unit's dissection IoU; share of concepts with a unit at IoU >= 0.04 (Network Dissection)",
}
LOWER_IS_BETTER = {"deletion"}
