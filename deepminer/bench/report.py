"""The report of a run: the human-readable table and the JSON (floats rounded)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deepminer.bench.common import DICOM_RESULT_MB, TARGETS
from deepminer.bench.decode import format_inputs
from deepminer.bench.startup import format_startup

def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "nan"
    return str(v)


def _mark(value: float | None, verdict: str | None, digits: int = 2) -> str:
    return _fmt(value, digits) + ("" if verdict is None else f" {verdict}")


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table of a :func:`run_bench` report."""
    env = report["environment"]
    head = ["model", "case", "input", "fwd ms", "explain ms", "gradcam ms", "iou ms", "ablate ms", "domain ms",
            "dissect it/s",
            "fwd it/s", "explain/fwd", "gradcam/explain", "dissect/fwd"]
    rows = []
    for name, entry in report["models"].items():
        for case, r in entry["cases"].items():
            c = r.get("check", {})
            rows.append([name, case, f"{r['input'][0]}x{r['input'][1]}", _fmt(r["forward_ms"]),
                         _fmt(r["explain_ms"]), _fmt(r["gradcam_ms"]),
                         _mark(r["sketch_iou_ms"], c.get("sketch_iou_ms"), 1),
                         _mark(r.get("ablate_ms"), c.get("ablate_ms"), 1),
                         _mark(r.get("domain_ms"), c.get("domain_ms"), 2),
                         _fmt(r.get("dissect_items_per_s")), _fmt(r.get("forward_items_per_s")),
                         _mark(r["explain_vs_forward"], c.get("explain_vs_forward")),
                         _mark(r["gradcam_vs_explain"], c.get("gradcam_vs_explain")),
                         _mark(r.get("dissect_vs_forward"), c.get("dissect_vs_forward"))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(v).ljust(wd) if i < 3 else str(v).rjust(wd) for i, (v, wd) in enumerate(zip(cells, widths)))

    out = [f"deepminer bench: torch {env['torch']}, device {env['device']}"
           + (f" ({env['gpu']})" if env.get("gpu") else "")
           + f", {env['torch_threads']} threads, {env['cpu_count']} CPUs, load average "
           f"{env['load_average']} -> {env.get('load_average_end')}",
           f"medians of {report['settings']['repeats']} interleaved repetitions "
           f"(+{report['settings']['warmup']} warm-up)"
           + (f"; dissection at batch {report['settings']['batch_size']} on 224 px patches"
              if report["settings"].get("dissect", True) else ""),
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append("process CPU ms, medians (all threads; steadier than wall time on a loaded machine):")
    out.extend(f"  {name}/{case}: fwd {_fmt(r['cpu']['forward_ms'])}, explain {_fmt(r['cpu']['explain_ms'])}, "
               f"gradcam {_fmt(r['cpu']['gradcam_ms'])}, iou {_fmt(r['cpu']['sketch_iou_ms'])}, "
               f"ablate {_fmt(r['cpu'].get('ablate_ms'))}, domain {_fmt(r['cpu'].get('domain_ms'), 2)}, "
               f"explain/fwd {_fmt(r['cpu']['explain_vs_forward'], 2)}, "
               f"gradcam/explain {_fmt(r['cpu']['gradcam_vs_explain'], 2)}"
               for name, entry in report["models"].items() for case, r in entry["cases"].items())
    t = report["targets"]
    out.append("targets: explain/fwd <= {0}, gradcam/explain >= {1}, sketch IoU <= {2} ms (whole image), "
               "ablate <= {4} ms, domain <= {5} ms, dissect/fwd >= {3}".format(
                   t["explain_vs_forward"]["bound"], t["gradcam_vs_explain"]["bound"], t["sketch_iou_ms"]["bound"],
                   t["dissect_vs_forward"]["bound"], t["ablate_ms"]["bound"], t["domain_ms"]["bound"]))
    for name, entry in report["models"].items():
        out.append(f"  {name}: {entry['arch']}, {entry['units']} units at {entry['layer']}, "
                   f"weights {entry['weights']}")
    s = report.get("serve")
    if s:
        out.append(f"serve {s['url']}: {s['image']}: p50 {s['serve_p50_ms']:.1f} ms, p90 {s['serve_p90_ms']:.1f} ms; "
                   f"forward of {s['local_model']} {s['forward_ms']:.1f} ms ({s.get('forward_threads')} threads); "
                   f"p50 - forward {s['serve_vs_forward_ms']:.1f} ms "
                   f"{s['check']['serve_vs_forward_ms']} (target <= {t['serve_vs_forward_ms']['bound']:.0f} ms)")
        if s.get("serve_overhead_ms") is not None:
            out.append(f"  server {s.get('server_device')}, {s.get('server_threads')} threads: its own forward "
                       f"{s['server_forward_ms']:.1f} ms; round trip - own forward, median "
                       f"{s['serve_overhead_ms']:.1f} ms (decode, tissue mask, encoding, TorchServe, HTTP)")
    if report.get("eval"):
        from deepminer.evaluation.cost import format_eval_cost

        out += format_eval_cost(report["eval"], report["eval"]["check"]["eval_cam_vs_forward"])
    d = report.get("dicom_results")
    if d:
        out.append(f"DICOM results (SEG + SR + SC, built and serialised) of a {d['image']}: "
                   f"{d['dicom_results_ms']:.0f} ms {d['check']['dicom_results_ms']} "
                   f"(target <= {TARGETS['dicom_results_ms'][1]:.0f} ms; process CPU {d['cpu_ms']:.0f} ms, all "
                   f"threads); decoding the source {d['decode_ms']:.0f} ms; sizes "
                   + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in d["bytes"].items())
                   + f" (SEG and SC target <= {DICOM_RESULT_MB:.0f} MB each)")
    out += format_inputs(report.get("decode"), report.get("word_vectors"))
    if report.get("startup"):
        out += format_startup(report["startup"])
    return "\n".join(out)


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report with floats rounded to 4 decimals (ms, items/s, ratios) and non-finite values
    as null."""
    def rnd(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4) if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rnd(x) for x in v]
        return v

    return rnd(report)
