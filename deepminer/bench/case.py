"""The per-case rows: forward, explain, Grad-CAM, sketch IoU, ablate and domain on one image,
interleaved (see the package docstring)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepminer.bench.common import SKETCH_QUANTILE, log_rep, median, rectangle_sketch, timed
from deepminer.models.fcn import FCN

def bench_domain(model: FCN, checkpoint: str | os.PathLike | None = None) -> Any:
    """The out-of-domain summary the ``domain`` step times: the ``domain.pt`` beside the model's
    ``checkpoint`` when there is one for this model (a guard: for its frozen layers; a unit-max
    summary: for these weights), else a stand-in."""
    from deepminer.domain import FILE_NAME, load_domain, stand_in
    from deepminer.errors import DeepMinerError
    from deepminer.models.checkpoints import weights_sha256

    if checkpoint:
        path = Path(checkpoint).parent / FILE_NAME
        if path.is_file():
            try:
                return load_domain(path, model=model, weights_sha256=weights_sha256(model))
            except DeepMinerError:
                pass
    return stand_in(int(model.num_units))


def _gradcam(model: torch.nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """pytorch-grad-cam's GradCAM of class ``target`` on the unit layer, as its README uses it."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.features]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target))])
    return out


def measure_case(model: FCN, image: np.ndarray, device: torch.device, *, repeats: int,
                 warmup: int, log: Callable[[str], None] | None = None, label: str = "",
                 domain: Any = None) -> dict[str, Any]:
    """Forward, explain, Grad-CAM and sketch IoU on one image, interleaved; medians and ratios."""
    import pytorch_grad_cam  # noqa: F401 - imported before any timing (its import takes seconds)

    from deepminer.explain import explain_image, prepare_image, quantile_thresholds, sketch_iou
    from deepminer.explain.engine import ablation_from_features
    from deepminer.options import MAX_ABLATE

    domain = bench_domain(model) if domain is None else domain
    h, w = image.shape
    side = max(h, w)
    x, _ = prepare_image(image, side, device)
    if tuple(x.shape[-2:]) != (h, w):
        raise RuntimeError(f"bench: the model input {tuple(x.shape[-2:])} differs from the image {(h, w)}")
    with torch.inference_mode():
        pred = int(model(x)[0].argmax())
    # (K, h, w) float16: what the engine hands to sketch_iou
    full = explain_image(model, image, max_side=side, unit_maps="all")
    maps = full.unit_maps.stack
    with torch.inference_mode():  # the float32 unit maps the cache keeps for an ablation
        feats = model.forward_features(x)[0].float().cpu().numpy()
    silenced = full.ranked_units(full.prediction, min(MAX_ABLATE, int(maps.shape[0])))
    thr = quantile_thresholds(maps.reshape(maps.shape[0], -1).T.astype(np.float32), SKETCH_QUANTILE)
    sketch = rectangle_sketch((h, w))

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    steps: dict[str, Callable[[], Any]] = {
        "forward_ms": forward,
        "explain_ms": lambda: explain_image(model, image, max_side=side),
        "gradcam_ms": lambda: _gradcam(model, x, pred),
        "sketch_iou_ms": lambda: sketch_iou(sketch, maps, thr),
        "ablate_ms": lambda: ablation_from_features(model, feats, silenced, full, None),
        # the guard: its own pass through the frozen layers at the case's side, and the tissue mask
        "domain_ms": lambda: domain.judge(model=model, pixels=image, unit_max=full.unit_max, side=side),
    }
    raw: dict[str, list[float]] = {k: [] for k in steps}
    raw_cpu: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + repeats):
        got = {key: timed(fn, device) for key, fn in steps.items()}
        model.zero_grad(set_to_none=True)  # free Grad-CAM's parameter gradients (not timed)
        if i >= warmup:
            for key, (ms, cpu_ms) in got.items():
                raw[key].append(ms)
                raw_cpu[key].append(cpu_ms)
        log_rep(log, label, i, warmup, repeats, {k: v[0] for k, v in got.items()})
    med = {k: median(v) for k, v in raw.items()}
    cpu = {k: median(v) for k, v in raw_cpu.items()}
    return {
        "input": [h, w], "map": [int(maps.shape[1]), int(maps.shape[2])], "units": int(maps.shape[0]),
        "ablated_units": len(silenced),
        "prediction": model.classes[pred],
        **med,
        "explain_vs_forward": med["explain_ms"] / med["forward_ms"],
        "gradcam_vs_explain": med["gradcam_ms"] / med["explain_ms"],
        "domain_vs_forward": med["domain_ms"] / med["forward_ms"], "domain_source": domain.fit.get("source", "file"),
        "cpu": {**cpu, "explain_vs_forward": cpu["explain_ms"] / max(cpu["forward_ms"], 1e-9),
                "gradcam_vs_explain": cpu["gradcam_ms"] / max(cpu["explain_ms"], 1e-9)},
        "raw": raw, "raw_cpu": raw_cpu,
    }
