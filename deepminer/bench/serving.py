"""The serving row (``--serve``): the HTTP round trip vs the bare forward, interleaved."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from deepminer.bench.common import log_rep, check, median, percentile, png8_variants, timed_ms

def _serve_sample(answer: Any) -> dict[str, Any]:
    """A round trip's answer -> ``{"ms", "server_forward_ms", "threads", "device"}`` (a bare number
    is the milliseconds alone)."""
    if isinstance(answer, Mapping):
        return {"ms": float(answer["ms"]), "server_forward_ms": answer.get("server_forward_ms"),
                "threads": answer.get("threads"), "device": answer.get("device")}
    return {"ms": float(answer), "server_forward_ms": None, "threads": None, "device": None}


SERVE_JIT_WARMUP = 200


def measure_serve(model: torch.nn.Module, image: np.ndarray, round_trip: Callable[[bytes], Any],
                  device: torch.device, *, repeats: int, warmup: int, jit_warmup: int = SERVE_JIT_WARMUP,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """p50/p90 of ``round_trip(png_bytes)`` for a 1024 x 1024 8-bit PNG, interleaved with the bare
    forward of ``model`` at that size; ``serve_vs_forward_ms`` = p50 - median forward.

    ``round_trip`` returns the milliseconds, or a mapping with ``ms`` and what the server said of
    itself: ``server_forward_ms`` (the worker's own forward of this request), ``threads`` (its torch
    threads) and ``device``. When the server is on the CPU and names its threads, the local forward
    runs with as many (the side-by-side compares the same work on the same cores; restored
    afterwards), and ``serve_overhead_ms`` = median over requests of round trip - the worker's own
    forward: what serving adds, free of how fast the forward ran at that moment.

    First, ``jit_warmup`` untimed requests of one image (the first a forward, the rest answered from
    the server's feature cache, ~40 ms each): TorchServe's frontend is Java, and its request path
    runs 5-6 ms per request slower until the JIT has compiled it (measured on the demo model: 14 ms
    of TorchServe + HTTP per request over the first 50 requests, 9 ms after 250), so the p50 is that
    of a server that has been up a while, not of one just started."""
    from deepminer.explain import prepare_image

    h, w = image.shape
    x, _ = prepare_image(image, max(h, w), device)
    pngs = png8_variants(image, warmup + repeats + 1)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    before = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    fwd: list[float] = []
    server: dict[str, Any] = {}

    def ask(png: bytes) -> dict[str, Any]:
        sample = _serve_sample(round_trip(png))
        if not server:  # the first answer says how the server runs: match its threads from here on
            server.update(threads=sample["threads"], device=sample["device"])
            if (device.type == "cpu" and isinstance(sample["threads"], int) and sample["threads"] > 0
                    and str(sample["device"] or "cpu").startswith("cpu")):
                torch.set_num_threads(sample["threads"])
        return sample

    try:
        for i in range(max(0, jit_warmup)):
            ask(pngs[-1])
            if log is not None and (i + 1) % 50 == 0:
                log(f"  serve JIT warm-up {i + 1}/{jit_warmup} (one image, cached by the server)")
        for i in range(warmup + repeats):
            f_ms = timed_ms(forward, device)
            sample = ask(pngs[i])
            if i >= warmup:
                fwd.append(f_ms)
                rows.append(sample)
            log_rep(log, "serve", i, warmup, repeats, {"forward_ms": f_ms, "serve_ms": sample["ms"]})
        forward_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    rt = [r["ms"] for r in rows]
    p50, fmed = median(rt), median(fwd)
    own = [r["ms"] - r["server_forward_ms"] for r in rows if r["server_forward_ms"] is not None]
    overhead = median(own) if len(own) == len(rows) else None
    return {"image": f"{w}x{h} 8-bit grey PNG ({len(pngs[0])} bytes), a different pixel per request",
            "jit_warmup": max(0, jit_warmup),
            "serve_p50_ms": p50, "serve_p90_ms": percentile(rt, 90), "forward_ms": fmed,
            "serve_vs_forward_ms": p50 - fmed, "serve_overhead_ms": overhead,
            "server_forward_ms": median([r["server_forward_ms"] for r in rows]) if overhead is not None else None,
            "forward_threads": forward_threads, "server_threads": server.get("threads"),
            "server_device": server.get("device"),
            "check": {"serve_vs_forward_ms": check("serve_vs_forward_ms", p50 - fmed)},
            "raw": {"serve_ms": rt, "forward_ms": fwd,
                    "server_forward_ms": [r["server_forward_ms"] for r in rows]}}
