"""Checkpoints: our own format, the DeepMiner release format, and one loader for both.

Every load goes through ``torch.load(..., weights_only=True)``: a checkpoint can hold tensors and
plain Python values only, never code. Errors are one line (:class:`~deepminer.errors.InputError`):
a missing or unreadable file, or a state dict that does not fit, in which case the message lists
(truncated) the missing/unexpected keys and says which architecture the file looks like.

Our format (``deepminer-fcn/1``), written by :func:`save_model`::

    {"format": "deepminer-fcn/1", "arch", "head", "head_kwargs", "classes", "layer",
     "num_units", "state_dict", "meta"}

The DeepMiner release format (``ddsm-visual-primitives``), read by :func:`import_deepminer`::

    torch.save({"epoch": int, "state_dict": DataParallel(resnet152).state_dict(),
                "optimizer": optimizer.state_dict()}, path)    # keys "module.conv1.weight", ...
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import torch

from deepminer import CLASSES
from deepminer.atomic import atomic_file
from deepminer.errors import InputError
from deepminer.models.backbones import ARCHS, build_model
from deepminer.models.fcn import FCN, to_fcn
from deepminer.models.unit_layer import apply_unit_layer

FORMAT = "deepminer-fcn/1"
_RESNET_DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
                  (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
_PRIMITIVES = (str, int, float, bool, type(None))


# -- reading ---------------------------------------------------------------------------------------

def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`InputError` on failure."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text or "weights_only" in text:
            reason = next((ln.strip() for ln in text.splitlines()
                           if "Unsupported" in ln or "global" in ln.lower()), _first_line(err))
            raise InputError(f"{p}: not loadable with weights_only=True (it holds Python objects, "
                             f"not only tensors: {reason[:160]})") from None
        raise InputError(f"{p}: not a PyTorch checkpoint ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - any parse failure of an arbitrary file
        raise InputError(f"{p}: not a PyTorch checkpoint ({_first_line(err)})") from None


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    v = state.get(key)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _guess_body(body: Mapping[str, Any]) -> tuple[str | None, str]:
    """(registry arch or None, description) of a backbone state dict."""
    if "conv1.weight" in body and "layer1.0.conv1.weight" in body:
        blocks = tuple(len({k.split(".")[1] for k in body if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        b1, b2, b3, b4 = blocks
        depth = _RESNET_DEPTHS.get((b1, b2, b3, b4, "layer1.0.conv3.weight" in body))
        if depth is None:
            return None, f"a ResNet with {blocks} blocks"
        return (f"resnet{depth}" if f"resnet{depth}" in ARCHS else None), f"resnet{depth}"
    if "conv_stem.weight" in body and "conv_head.weight" in body:
        lite0 = (_shape(body, "conv_stem.weight") == (32, 3, 3, 3)
                 and _shape(body, "conv_head.weight") == (1280, 320, 1, 1)
                 and not any(".se." in k for k in body))
        if lite0:
            return "efficientnet_lite0", "efficientnet_lite0"
        return None, "a timm EfficientNet"
    if "_conv_stem.weight" in body:
        return None, "an EfficientNet in efficientnet_pytorch naming"
    if all(f"block{i}.0.weight" in body for i in range(1, 5)):
        return "tiny", "tiny"
    first = next(iter(body), "")
    return None, f"an unknown architecture ({len(body)} tensors, first {first!r})"


def _io(shape: tuple[int, ...] | None) -> str:
    return f"{shape[1]}->{shape[0]}" if shape and len(shape) >= 2 else "?"


def guess_arch(state: Mapping[str, Any]) -> tuple[str | None, str]:
    """Guess what a state dict is from its key names and head shapes.

    Returns (the :data:`ARCHS` name or None, a description such as ``resnet50 (fc 2048->3)`` or
    ``efficientnet_lite0 FCN (wildcat head 1280->12)``).
    """
    state = _strip_prefix(state, "module.")
    if any(k.startswith("features.") for k in state) and any(k.startswith("head.") for k in state):
        body = _strip_prefix({k[9:]: v for k, v in state.items() if k.startswith("features.")}, "net.")
        arch, desc = _guess_body(body)
        if "head.conv.weight" in state:
            return arch, f"{desc} FCN (wildcat head {_io(_shape(state, 'head.conv.weight'))})"
        return arch, f"{desc} FCN (gap head {_io(_shape(state, 'head.fc.weight'))})"
    arch, desc = _guess_body(state)
    for key in ("fc.weight", "classifier.weight", "_fc.weight"):
        if key in state:
            return arch, f"{desc} ({key.split('.')[0].lstrip('_')} {_io(_shape(state, key))})"
    return arch, desc


def _listing(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})" if keys else "0"


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, path: Any,
                      expected: str) -> None:
    """Load ``state`` into ``module`` strictly, or raise one line naming what does not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        _, looks = guess_arch(state)
        parts = [f"missing keys {_listing(missing)}", f"unexpected keys {_listing(unexpected)}"]
        if wrong:
            parts.append(f"shape mismatches {_listing(wrong, 2)}")
        raise InputError(f"{path}: does not fit {expected}: {'; '.join(parts)}; looks like {looks}")
    module.load_state_dict(state, strict=True)


