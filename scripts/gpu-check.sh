#!/usr/bin/env bash
# The GPU path, checked on a machine with an NVIDIA GPU (docs/bench.md, "On a GPU"):
#   bash scripts/gpu-check.sh            (from the repository root; about 5-8 minutes)
# 1. the venv and the model store (scripts/setup.sh, scripts/model_store.sh; no browser needed);
# 2. the serving tests against a real TorchServe (its workers get the GPU: deviceType is omitted, so
#    TorchServe hands each worker a gpu_id) and a check that an answer really came from `cuda:N`;
# 3. `deepminer bench --device cuda` on every bundled model, then the same on the CPU, as tables.
# Everything it prints is also written to test-artifacts/gpu-check/ (bench JSON + the log).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=test-artifacts/gpu-check
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
bash scripts/setup.sh   # needs PyPI and Debian (a lab machine; the device machine here has neither)
bash scripts/model_store.sh
PY=.venv/bin/python
$PY - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device (torch %s, built for CUDA %s): nothing to check here"
             % (torch.__version__, torch.version.cuda))
print("gpu-check: torch", torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name(0))
EOF

echo "== serving tests (real TorchServe; the handler on the GPU) =="
timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_serve.py tests/test_serve_explanations.py \
  -m "serve and not browser" | tail -5

echo "== one answer from the demo model, served: which device? =="
$PY - <<'EOF'
import sys, tempfile
from pathlib import Path
from serve.launch import TorchServe
from deepminer.client import Client
from deepminer.data.phantoms import render_phantom
import io, numpy as np
from PIL import Image
store = Path("model_store")
mars = {p.stem: p.name for p in sorted(store.glob("*.mar"))}
buf = io.BytesIO()
Image.fromarray(np.asarray(render_phantom(3, 1, size=1024).image).astype(np.uint16)).save(buf, format="PNG")
with TorchServe(store, mars, tempfile.mkdtemp(prefix="gpu-check-ts-"), profile="demo") as ts:
    for name in mars:
        with Client(ts.inference_url, model=name, timeout=120) as c:
            exp = c.explain(buf.getvalue(), max_side=1024)
        dev = exp.server.get("device", "?")
        print(f"gpu-check: {name}: answered on {dev}, prediction {exp.prediction}")
        if not str(dev).startswith("cuda"):
            sys.exit(f"gpu-check: {name} answered on {dev}, not on the GPU")
EOF

echo "== deepminer bench, cuda and cpu =="
models=()
for m in model_store/*/model.pt; do models+=(--model "$m"); done
$PY -m deepminer bench "${models[@]}" --device cuda --no-startup --repeats 5 --json > "$OUT/bench-cuda.json"
$PY -m deepminer bench "${models[@]}" --device cuda --no-startup --repeats 5
$PY -m deepminer bench --model model_store/demo/model.pt --device cpu --no-startup --no-eval --repeats 3
echo "gpu-check: done; copy the tables above into docs/bench.md (\"On a GPU\")"
