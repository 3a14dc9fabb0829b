"""The fully convolutional form every part of DeepMiner Studio runs on.

``FCN = features -> head``. ``features`` maps a normalised 3-channel batch to the last convolutional
layer's unit maps ``(B, K, h, w)``; the head turns them into class maps ``(B, C, h, w)`` (logits per
position) and pools those to image-level logits ``(B, C)``. The input of :meth:`FCN.forward` is a
grey-level batch ``(B, 1, H, W)`` in ``[0, 1]`` (what the loaders return); the FCN itself repeats it
to three channels and applies the backbone's normalisation, so no caller has to.

:func:`to_fcn` turns a classifier with a global-average-pool + linear head (torchvision ResNet, timm
model, ``nn.Sequential``) into this form; the WILDCAT head lives in :mod:`deepminer.models.wildcat`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepminer.defaults import PATCH_PX

if TYPE_CHECKING:
    from deepminer.models.wildcat import WildcatHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def patch_px(model: nn.Module, override: int | None = None) -> int:
    """The side (model-input px) of the patches ``model`` was trained on: ``override`` when given,
    else the checkpoint's ``meta`` (``patch_size``, ``input_size`` or ``size``), else :data:`PATCH_PX`."""
    if override:
        return int(override)
    meta = getattr(model, "meta", None) or {}
    for key in ("patch_size", "input_size", "size"):
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return PATCH_PX


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

    def pool(self, maps: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over positions; with ``cells`` (bool ``(B, h, w)``, see :func:`breast_cells`) the
        mean over those cells only (a whole-image model pools over the breast)."""
        if cells is None:
            return maps.mean(dim=(2, 3))
        w = cells.to(maps.dtype)[:, None]
        return (maps * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1.0)

    @property
    def unit_weights(self) -> torch.Tensor:
        """``(C, K)``: the weight of unit k for class c (DeepMiner's FC weight)."""
        return self.fc.weight[:, :, 0, 0]

    @property
    def head_kwargs(self) -> dict:
        """Keyword arguments (beyond units and classes) that rebuild this head: none."""
        return {}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "GAPHead":
        head = cls(linear.in_features, linear.out_features)
        bias = head.fc.bias
        assert bias is not None  # built with bias=True
        with torch.no_grad():
            head.fc.weight.copy_(linear.weight[:, :, None, None])
            if linear.bias is not None:
                bias.copy_(linear.bias)
            else:
                bias.zero_()
        return head


BREAST_CELL_SHARE = 0.5  #: a cell is breast when at least this share of its input pixels is tissue


def breast_cells(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bool ``(B, h, w)``: the cells of an ``h x w`` map whose input pixels are at least
    :data:`BREAST_CELL_SHARE` tissue, for a tissue-masked grey batch ``x`` ``(B, 1, H, W)`` (outside
    the breast = exactly 0, as :func:`deepminer.data.tissue.tissue_region` leaves it). An image with no
    such cell gets every cell (nothing to pool over otherwise). The cells tile the input as the maps
    do (adaptive average pooling)."""
    share = torch.nn.functional.adaptive_avg_pool2d((x[:, :1] > 0).float(), hw)[:, 0]
    cells = share >= BREAST_CELL_SHARE
    empty = ~cells.flatten(1).any(1)
    if bool(empty.any()):
        cells[empty] = True
    return cells


class FCN(nn.Module):
    """A fully convolutional classifier: ``features`` (last conv layer = the units) + a head.

    Attributes: ``arch`` (backbone name), ``head_type`` (``gap``/``wildcat``), ``classes``,
    ``layer`` (name of the unit layer in the source network), ``num_units``, ``meta`` (a dict of
    plain values: what a checkpoint recorded about the model; empty for a fresh one).
    """

    head: GAPHead | WildcatHead
    mean: torch.Tensor  # normalisation buffers
    std: torch.Tensor

    def __init__(self, features: nn.Module, head: GAPHead | WildcatHead, *, arch: str, classes: Sequence[str],
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
        self.meta: dict = {}  # provenance from a checkpoint (training settings, source file, epoch)
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

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Class logit maps ``(B, C, h, w)`` from unit maps."""
        return self.head.maps(feats)

    def pool(self, maps: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Image-level logits ``(B, C)`` from class logit maps (the head's own pooling; over the
        ``cells`` only when given, bool ``(B, h, w)``)."""
        return self.head.pool(maps, cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.class_logits(self.forward_features(x)))

    @property
    def unit_weights(self) -> torch.Tensor:
        """``(C, K)`` weight of each unit for each class (influence = max activation x weight)."""
        return self.head.unit_weights

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class TimmFeatures(nn.Module):
    """The feature extractor of a timm model (its classifier removed): ``net.forward_features``."""

    def __init__(self, net: Any):  # a timm model (it has forward_features)
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def _is_gap(module: nn.Module | None) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def _last_param_child(module: nn.Module, skip: Sequence[str] = ()) -> str:
    """Name of the last top-level child of ``module`` that holds parameters (the unit layer)."""
    names = [n for n, c in module.named_children()
             if n not in skip and any(True for _ in c.parameters())]
    if not names:
        raise ValueError("to_fcn: the feature extractor has no layer with parameters")
    return names[-1]


def _split_classifier(net: Any) -> tuple[nn.Module, nn.Linear, str, tuple | None]:
    """Split ``net`` into (features, linear, default unit layer, timm mean/std or None).

    Mutates ``net`` for timm models (their classifier is reset to identity).
    """
    from collections import OrderedDict

    if hasattr(net, "forward_features") and hasattr(net, "get_classifier") and hasattr(net, "reset_classifier"):
        linear = net.get_classifier()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"to_fcn: the timm classifier is {type(linear).__name__}, not nn.Linear")
        pool = getattr(net, "global_pool", None)
        pool_type = getattr(pool, "pool_type", "avg")
        if pool_type != "avg":
            raise ValueError(f"to_fcn: the timm global pool is {pool_type!r}, not average pooling")
        net.reset_classifier(0)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        norm = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else None
        layer = _last_param_child(net, skip=("global_pool", "classifier", "head", "fc"))
        return TimmFeatures(net), linear, layer, norm
    children = list(net.named_children())
    names = [n for n, _ in children]
    if isinstance(getattr(net, "fc", None), nn.Linear) and _is_gap(getattr(net, "avgpool", None)) \
            and names[-2:] == ["avgpool", "fc"]:  # torchvision ResNet family
        feats = nn.Sequential(OrderedDict(children[:-2]))
        return feats, net.fc, _last_param_child(feats), None
    if isinstance(net, nn.Sequential):
        tail = [(n, c) for n, c in children if not isinstance(c, nn.Dropout)]
        if len(tail) >= 4 and isinstance(tail[-1][1], nn.Linear) and isinstance(tail[-2][1], nn.Flatten) \
                and _is_gap(tail[-3][1]):
            cut = names.index(tail[-3][0])
            feats = nn.Sequential(OrderedDict(children[:cut]))
            last = tail[-1][1]
            assert isinstance(last, nn.Linear)
            return feats, last, _last_param_child(feats), None
    raise ValueError(f"to_fcn: {type(net).__name__} is not a classifier with a global-average-pool + "
                     "linear head (torchvision ResNet, timm model, or Sequential ending in "
                     "AdaptiveAvgPool2d(1), Flatten, Linear)")


def to_fcn(classifier: nn.Module, *, arch: str, classes: Sequence[str], layer: str | None = None,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           copy: bool = True, verify: bool = True) -> FCN:
    """Turn a classifier with a global-average-pool + linear head into an :class:`FCN`.

    The linear layer becomes a 1x1 convolution (:meth:`GAPHead.from_linear`) over the last feature
    map, so a whole image gives class maps and, at the training patch size, the pooled output
    equals the classifier's logits. Works for torchvision ResNets (``avgpool`` + ``fc``), timm
    models (``forward_features`` + ``get_classifier()`` + average global pool) and an
    ``nn.Sequential`` ending in ``AdaptiveAvgPool2d(1), Flatten, [Dropout], Linear``.

    ``layer`` names the unit layer (default: the last parameterised top-level module before the
    pool, e.g. ``layer4`` for a ResNet, ``bn2`` for an EfficientNet). ``mean``/``std``: the
    normalisation the classifier expects (default: timm's ``pretrained_cfg``, else ImageNet's).
    ``copy`` leaves ``classifier`` untouched (it is deep-copied first). ``verify`` checks, on a
    small random input in eval mode, that the FCN's pooled logits equal the classifier's.
    """
    import copy as _copy

    if len(tuple(classes)) == 0:
        raise ValueError("to_fcn: classes is empty")
    net = _copy.deepcopy(classifier) if copy else classifier
    reference = None
    if verify:
        device = next(net.parameters()).device
        probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            reference = net(probe)
        net.train(was_training)
    features, linear, default_layer, norm = _split_classifier(net)
    if linear.out_features != len(tuple(classes)):
        raise ValueError(f"to_fcn: the classifier has {linear.out_features} outputs but "
                         f"{len(tuple(classes))} classes were given")
    if layer is not None and layer not in dict(classifier.named_modules()):
        raise ValueError(f"to_fcn: layer {layer!r} is not a module of the classifier")
    head = GAPHead.from_linear(linear).to(linear.weight.device)
    if mean is None or std is None:
        mean, std = norm if norm is not None else (IMAGENET_MEAN, IMAGENET_STD)
    fcn = FCN(features, head, arch=arch, classes=classes, layer=layer or default_layer,
              num_units=linear.in_features, head_type="gap", mean=mean, std=std)
    fcn.to(linear.weight.device)  # the normalisation buffers follow the classifier's device
    fcn.train(net.training)
    if reference is not None:
        was_training = fcn.training
        fcn.eval()
        with torch.no_grad():
            got = fcn.pool(fcn.class_logits(fcn.features(probe)))
        fcn.train(was_training)
        err = (got - reference).abs().max().item()
        if err > 1e-4 * max(1.0, reference.abs().max().item()):
            raise ValueError(f"to_fcn: the FCN's pooled logits differ from the classifier's by {err:.3g}; "
                             "its head is not global-average-pool + linear")
    return fcn