def _float32(state: Mapping[str, Any], path: Any) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: state_dict entry {k!r} is {type(v).__name__}, not a tensor")
        out[k] = v.float() if v.is_floating_point() else v
    return out


def _to(model: FCN, map_location: Any) -> FCN:
    if isinstance(map_location, (str, torch.device)):
        model = model.to(torch.device(map_location))
    return model


# -- our format ------------------------------------------------------------------------------------

def _check_meta(value: Any, where: str = "meta") -> Any:
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, (list, tuple)):
        return [_check_meta(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: keys must be strings")
        return {k: _check_meta(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} is not a plain value (str, number, bool, None, "
                    "list, dict) and would not load with weights_only=True")


def save_model(model: FCN, path: str | os.PathLike, *, half: bool = False, **meta: Any) -> Path:
    """Write ``model`` in the ``deepminer-fcn/1`` format (atomically: a temp file, then rename).

    ``half`` stores floating tensors as float16 (half the size; :func:`load_model` returns float32).
    ``meta``: plain values only (str, numbers, bool, None, lists, dicts), e.g. training settings.
    """
    payload = {
        "format": FORMAT,
        "arch": model.arch,
        "head": model.head_type,
        "head_kwargs": _check_meta(dict(getattr(model.head, "head_kwargs", {})), "head_kwargs"),
        "classes": list(model.classes),
        "layer": model.layer,
        "num_units": int(model.num_units),
        "state_dict": {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone()
                       for k, v in model.state_dict().items()},
        "meta": _check_meta(meta),
    }
    path = Path(path)
    with atomic_file(path) as fh:
        torch.save(payload, fh)
    return path


def _from_ours(obj: Mapping[str, Any], path: Any) -> FCN:
    for key, kind in (("arch", str), ("head", str), ("classes", (list, tuple)), ("state_dict", Mapping),
                      ("head_kwargs", Mapping)):
        if not isinstance(obj.get(key), kind):
            raise InputError(f"{path}: field {key!r} missing or malformed in a {FORMAT} checkpoint")
    arch, head, hk = obj["arch"], obj["head"], dict(obj["head_kwargs"])
    if arch not in ARCHS:
        raise InputError(f"{path}: unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    if head not in ("gap", "wildcat"):
        raise InputError(f"{path}: unknown head {head!r} (known: gap, wildcat)")
    classes = tuple(str(c) for c in obj["classes"])
    kwargs = {}
    if head == "wildcat":
        kwargs = {"wildcat_maps": hk.get("maps", 4), "wildcat_k": hk.get("k", 0.1),
                  "wildcat_alpha": hk.get("alpha", 0.7), "wildcat_surround": hk.get("surround", 0.0)}
    model = build_model(arch, head=head, num_classes=len(classes), classes=classes, pretrained=False, **kwargs)
    load_state_strict(model, _float32(obj["state_dict"], path), path=path,
                      expected=f"{arch} with a {head} head for {len(classes)} classes")
    if isinstance(obj.get("layer"), str):
        model.layer = obj["layer"]
    meta = dict(obj.get("meta") or {})
    record = meta.pop("unit_layer", None)
    model.meta = meta
    if isinstance(record, Mapping):  # the unit layer as it was saved (deepminer.models.unit_layer)
        apply_unit_layer(model, activation=record.get("activation"), output_stride=record.get("output_stride"))
    return model.eval()


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> FCN:
    """Load a ``deepminer-fcn/1`` checkpoint: rebuild with ``build_model(..., pretrained=False)``,
    load strictly (float16 -> float32). Returns the FCN in eval mode, ``model.meta`` = the saved meta."""
    obj = torch_load(path, map_location)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
        raise InputError(f"{path}: not a {FORMAT} checkpoint (format {found!r}); "
                         "for the DeepMiner release format use import_deepminer or load_any")
    return _to(_from_ours(obj, path), map_location)


# -- the DeepMiner release format -----------------------------------------------------------------

def _from_deepminer(obj: Any, path: Any, classes: Sequence[str], arch: str | None) -> FCN:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj  # a bare state dict
    else:
        raise InputError(f"{path}: not a DeepMiner checkpoint (expected a dict with 'state_dict')")
    state = _strip_prefix(state, "module.")
    guessed, looks = guess_arch(state)
    if arch is None:
        if guessed is None or guessed == "tiny":
            raise InputError(f"{path}: cannot import: looks like {looks}")
        arch = guessed
    spec = ARCHS.get(arch)
    if spec is None:
        raise InputError(f"{path}: unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    classes = tuple(classes)
    head_key = "classifier.weight" if arch == "efficientnet_lite0" else "fc.weight"
    head_shape = _shape(state, head_key)
    if head_shape is not None and head_shape[0] != len(classes) and (guessed == arch):
        raise InputError(f"{path}: its {head_key.split('.')[0]} has {head_shape[0]} outputs but "
                         f"{len(classes)} classes were given ({', '.join(classes)})")
    net = spec.build(len(classes))
    load_state_strict(net, _float32(state, path), path=path, expected=f"{arch} with {len(classes)} classes")
    model = to_fcn(net, arch=arch, classes=classes, mean=spec.mean, std=spec.std, copy=False, verify=False)
    meta: dict[str, Any] = {"source": "deepminer", "file": str(path)}
    if isinstance(obj, Mapping) and isinstance(obj.get("epoch"), (int, float)):
        meta["epoch"] = obj["epoch"]
    model.meta = meta
    return model.eval()


def import_deepminer(path: str | os.PathLike, classes: Sequence[str] = CLASSES, *,
                     arch: str | None = "resnet152", map_location: Any = "cpu") -> FCN:
    """Import a DeepMiner release checkpoint (``{'epoch', 'state_dict', 'optimizer'}`` of a
    ``DataParallel`` model, keys prefixed ``module.``) as a GAP-head :class:`FCN`.

    ``arch``: the expected architecture (the release is ``resnet152``); ``None`` = as guessed from
    the keys. The optimizer state is ignored. Returns the FCN in eval mode.
    """
    return _to(_from_deepminer(torch_load(path, map_location), path, classes, arch), map_location)


def load_any(path: str | os.PathLike, map_location: Any = "cpu", *, classes: Sequence[str] = CLASSES) -> FCN:
    """Load either format, dispatching on the content (``format`` field -> ours; otherwise the
    DeepMiner release format with the architecture guessed from the keys)."""
    obj = torch_load(path, map_location)
    if isinstance(obj, Mapping) and "format" in obj:
        if obj["format"] != FORMAT:
            raise InputError(f"{path}: unknown checkpoint format {obj['format']!r} (known: {FORMAT})")
        return _to(_from_ours(obj, path), map_location)
    return _to(_from_deepminer(obj, path, classes, None), map_location)


# -- identity ---------------------------------------------------------------------------------------

def weights_sha256(model: torch.nn.Module) -> str:
    """The model's identity: sha256 over its state dict (names, dtypes, shapes, float32 CPU bytes),
    sorted by name. Atlases, labels and the API's ``model.weights_sha256`` are keyed by it; it does
    not change with the file format (fp16 on disk, a re-save) or the device."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
