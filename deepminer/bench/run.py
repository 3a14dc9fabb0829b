"""The whole ``deepminer bench`` run: every model on every case, then the rows of the whole run."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from deepminer import runtime
from deepminer.bench.case import bench_domain, measure_case
from deepminer.bench.common import (CASES, DISSECT_IMAGE_PX, SERVE_SIZE, SKETCH_QUANTILE, TARGETS, ModelSpec,
                                    bench_images, check, environment, load_spec)
from deepminer.bench.decode import measure_decode, measure_word_vectors
from deepminer.bench.dicom import measure_dicom_results
from deepminer.bench.dissect import measure_dissect
from deepminer.bench.serving import SERVE_JIT_WARMUP, measure_serve
from deepminer.bench.startup import STARTUP_DICOM
from deepminer.errors import InputError

def run_bench(specs: Sequence[ModelSpec], *, cases: Sequence[str] = tuple(CASES), repeats: int = 5,
              warmup: int = 1, batch_size: int = 32, device: str = "auto", threads: int | None = None,
              round_trip: Callable[[bytes], float] | None = None, serve_url: str | None = None,
              dissect: bool = True, progress: bool = True, dissect_image_px: int = DISSECT_IMAGE_PX,
              serve_warmup: int = SERVE_JIT_WARMUP, inputs: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Bench every model of ``specs`` on every case; the JSON-ready report (see docs/bench.md).
    Applies :func:`deepminer.runtime.keep_freed_memory` (process-wide, as every ``deepminer``
    command and the server do). ``threads``: torch CPU threads during the run (restored afterwards). ``serve_warmup``: untimed
    requests before the serve measurement (:func:`measure_serve`'s ``jit_warmup``). ``inputs``: with the
    ``whole`` case, also the input rows (:mod:`deepminer.bench.decode`)."""
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise InputError(f"--cases: unknown case {unknown[0]!r}; known: {', '.join(CASES)}" if unknown
                         else "--cases: no case given")
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise InputError("--repeats and --batch-size must be >= 1, --warmup >= 0")
    if threads is not None and threads < 1:
        raise InputError(f"--threads: must be >= 1, got {threads}")
    if serve_warmup < 0:
        raise InputError(f"--serve-warmup: must be >= 0, got {serve_warmup}")
    runtime.keep_freed_memory()  # measure what the CLI and the server run with (deepminer/runtime.py)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _bench(specs, cases=cases, repeats=repeats, warmup=warmup, batch_size=batch_size, device=device,
                      round_trip=round_trip, serve_url=serve_url, dissect=dissect, progress=progress,
                      dissect_image_px=dissect_image_px, serve_warmup=serve_warmup, inputs=inputs, log=log)
    finally:
        torch.set_num_threads(before)  # a library call leaves the process as it found it


def _bench(specs: Sequence[ModelSpec], *, cases: Sequence[str], repeats: int, warmup: int, batch_size: int,
           device: str, round_trip: Callable[[bytes], float] | None, serve_url: str | None, dissect: bool,
           progress: bool, dissect_image_px: int, serve_warmup: int, inputs: bool,
           log: Callable[[str], None] | None) -> dict[str, Any]:
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rep_log = say if progress else None
    dev = runtime.resolve_device(device)  # a one-line InputError for an unknown or absent device
    env = environment(dev)  # the load average as the run starts
    if env["load_average"] and env["load_average"][0] > (env["cpu_count"] or 1) and torch.get_num_threads() > 1:
        say(f"bench: note: load average {env['load_average'][0]} on {env['cpu_count']} CPUs with "
            f"{torch.get_num_threads()} torch threads; parallel kernels stall under oversubscription, "
            "--threads 1 gives steadier numbers")
    say("bench: preparing inputs")
    images = bench_images()
    models: dict[str, Any] = {}
    loaded = []
    for spec in specs:  # load every model first: a bad path fails before any long work
        loaded.append(load_spec(spec, dev))
    for model, info in loaded:
        name = info["name"]
        n = 2
        while name in models:
            name, n = f"{info['name']}#{n}", n + 1
        entry: dict[str, Any] = {**info, "cases": {}}
        domain = bench_domain(model, info["source"] if info.get("weights") == "checkpoint" else None)
        for case in cases:
            say(f"bench: {name} {case} {CASES[case][0]}x{CASES[case][1]}")
            entry["cases"][case] = measure_case(model, images[case], dev, repeats=repeats, warmup=warmup,
                                                log=rep_log, label=f"{name}/{case}", domain=domain)
        if dissect:
            say(f"bench: {name} dissection, batch {batch_size}")
            d = measure_dissect(model, dev, batch_size=batch_size, repeats=repeats, warmup=warmup,
                                image_px=dissect_image_px, log=rep_log, label=name)
            entry["dissect"] = d
            for res in entry["cases"].values():
                res.update(dissect_items_per_s=d["dissect_items_per_s"],
                           forward_items_per_s=d["forward_items_per_s"],
                           dissect_vs_forward=d["dissect_vs_forward"])
        for case, res in entry["cases"].items():
            res["check"] = {k: check(k, res.get(k), case) for k in TARGETS if k in res}
        models[name] = entry
    report: dict[str, Any] = {
        "environment": env,
        "settings": {"cases": {c: list(CASES[c]) for c in cases}, "repeats": repeats, "warmup": warmup,
                     "batch_size": batch_size, "dissect": bool(dissect), "sketch": "rectangle, rows 40-60 %, columns 30-70 %",
                     "sketch_thresholds": f"per-unit {SKETCH_QUANTILE} quantile over the image",
                     "statistic": "median of interleaved repetitions; ratios of medians"},
        "targets": {k: {"op": op, "bound": b, "cases": list(cs)} for k, (op, b, cs) in TARGETS.items()},
        "models": models,
    }
    if "whole" in cases:  # a whole-image row: with the whole case
        say(f"bench: DICOM results (SEG + SR + SC) of a {STARTUP_DICOM[0]}x{STARTUP_DICOM[1]} DICOM, "
            f"{loaded[0][1]['name']}")
        report["dicom_results"] = measure_dicom_results(loaded[0][0], repeats=repeats, warmup=warmup)
        if inputs:
            say(f"bench: full-field decode + tissue mask ({STARTUP_DICOM[0]}x{STARTUP_DICOM[1]}), word vectors load")
            report["decode"] = measure_decode(repeats=repeats, warmup=warmup, log=rep_log)
            report["word_vectors"] = measure_word_vectors(repeats=repeats, warmup=warmup)
    if round_trip is not None:
        model, info = loaded[0]
        say(f"bench: serve round trip {serve_url or ''} vs {info['name']} forward at "
            f"{SERVE_SIZE[0]}x{SERVE_SIZE[1]}")
        report["serve"] = {"url": serve_url, "local_model": info["name"],
                           **measure_serve(model, images["serve"], round_trip, dev, repeats=repeats,
                                           warmup=max(1, warmup), jit_warmup=serve_warmup, log=rep_log)}
    report["environment"]["load_average_end"] = environment(dev)["load_average"]
    return report
