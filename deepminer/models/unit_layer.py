"""How the unit layer is computed: its activation and its output stride (``meta["unit_layer"]``).

Two choices change where a class activation map peaks without changing a single weight:

* **activation**: EfficientNet-Lite ends in ``bn2`` + ReLU6, so a unit that fires hard is clipped at
  6. The units that carry a class's evidence are the ones that fire hardest; clipped, every cell whose
  receptive field holds the lesion reads the same 6, the CAM becomes a flat plateau about three cells
  wide around the lesion and its peak falls anywhere on it (measured on the bundled ``demo``: 16 to 19
  of the 20 largest contributions at the CAM's peak were clipped). ``relu`` lifts the cap at the unit
  layer only (the blocks keep ReLU6). The ResNets and ``tiny`` end in a plain ReLU already.
* **output stride**: the unit map's cell is ``output_stride`` input px. ``16`` removes the last
  stride-2 step and dilates every later spatial convolution by 2 (the atrous conversion of DeepLab,
  Chen et al. 2017): the same weights see the same context, on a map twice as fine in each direction,
  for about 4x the cost of the last stage. DeepLab trains at one stride and serves at a finer one
  (train 16, evaluate 8); a whole-image model can be trained at 32 from cached trunk outputs and served
  at 16 (``deepminer train-whole --serve-output-stride 16``).

:func:`apply_unit_layer` changes a built model in place and records the choice in
``model.meta["unit_layer"]``; :func:`deepminer.models.load_model` re-applies a checkpoint's record, so a
saved model is served the way it was saved. No weights are added or renamed: the state dict is the
same at every stride and with either activation.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from deepminer.errors import InputError

ACTIVATIONS = ("relu6", "relu")
#: per arch: the native (activation, output stride), the module path of the stage that makes the last
#: stride-2 step (in ``model.features``), and the unit layer's activation attribute when it has a cap.
_ARCH: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {"native": ("relu6", 32), "last_stage": "net.blocks.5", "act": "net.bn2"},
    "resnet18": {"native": ("relu", 32), "last_stage": "layer4", "act": None},
    "resnet50": {"native": ("relu", 32), "last_stage": "layer4", "act": None},
    "resnet152": {"native": ("relu", 32), "last_stage": "layer4", "act": None},
    "tiny": {"native": ("relu", 16), "last_stage": "block4", "act": None},
}


def native(arch: str) -> dict[str, Any]:
    """``{"activation", "output_stride"}`` of ``arch`` as built."""
    act, stride = _ARCH[arch]["native"]
    return {"activation": act, "output_stride": stride}


def unit_layer(model: Any) -> dict[str, Any]:
    """The unit layer's ``{"activation", "output_stride"}`` (the checkpoint's record, else native)."""
    arch = getattr(model, "arch", None)
    out = native(arch) if arch in _ARCH else {}
    rec = (getattr(model, "meta", None) or {}).get("unit_layer")
    if isinstance(rec, Mapping):
        out.update({k: rec[k] for k in ("activation", "output_stride") if k in rec})
    return out


def check(arch: str | None, activation: str | None = None, output_stride: int | None = None) -> None:
    """One-line :class:`InputError` for an option ``arch`` cannot take."""
    if arch is None or arch not in _ARCH:
        raise InputError(f"unit layer options: unknown arch {arch!r}")
    nat_act, nat_stride = _ARCH[arch]["native"]
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise InputError(f"--unit-activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if activation != nat_act and _ARCH[arch]["act"] is None:
            raise InputError(f"--unit-activation {activation}: {arch}'s unit layer ends in a plain ReLU "
                             "(no cap to change)")
    if output_stride is not None and output_stride not in (nat_stride, nat_stride // 2):
        raise InputError(f"output stride: {arch} takes {nat_stride} (as built) or {nat_stride // 2}, "
                         f"not {output_stride}")


def _set_activation(model: Any, arch: str, activation: str) -> None:
    path = _ARCH[arch]["act"]
    if path is None:
        return
    bn = model.features.get_submodule(path)
    bn.act = nn.ReLU6(inplace=True) if activation == "relu6" else nn.ReLU(inplace=True)


def _same_padding(conv: nn.Conv2d) -> bool:
    """timm's Conv2dSame pads at run time from stride and dilation; a plain Conv2d has fixed padding."""
    return type(conv).__name__ == "Conv2dSame"


def _set_stride(model: Any, arch: str, stride: int) -> None:
    """Undo the last stride-2 step (``stride`` = native / 2) or restore it (``stride`` = native)."""
    nat = _ARCH[arch]["native"][1]
    finer = stride != nat
    stage = _ARCH[arch]["last_stage"]
    names = [n for n, m in model.features.named_modules() if isinstance(m, nn.Conv2d)]
    convs = dict(model.features.named_modules())
    in_stage = [n for n in names if n == stage or n.startswith(stage + ".")]
    # the strided convolutions of the step: those of the stage's first block whose native stride is 2
    first = in_stage[0].split(".")[: len(stage.split(".")) + 1]
    block = ".".join(first)
    strided = [n for n in in_stage if (n == block or n.startswith(block + ".")) and
               getattr(convs[n], "_native_stride", convs[n].stride) == (2, 2)]
    if not strided:
        raise InputError(f"output stride: no stride-2 convolution found in {arch}'s {block}")
    after = names[names.index(strided[0]) + 1:]
    for n in strided:
        conv = convs[n]
        conv._native_stride = (2, 2)
        conv.stride = (1, 1) if finer else (2, 2)
    for n in after:
        conv = convs[n]
        if n in strided or conv.kernel_size == (1, 1):
            continue
        d = 2 if finer else 1
        conv.dilation = (d, d)
        if not _same_padding(conv):
            conv.padding = tuple(d * (k - 1) // 2 for k in conv.kernel_size)


def apply_unit_layer(model: Any, *, activation: str | None = None,
                     output_stride: int | None = None) -> Any:
    """Set the unit layer's activation and/or output stride of a built FCN in place (None: keep) and
    record them in ``model.meta["unit_layer"]`` (only what differs from the arch as built)."""
    arch = getattr(model, "arch", None)
    check(arch, activation, output_stride)
    assert arch is not None  # check() refuses an unknown arch
    now = unit_layer(model)
    if activation is not None and activation != now.get("activation"):
        _set_activation(model, arch, activation)
        now["activation"] = activation
    if output_stride is not None and output_stride != now.get("output_stride"):
        _set_stride(model, arch, output_stride)
        now["output_stride"] = output_stride
    meta = dict(getattr(model, "meta", None) or {})
    record = {k: v for k, v in now.items() if v != native(arch)[k]}
    if record:
        meta["unit_layer"] = record
    else:
        meta.pop("unit_layer", None)
    model.meta = meta
    return model


def describe(model: Any) -> str:
    """``"bn2 + relu, output stride 16"``: for cards and answers."""
    u = unit_layer(model)
    if not u:
        return ""
    return f"{getattr(model, 'layer', 'unit layer')} + {u['activation']}, output stride {u['output_stride']}"
