"""What evaluating explanations costs per image, measured side by side in one run (``deepminer bench``).

The one-pass methods (CAM, the class probability map, the top units' masks) come from the
explanation pass, so evaluating their localization should cost little more than a forward:
``eval_cam_vs_forward`` = (explanation pass + the three maps' localization metrics) / bare forward,
on the same abnormal phantoms at the same size, target <= 1.25 (``deepminer.bench.TARGETS``).
Beside it: each post-hoc peer's cost per image, and the extra cost of the faithfulness metrics
(deletion + insertion of CAM) and of one sanity cascade (CAM, :data:`~deepminer.evaluation.runner.SANITY_STEPS`
steps). Medians over images x repeats; interleaved so load changes hit every row alike.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deepminer.evaluation.catalog import PEERS

EVAL_IMAGES = 3  #: abnormal phantoms measured
EVAL_SIZE = 512  #: their height (the evaluation's data size)


def eval_images(n: int = EVAL_IMAGES, size: int = EVAL_SIZE, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` abnormal phantoms ``{"pixels", "lesion", "tissue"}`` as the evaluation sees them (tissue kept)."""
    from deepminer.data.phantoms import BITS, render_phantom
    from deepminer.data.tissue import keep_tissue

    out = []
    for i in range(n):
        ph = render_phantom(seed, i, size=size, label="malignant" if i % 2 == 0 else "benign")
        pixels, _ = keep_tissue(ph.image.astype(np.float32) / float(2 ** BITS - 1))
        out.append({"pixels": pixels, "lesion": ph.lesion > 0, "tissue": pixels > 0})
    return out


def _ms(fn: Callable[[dict], Any], im: dict) -> float:
    t0 = time.perf_counter()
    fn(im)
    return (time.perf_counter() - t0) * 1000


def measure_eval_cost(model: Any, *, repeats: int = 3, peers: tuple[str, ...] = PEERS, sanity: bool = True,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per-image milliseconds (medians) of: the bare forward, the CAM-family evaluation, each peer's
    map, faithfulness (CAM) and one sanity cascade (CAM); and ``eval_cam_vs_forward``."""
    from deepminer.evaluation.faithfulness import deletion_insertion
    from deepminer.evaluation.localization import LesionTarget, localization_metrics, to_image
    from deepminer.evaluation.methods import one_pass_map
    from deepminer.evaluation.runner import SANITY_STEPS
    from deepminer.evaluation.sanity import cascading_randomization
    from deepminer.explain.engine import explain_image
    from deepminer.explain.method_base import prepare_image
    from deepminer.explain.peers import saliency

    model = model.eval()
    device = next(model.parameters()).device
    images = eval_images()
    target = list(model.classes).index("malignant") if "malignant" in model.classes else len(model.classes) - 1
    side = max(images[0]["pixels"].shape)

    def forward(im: dict) -> None:
        x, _ = prepare_image(im["pixels"], side, device)
        with torch.inference_mode():
            model(x)

    def cam_eval(im: dict) -> None:  # what the evaluation does per image for these three methods
        exp = explain_image(model, im["pixels"], max_side=side, unit_maps="top")
        scored = LesionTarget.make(im["lesion"], im["tissue"])
        for method in ("cam", "class_map", "top_units"):
            sal = to_image(one_pass_map(method, exp, target, None), im["pixels"].shape)
            localization_metrics(sal, scored, pr=True)

    def cam_map(im: dict) -> np.ndarray:
        return np.asarray(explain_image(model, im["pixels"], max_side=side, unit_maps="none").cam[target])

    steps: dict[str, Callable[[dict], Any]] = {"forward_ms": forward, "eval_cam_ms": cam_eval}
    def peer(name: str) -> Callable[[dict], Any]:
        def run(im: dict) -> Any:
            return saliency(model, im["pixels"], name, target, max_side=side)
        return run

    for p in peers:
        steps[f"peer_{p}_ms"] = peer(p)
    steps["faithfulness_ms"] = lambda im: deletion_insertion(model, im["pixels"], cam_map(im), target, im["tissue"],
                                                            max_side=side)
    if sanity:
        steps["sanity_ms"] = lambda im: cascading_randomization(
            model, im["pixels"], target,
            lambda m, img, t: np.asarray(explain_image(m, img, max_side=side, unit_maps="none").cam[t]),
            max_side=side, max_steps=SANITY_STEPS)
    for im in images[:1]:  # warm-up: lazy imports, allocator, JIT of the peers' libraries
        for fn in steps.values():
            fn(im)
    raw: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        for im in images:
            for key, fn in steps.items():
                raw[key].append(_ms(fn, im))
        if log is not None:
            log(f"bench: evaluation cost, repeat {r + 1}/{repeats}")
    med = {k: float(np.median(v)) for k, v in raw.items()}
    fwd = max(med["forward_ms"], 1e-9)
    return {"images": len(images), "size": list(images[0]["pixels"].shape), "repeats": repeats, **med,
            "eval_cam_vs_forward": med["eval_cam_ms"] / fwd,
            "faithfulness_vs_forward": med["faithfulness_ms"] / fwd,
            **({"sanity_vs_forward": med["sanity_ms"] / fwd} if sanity else {}),
            "peers_vs_forward": {p: med[f"peer_{p}_ms"] / fwd for p in peers}, "raw": raw}


def format_eval_cost(r: dict[str, Any], verdict: str | None) -> list[str]:
    """The bench rows of :func:`measure_eval_cost` (``verdict``: PASS/MISS of ``eval_cam_vs_forward``)."""
    h, w = r["size"]
    lines = [f"evaluation cost per image ({r['images']} abnormal phantoms {w}x{h}, medians of {r['repeats']} repeats):",
             f"  bare forward                          {r['forward_ms']:8.1f} ms",
             f"  CAM/probability map/top units eval    {r['eval_cam_ms']:8.1f} ms  {r['eval_cam_vs_forward']:5.2f}x "
             f"forward {verdict or ''} (target <= 1.25x)"]
    for p, ratio in r["peers_vs_forward"].items():
        lines.append(f"  peer {p:<32} {r[f'peer_{p}_ms']:8.1f} ms  {ratio:5.2f}x forward")
    lines.append(f"  + faithfulness (deletion+insertion)   {r['faithfulness_ms']:8.1f} ms  "
                 f"{r['faithfulness_vs_forward']:5.2f}x forward")
    if "sanity_ms" in r:
        lines.append(f"  + sanity cascade (CAM)                {r['sanity_ms']:8.1f} ms  {r['sanity_vs_forward']:5.2f}x forward")
    return lines
