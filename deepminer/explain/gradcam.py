"""Grad-CAM and Grad-CAM++ through pytorch-grad-cam, on the unit layer (``model.features``).

The FCN returns image logits ``(B, C)``, so it is a classifier to pytorch-grad-cam. Its maps are
taken on the unit-map grid (pytorch-grad-cam would resize them to the input; here the target size
is the activation's own, so its resize is the identity).
"""
from __future__ import annotations

import torch

from deepminer.explain.method_base import SaliencyMethod


def _on_grid(cam_class: type) -> type:
    class OnGrid(cam_class):
        def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
            a = self.activations_and_grads.activations[0]
            return int(a.shape[-1]), int(a.shape[-2])

    OnGrid.__name__ = cam_class.__name__
    return OnGrid


class GradCAM(SaliencyMethod):
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k mean(grad_k) * f_k)."""

    name = "gradcam"
    _method = "GradCAM"

    def __call__(self, x: torch.Tensor, target: int | None) -> torch.Tensor:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = _on_grid(getattr(pytorch_grad_cam, self._method))
        with cls(model=self.model, target_layers=[self.model.features]) as cam:  # removes its hooks
            out = cam(input_tensor=x, targets=None if target is None else [ClassifierOutputTarget(int(target))])
        return torch.from_numpy(out[0])


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018)."""

    name = "gradcam++"
    _method = "GradCAMPlusPlus"
