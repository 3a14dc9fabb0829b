"""The fully convolutional form every part of DeepMiner Studio runs on.

``FCN = features -> head``. ``features`` maps a normalised 3-channel batch to the last convolutional
layer's unit maps ``(B, K, h, w)``; the head turns them into class maps ``(B, C, h, w)`` (logits per
position) and pools those to image-level logits ``(B, C)``. The input of :meth:`FCN.forward` is a
grey-level batch ``(B, 1, H, W)`` in ``[0, 1]`` (what the loaders return); the FCN itself repeats it
to three channels and applies the backbone's normalisation, so no caller has to.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GAPHead(nn.Module):
    """Global-average-pool + linear classifier written as a 1x1 convolution.

    ``maps(f) = conv1x1(f)`` gives the class maps; ``pool(m) = mean over positions``. Because both
    are linear, ``pool(maps(f)) == linear(GAP(f))``: at patch size the FCN's logits equal the
    original classifier's.
    """

    def __init__(self, in_units: int, num_classes: int):
        super().__init__()
        self.fc = nn.Conv2d(in_units, num_classes, kernel_size=1, bias=True)

    def maps(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))

    @property
    def unit_weights(self) -> torch.Tensor:
        """``(C, K)``: the weight of unit k for class c (DeepMiner's FC weight)."""
        return self.fc.weight[:, :, 0, 0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "GAPHead":
        head = cls(linear.in_features, linear.out_features)
        with torch.no_grad():
            head.fc.weight.copy_(linear.weight[:, :, None, None])
            if linear.bias is not None:
                head.fc.bias.copy_(linear.bias)
            else:
                head.fc.bias.zero_()
        return head


class FCN(nn.Module):
    """A fully convolutional classifier: ``features`` (last conv layer = the units) + a head.

    Attributes: ``arch`` (backbone name), ``head_type`` (``gap``/``wildcat``), ``classes``,
    ``layer`` (name of the unit layer in the source network), ``num_units``.
    """

    def __init__(self, features: nn.Module, head: nn.Module, *, arch: str, classes: Sequence[str],
                 layer: str, num_units: int, head_type: str = "gap",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.features = features
        self.head = head
        self.arch = arch
        self.head_type = head_type
        self.classes = tuple(classes)
        self.layer = layer
        self.num_units = int(num_units)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,1,H,W)`` grey in [0,1] (or an already 3-channel batch in [0,1]) -> normalised RGB."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unit maps ``(B, K, h, w)`` of the last convolutional layer."""
        return self.features(self.normalize(x))

    def class_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """Class logit maps ``(B, C, h, w)`` from unit maps."""
        return self.head.maps(feats)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Image-level logits ``(B, C)`` from class maps (the head's own pooling)."""
        return self.head.pool(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.class_maps(self.forward_features(x)))

    @property
    def unit_weights(self) -> torch.Tensor:
        """``(C, K)`` weight of each unit for each class (influence = max activation x weight)."""
        return self.head.unit_weights

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
