"""CAM (Zhou et al. 2016) as a saliency method: FC weights x unit maps, no gradients, no hooks
beyond the base's. The same computation :func:`~deepminer.explain.engine.explain_image` does."""
from __future__ import annotations

import torch

from deepminer.explain.engine import cam_from_features
from deepminer.explain.method_base import SaliencyMethod


class CAM(SaliencyMethod):
    """Class activation map of ``target`` on the unit-map grid."""

    name = "cam"

    def __call__(self, x: torch.Tensor, target: int | None) -> torch.Tensor:
        with torch.inference_mode():
            feats = self.model.forward_features(x)
            if target is None:
                target = int(self.model.pool(self.model.class_logits(feats))[0].argmax())
            return cam_from_features(self.model, feats)[0, target].float()
