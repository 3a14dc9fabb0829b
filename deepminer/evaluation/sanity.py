"""Sanity check of a saliency method by cascading model randomization (Adebayo et al. 2018).

A map that explains the model must change when the model does. :func:`cascading_randomization`
re-draws the parameters of the model one block more at a time, from the top down, and compares the
method's map on each randomized model with its map on the trained one:

* **blocks** (:func:`randomization_blocks`): first the head (``model.head``), then the feature
  blocks, last first. For a plain feature module (``nn.Sequential``: the tiny CNN, a ResNet's
  ``layer4 ... conv1``) the blocks are its top-level children that hold parameters. For timm's
  EfficientNet (:class:`~deepminer.models.fcn.TimmFeatures`) they are ``conv_head + bn2`` (the 1x1
  convolution that makes the 1,280 units, with its batch norm), then the stages of ``net.blocks``
  (``blocks.6`` ... ``blocks.0``), then ``conv_stem + bn1``; another timm network falls back to the
  top-level children of ``net`` that hold parameters.
* **randomization**: every parameter tensor of the block is re-drawn from a normal distribution
  with the tensor's own mean and standard deviation (seeded, drawn on the CPU so every device gets
  the same numbers). The learned structure is gone but the scale of each layer is kept, so the
  randomized network still gives finite, non-degenerate maps. A constant tensor (a fresh batch
  norm's weight of ones) stays as it is; buffers (batch-norm running statistics) are kept. The
  work is done on a deep copy: the caller's model is never touched.
* **similarity** of each randomized map with the original: ``spearman``, the Spearman rank
  correlation of the flattened maps (``scipy.stats.spearmanr``; a constant map has no ranking,
  so its correlation is taken as 0: it carries no information about the original) and ``ssim``
  (``skimage.metrics.structural_similarity`` of the maps min-max normalised to [0, 1],
  ``data_range=1``, window ``min(7, the largest odd number <= the map's shorter side)``; NaN for
  a map with a side under 3 cells, where SSIM has no window).

:data:`SANITY_BOUND` = 0.5, and :func:`passes` asks the Spearman correlation after the head AND
the last feature block are random (step index 1) to be below it. Adebayo et al. show that methods
which depend on the model (gradients, Grad-CAM; CAM is the FC weights times the last block's maps)
fall to near-zero rank correlation once the top layers are random, while edge-detector-like
methods (Guided Backprop) keep a high one through the whole cascade. A map whose correlation is
still >= 0.5 with the classifier's head and its last block re-drawn is mostly a function of the
image, not of the model. The correlation is signed: a map that inverts with the weights (strong
negative correlation) depends on them and passes.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deepminer.explanation import normalize_map
from deepminer.geometry import DEFAULT_MAX_SIDE
from deepminer.models.fcn import FCN, TimmFeatures

SANITY_BOUND = 0.5  #: Spearman correlation at step 1 below which a method passes

Method = Callable[[FCN, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class SanityStep:
    """One step of the cascade: ``block`` (name) is the block randomized at this step, on top of
    the blocks of the earlier steps; ``spearman`` and ``ssim`` compare ``map`` (the method's map on
    the model randomized so far) with the map on the trained model."""

    index: int
    block: str
    spearman: float
    ssim: float
    map: np.ndarray


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _group(net: nn.Module, prefix: str, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    mods = [(n, getattr(net, n)) for n in names if isinstance(getattr(net, n, None), nn.Module)]
    mods = [(n, m) for n, m in mods if _has_params(m)]
    if not mods:
        return None
    if len(mods) == 1:
        return f"{prefix}.{mods[0][0]}", mods[0][1]
    return f"{prefix}.{mods[0][0]}+" + "+".join(n for n, _ in mods[1:]), nn.ModuleList([m for _, m in mods])


def randomization_blocks(model: FCN) -> list[tuple[str, nn.Module]]:
    """The cascade's blocks, in the order they are randomized: ``("head", model.head)`` first, then
    the feature blocks from the last to the first (module docstring). Names are module paths in
    ``model`` (``features.block4``, ``features.net.blocks.6``); a pair of modules randomized
    together is named ``features.net.conv_head+bn2`` and returned as an ``nn.ModuleList``."""
    blocks: list[tuple[str, nn.Module]] = [("head", model.head)]
    features = model.features
    if isinstance(features, TimmFeatures):
        net = features.net
        stages = getattr(net, "blocks", None)
        if isinstance(stages, nn.Module) and hasattr(net, "conv_head"):
            top = _group(net, "features.net", ("conv_head", "bn2"))
            if top is not None:
                blocks.append(top)
            blocks += [(f"features.net.blocks.{n}", m) for n, m in reversed(list(stages.named_children()))
                       if _has_params(m)]
            stem = _group(net, "features.net", ("conv_stem", "bn1"))
            if stem is not None:
                blocks.append(stem)
            return blocks
        skip = ("classifier", "global_pool", "head", "fc")
        return blocks + [(f"features.net.{n}", m) for n, m in reversed(list(net.named_children()))
                         if n not in skip and _has_params(m)]
    return blocks + [(f"features.{n}", m) for n, m in reversed(list(features.named_children()))
                     if _has_params(m)]


def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter of ``module`` in place from N(its mean, its std) (module docstring)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() < 2:
                continue
            mean, std = p.float().mean(), p.float().std()
            new = torch.randn(p.shape, generator=generator) * std.cpu() + mean.cpu()
            p.copy_(new.to(device=p.device, dtype=p.dtype))


def rank_correlation(a: Any, b: Any) -> float:
    """Spearman correlation of two maps, flattened; 0 when either is constant (or NaN)."""
    from scipy.stats import spearmanr

    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"maps of different sizes: {np.shape(a)} and {np.shape(b)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    r = float(spearmanr(x, y).statistic)
    return r if np.isfinite(r) else 0.0


def map_ssim(a: Any, b: Any) -> float:
    """SSIM of two ``(h, w)`` maps min-max normalised to [0, 1] (module docstring); NaN when the
    shorter side is under 3 cells."""
    from skimage.metrics import structural_similarity

    x, y = (normalize_map(np.nan_to_num(np.asarray(m, np.float64)), 0.0, dtype=np.float64) for m in (a, b))
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"maps of different sizes: {np.shape(a)} and {np.shape(b)}")
    side = min(x.shape)
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return float("nan")
    return float(structural_similarity(x, y, data_range=1.0, win_size=win))


def _as_method(method: Method | str, max_side: int | None, input_side: int | None = None) -> Method:
    if not isinstance(method, str):
        return method
    from deepminer.explain.peers import saliency

    name = method

    def run(model: FCN, image: np.ndarray, target: int) -> np.ndarray:
        return saliency(model, image, name, target, max_side=max_side, input_side=input_side)
    return run


def cascading_randomization(model: FCN, image: Any, target: int, method: Method | str, *, seed: int = 0,
                            max_side: int | None = DEFAULT_MAX_SIDE, input_side: int | None = None,
                            max_steps: int | None = None) -> list[SanityStep]:
    """Cascading randomization of ``model`` (module docstring): one :class:`SanityStep` per block
    of :func:`randomization_blocks`, head first (only the first ``max_steps`` when given; 2 are
    enough for :func:`passes`).

    ``method(model, image, target) -> (h, w)`` computes the map (any scale); a name of
    :data:`deepminer.explain.peers.METHODS` runs :func:`~deepminer.explain.peers.saliency` at
    ``max_side`` (or exactly ``input_side``; both used for named methods only). ``seed`` fixes the re-drawn
    weights. The caller's model is not modified (a deep copy is randomized).
    """
    run = _as_method(method, max_side, input_side)
    work = copy.deepcopy(model)
    original = np.asarray(run(work, image, int(target)), dtype=np.float64)
    generator = torch.Generator().manual_seed(int(seed))
    blocks = randomization_blocks(work)
    if max_steps is not None:
        blocks = blocks[:max(0, int(max_steps))]
    steps: list[SanityStep] = []
    for index, (name, block) in enumerate(blocks):
        randomize_(block, generator)
        current = np.asarray(run(work, image, int(target)), dtype=np.float64)
        steps.append(SanityStep(index=index, block=name, spearman=rank_correlation(original, current),
                                ssim=map_ssim(original, current), map=current.astype(np.float32)))
    return steps


def passes(steps: list[SanityStep], bound: float = SANITY_BOUND) -> bool:
    """True when the Spearman correlation after the head and the last feature block are randomized
    (step index 1) is below ``bound``: the method's map depends on the model."""
    if len(steps) < 2:
        raise ValueError(f"passes: needs the first 2 steps of the cascade, got {len(steps)}")
    return steps[1].spearman < bound
