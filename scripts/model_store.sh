#!/usr/bin/env bash
# Build what model_store/ needs from what is committed there (the .mar is built, never committed):
# model_store/demo.mar from model_store/demo/model.pt (+ model_store/demo/atlas/ when present).
# Rebuilt when the weights, the atlas, the handler or the library are newer than the archive.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=model_store/demo/model.pt
ATLAS=model_store/demo/atlas
MAR=model_store/demo.mar
# The demo atlas's reference images (its top-activating patches are rendered from them on demand):
# phantoms are byte-identical for the same arguments, so they are regenerated, never committed.
REF=var/demo-reference
if [ -f "$ATLAS/atlas.json" ] && [ ! -f "$REF/manifest.csv" ]; then
  echo "model-store: writing the demo atlas's reference phantoms to $REF"
  .venv/bin/python -m deepminer phantoms --out "$REF" --count 60 --seed 2 --size 512 --splits 0,0,1 --jobs 2
fi
if [ ! -f "$MODEL" ]; then
  echo "model-store: $MODEL not found yet; nothing to archive" >&2
  exit 0
fi
if [ -f "$MAR" ] && [ -z "$(find "$MODEL" handlers serve/model-config.yaml deepminer -newer "$MAR" -name '*' -type f \
      ! -path '*/__pycache__/*' 2>/dev/null | head -1)" ] && { [ ! -d "$ATLAS" ] || [ -z "$(find "$ATLAS" -newer "$MAR" -type f | head -1)" ]; }; then
  exit 0
fi
args=(archive --model "$MODEL" --name demo --out model_store)
[ -f "$ATLAS/atlas.json" ] && args+=(--atlas "$ATLAS")
echo "model-store: building $MAR"
.venv/bin/python -m deepminer "${args[@]}"
