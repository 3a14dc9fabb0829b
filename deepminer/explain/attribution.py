"""Pixel attributions through captum: Guided Backprop, Integrated Gradients, SmoothGrad.

Each gives an attribution per input pixel; :meth:`SaliencyMethod.to_grid` brings it to the CAM's
grid (absolute value, averaged over each cell's pixels), so every method has CAM's shape.
captum sets and removes its own hooks (Guided Backprop's ReLU hooks, in a ``finally``); the base
removes ours. Guided Backprop changes the backward pass of ``nn.ReLU`` modules only: in a network
built on other activations (EfficientNet-Lite's ReLU6) it is the plain gradient there.
"""
from __future__ import annotations

import warnings

import torch

from deepminer.explain.method_base import SaliencyMethod
from deepminer.models.fcn import FCN


def _input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


class GuidedBackprop(SaliencyMethod):
    """Guided Backpropagation (Springenberg et al. 2015)."""

    name = "guided_backprop"

    def __call__(self, x: torch.Tensor, target: int | None) -> torch.Tensor:
        from captum.attr import GuidedBackprop as _GBP

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = _GBP(self.model).attribute(_input(x), target=self.target(x, target))
        return self.to_grid(a)


class IntegratedGradients(SaliencyMethod):
    """Integrated Gradients (Sundararajan et al. 2017) from a black image, ``steps`` steps."""

    name = "integrated_gradients"

    def __init__(self, model: FCN, steps: int = 32, batch: int = 4):
        super().__init__(model)
        self.steps, self.batch = int(steps), int(batch)

    def __call__(self, x: torch.Tensor, target: int | None) -> torch.Tensor:
        from captum.attr import IntegratedGradients as _IG

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = _IG(self.model).attribute(_input(x), baselines=torch.zeros_like(x),
                                          target=self.target(x, target), n_steps=self.steps,
                                          internal_batch_size=self.batch)
        return self.to_grid(a)


class SmoothGrad(SaliencyMethod):
    """SmoothGrad (Smilkov et al. 2017): gradients averaged over ``samples`` noisy copies
    (Gaussian noise, ``noise`` x the image's value range), captum's ``NoiseTunnel``."""

    name = "smoothgrad"

    def __init__(self, model: FCN, samples: int = 16, noise: float = 0.15, batch: int = 4,
                 seed: int = 0):
        super().__init__(model)
        self.samples, self.noise, self.batch, self.seed = int(samples), float(noise), int(batch), int(seed)

    def __call__(self, x: torch.Tensor, target: int | None) -> torch.Tensor:
        from captum.attr import NoiseTunnel, Saliency

        sigma = self.noise * float(x.max() - x.min()) or self.noise
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(self.seed)
            a = NoiseTunnel(Saliency(self.model)).attribute(
                _input(x), nt_type="smoothgrad", nt_samples=self.samples, nt_samples_batch_size=self.batch,
                stdevs=sigma, target=self.target(x, target))
        return self.to_grid(a)
