"""deepminer.runtime.keep_freed_memory: freed activations stay in the heap, so repeated forward
passes stop page-faulting their buffers in again (measured in fresh processes: the setting is
process-wide)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys
import torch
if sys.argv[1] == "keep":
    from deepminer.runtime import keep_freed_memory, is_applied
    assert keep_freed_memory() and is_applied() and keep_freed_memory()  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.rand(1, 16, 512, 512)
conv = torch.nn.Conv2d(16, 32, 3, padding=1)
with torch.inference_mode():
    conv(x)  # first pass: everything is new in both settings
    before = faults()
    for _ in range(5):
        y = torch.relu(conv(x)) * 2  # ~32 MiB buffers, allocated and freed every pass
        del y
print(json.dumps({"faults": faults() - before}))
"""


def run(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_repeated_passes_stop_page_faulting():
    default, kept = run("default"), run("keep")
    # 5 passes x 2 buffers of 32 MiB = 80k pages faulted in again by default; kept: almost none
    assert default > 20_000, default
    assert kept < default / 4, (kept, default)  # measured here: 168k vs 16k


def test_bad_limits_are_refused_and_nothing_is_applied():
    out = subprocess.run([sys.executable, "-c", "from deepminer import runtime as r; "
                          "print(r.keep_freed_memory(0), r.keep_freed_memory(2**31), r.is_applied())"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False", "False"], out.stderr[-1000:]
