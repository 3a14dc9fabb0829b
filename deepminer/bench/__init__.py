"""``deepminer bench``: the costs of explaining, measured side by side in one run.

For each model and each case (a 224 px patch, a 1536 x 908 whole image) the same input goes through

* **forward**: ``model(x)`` under ``torch.inference_mode()`` (the bare classifier);
* **explain**: :func:`deepminer.explain.explain_image` at ``max_side`` = the case's long side (so
  no resize differs from the forward's input);
* **gradcam**: ``pytorch_grad_cam.GradCAM`` on the unit layer (``model.features``), target = the
  predicted class, used as its README shows (context manager, one call);
* **sketch IoU**: :func:`deepminer.explain.units.sketch_iou` of a rectangle sketch at the original
  image size with ALL units' maps at the case's feature resolution (thresholds: each unit's 0.99
  quantile over the image, what the engine uses without an atlas; computed once, not timed);
* **ablate**: :func:`deepminer.explain.engine.ablation_from_features`, the ``ablate`` option on a
  cached image: :data:`~deepminer.options.MAX_ABLATE` units (the most influential on the
  prediction, the largest set a request may silence) zeroed in the float32 unit maps, the head,
  the image rule, the delta per class (the cost does not depend on which units);
* **domain**: ``judge`` of the model's own ``domain.pt`` (:func:`deepminer.domain.load_domain`),
  the out-of-domain verdict the server adds to every answer (``input.domain``): a frozen-trunk guard
  (its own pass through the frozen layers at the case's side, the tissue mask and the image
  statistics: hundreds of ms, above the 5 ms target written for the unit-max score) or a unit-max
  summary (the explanation's ``unit_max``: a matrix product); a stand-in unit-max summary of the
  default shape when none lies beside the model or it does not match (:func:`deepminer.domain.stand_in`).

Repetitions are interleaved (forward, explain, gradcam, sketch IoU, forward, ...) so machine load
affects every method alike; medians are reported and every ratio is a ratio of medians.

**Dissection** throughput (items/s) of the atlas's per-batch step,
:func:`deepminer.atlas.profile_batch` (forward + streaming quantile tails, top-k heaps, influence
counts, embedding), is compared with the bare ``model(x)`` on the same in-memory batches of 224 px
phantom patches (read once before timing: no loading on either side), interleaved (profile, forward,
profile, ...). The value is per model; it is reported under both cases.

**Serving** (``--serve``): :func:`measure_serve` takes the HTTP client's round-trip function (the
library never imports ``serve/``) and compares its p50 for a 1024 x 1024 8-bit PNG with the bare
forward at that size, interleaved, with the local forward on as many torch threads as the server's
worker reports (a CPU server). Each request carries a different image (one pixel changed) so the
server's feature cache never answers instead of the model. The worker's own forward time of each
request gives a second, noise-free figure: round trip - own forward (``serve_overhead_ms``).

**Start-up** (:func:`measure_startup`): the wall time of fresh ``python -m deepminer --help`` and
``python -m deepminer inspect`` (of a generated 4500 x 3000 16-bit DICOM) subprocesses, medians.

**Inputs** (:mod:`~deepminer.bench.decode`, with the ``whole`` case): a full-field 4500 x 3000 16-bit
image decoded and its tissue mask found (PNG, DICOM, RLE DICOM; ``decode_mask_s``), and the GloVe
word vectors loaded (``word_vectors_load_s``).

The package keeps one module per group of rows: :mod:`~deepminer.bench.common` (the cases,
:data:`TARGETS`, timers, inputs, the models), :mod:`~deepminer.bench.case` (the per-case rows),
:mod:`~deepminer.bench.dissect`, :mod:`~deepminer.bench.serving`, :mod:`~deepminer.bench.startup`,
:mod:`~deepminer.bench.dicom`, :mod:`~deepminer.bench.decode` (full-field decode + tissue mask, word
vectors); the run is :mod:`~deepminer.bench.run`, its table and JSON :mod:`~deepminer.bench.report`.
"""
from __future__ import annotations

from deepminer.bench.case import bench_domain, measure_case
from deepminer.bench.common import (CASES, DICOM_RESULT_MB, DEFAULT_ARCH, DEFAULT_MODEL, DISSECT_BATCHES, DISSECT_IMAGE_PX,
                                    PATCHES_PER_IMAGE, SERVE_SIZE, SKETCH_QUANTILE, TARGETS, ModelSpec, bench_images,
                                    check, default_specs, environment, load_spec, median, percentile, png8_variants,
                                    rectangle_sketch, timed, timed_ms)
from deepminer.bench.decode import decode_inputs, format_inputs, measure_decode, measure_word_vectors
from deepminer.bench.dicom import measure_dicom_results
from deepminer.bench.dissect import PhantomPatches, measure_dissect, phantom_patches
from deepminer.bench.report import format_table, to_json
from deepminer.bench.run import run_bench
from deepminer.bench.serving import SERVE_JIT_WARMUP, measure_serve
from deepminer.bench.startup import (MG_FOR_PRESENTATION, STARTUP_DICOM, command_wall_s, format_startup,
                                     measure_startup, startup_dicom)
from deepminer.errors import InputError

__all__ = [
    "DICOM_RESULT_MB",
    "CASES", "DEFAULT_ARCH", "DEFAULT_MODEL", "DISSECT_BATCHES", "DISSECT_IMAGE_PX", "MG_FOR_PRESENTATION",
    "PATCHES_PER_IMAGE", "SERVE_JIT_WARMUP", "SERVE_SIZE", "SKETCH_QUANTILE", "STARTUP_DICOM", "TARGETS",
    "InputError", "ModelSpec", "PhantomPatches", "bench_domain", "bench_images", "check", "command_wall_s",
    "decode_inputs", "default_specs", "format_inputs", "measure_decode", "measure_word_vectors", "environment", "format_startup", "format_table", "load_spec", "measure_case",
    "measure_dicom_results", "measure_dissect", "measure_serve", "measure_startup", "median", "percentile",
    "phantom_patches", "png8_variants", "rectangle_sketch", "run_bench", "startup_dicom", "timed", "timed_ms",
    "to_json",
]
