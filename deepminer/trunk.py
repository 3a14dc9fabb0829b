"""Training from a frozen trunk: freezing the layers before ``--train-from``, splitting the
features there, and the cache of the frozen trunk's outputs (``--cache-features``) that a training
run then reads instead of the images.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from deepminer.atomic import atomic_file
from deepminer.defaults import PROBE
from deepminer.errors import InputError
from deepminer.patch_eval import loader


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`deepminer.atomic.atomic_file`."""
    import torch

    with atomic_file(path) as fh:
        torch.save(obj, fh)


def freeze_before(model, name: str | None) -> list[str]:
    """Freeze every parameter of ``model.features`` registered before the first one whose name
    starts with ``name`` (e.g. ``net.blocks.5``); returns the frozen parameter names. ``head``
    (:data:`PROBE`) freezes the whole backbone: only the head is trained (a linear probe). Frozen
    BatchNorm layers are kept in eval mode by :func:`set_train_mode`."""
    if not name:
        return []
    names = [n for n, _ in model.features.named_parameters()]
    if name == PROBE:
        for p in model.features.parameters():
            p.requires_grad_(False)
        return names
    first = next((i for i, n in enumerate(names) if n == name or n.startswith(name + ".")), None)
    if first is None:
        tops = sorted({".".join(n.split(".")[:3]) for n in names})
        raise InputError(f"--train-from: no layer {name!r} in {model.arch} features "
                         f"(e.g. {', '.join(tops[:3])} ... {tops[-1]})")
    frozen = []
    for i, (n, p) in enumerate(model.features.named_parameters()):
        if i < first:
            p.requires_grad_(False)
            frozen.append(n)
    return frozen


def set_train_mode(model) -> None:
    """``model.train()``, except modules whose parameters are all frozen stay in eval mode (their
    BatchNorm statistics stay those of the pretrained network)."""
    model.train()
    for m in model.features.modules():
        params = list(m.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            m.eval()


def feature_stages(features) -> list[tuple[str, Any]] | None:
    """The unit-layer feature extractor as an ordered list of ``(name, module)`` stages whose
    composition is the extractor (timm EfficientNet: stem, bn1, each block stage, head conv, bn2;
    an ``nn.Sequential``: its children), or None for structures we cannot split."""
    from torch import nn

    net = getattr(features, "net", None)
    if net is not None and all(hasattr(net, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return ([("net.conv_stem", net.conv_stem), ("net.bn1", net.bn1)]
                + [(f"net.blocks.{i}", b) for i, b in enumerate(net.blocks)]
                + [("net.conv_head", net.conv_head), ("net.bn2", net.bn2)])
    if isinstance(features, nn.Sequential):
        return list(features.named_children())
    return None


def split_features(model, name: str, *, check_size: int = 64):
    """``(trunk, rest)``: two ``nn.Sequential`` views of ``model.features`` split before stage
    ``name`` (shared modules, no copy). Checked: ``rest(trunk(x))`` equals ``features(x)`` in eval
    mode on a random batch; an :class:`InputError` when the split is not possible."""
    import torch
    from torch import nn

    stages = feature_stages(model.features) or []
    if name == PROBE:  # the whole backbone is the trunk: the cache holds the unit maps themselves
        return model.features, nn.Identity()
    names = [n for n, _ in stages]
    if name not in names or names.index(name) == 0:
        raise InputError(f"--cache-features: cannot split {model.arch} features before {name!r}; "
                         f"use --train-from with one of {', '.join(names[1:]) or '(none)'}")
    i = names.index(name)
    trunk = nn.Sequential(*[m for _, m in stages[:i]])
    rest = nn.Sequential(*[m for _, m in stages[i:]])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = model.normalize(torch.rand(2, 1, check_size, check_size, device=model.device))
        ok = torch.allclose(rest(trunk(x)), model.features(x), rtol=1e-4, atol=1e-4)
    model.train(was_training)
    if not ok:
        raise InputError(f"--cache-features: splitting {model.arch} before {name!r} changes its output")
    return trunk, rest


class TopOfTrunk:
    """``model`` from the output of the frozen trunk on: rest -> head -> pooled logits."""

    def __init__(self, model, rest):
        self.model, self.rest = model, rest

    def __call__(self, feats):
        m = self.model
        return m.pool(m.class_logits(self.rest(feats)))


class CachedFeatures:
    """Trunk outputs of every patch of a :class:`~deepminer.data.patches.PatchDataset`, computed once
    (the trunk is frozen, so they never change) and kept as float16; with ``flips`` all four flip
    variants are stored and one is drawn at random per item (the same augmentation as the images)."""

    def __init__(self, trunk, model, dataset, *, flips: bool, batch_size: int = 64, device=None,
                 progress: bool = True, desc: str = "caching features"):
        import torch
        from tqdm import tqdm

        device = device or model.device
        self.labels = dataset.labels
        self.flips = flips
        aug, dataset.augment = dataset.augment, False
        variants = [(), (-1,), (-2,), (-1, -2)] if flips else [()]
        chunks = []
        model.eval()
        try:
            with torch.no_grad():
                for x, _ in tqdm(loader(dataset, batch_size, 0), desc=desc, unit="batch", disable=not progress,
                                 leave=False, file=sys.stderr):
                    x = model.normalize(x.to(device))
                    chunks.append(torch.stack([trunk(x.flip(v) if v else x) for v in variants], 1).half().cpu())
        finally:
            dataset.augment = aug
        self.feats = torch.cat(chunks) if chunks else torch.zeros(0)

    @classmethod
    def cached(cls, path: Path, key: dict, table, trunk, model, dataset, **kwargs) -> "CachedFeatures":
        """Load the features from ``path`` when it was written for the same ``key`` and patch table
        (a resumed run), else compute them and save them there."""
        import torch

        key = dict(key, boxes=table[["image_id", "x0", "y0", "x1", "y1"]].astype(str).agg(",".join, axis=1).tolist(),
                   flips=bool(kwargs.get("flips")))
        if path.is_file():
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
                if obj.get("key") == key:
                    self = cls.__new__(cls)
                    self.labels, self.flips, self.feats = dataset.labels, key["flips"], obj["feats"]
                    return self
            except Exception:  # noqa: BLE001 - a stale or broken cache (any load error) is recomputed, never trusted
                pass
        self = cls(trunk, model, dataset, **kwargs)
        atomic_torch_save({"key": key, "feats": self.feats}, path)
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch

        v = int(torch.randint(0, self.feats.shape[1], ())) if self.flips else 0
        return self.feats[i, v].float(), int(self.labels[i])
