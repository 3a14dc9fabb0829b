#!/usr/bin/env bash
# Build what model_store/ needs from what is committed there (a .mar is built, never committed):
# model_store/<name>.mar for EVERY model_store/<name>/model.pt, with its atlas/ (when present) and
# every other file or folder next to it (MODEL_CARD.md, metrics.json, a domain.pt, ...: `deepminer
# archive --extra`). A .mar is rebuilt only when something in its folder, the handler, the per-model
# config or the library is newer than it. `make run` then serves every .mar of the store (scripts/serve.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=model_store
# The atlases' reference images (their top-activating patches are rendered from them on demand),
# shared by every model's atlas: phantoms are byte-identical for the same arguments, so they are
# regenerated, never committed. 1024 px: the scale the bundled models are served at, so a unit is
# profiled on lesions of the size it sees when it explains (the DeepMiner patches, 151 px, fed at 160).
REF=var/reference-1024
if compgen -G "$STORE/*/atlas/atlas.json" >/dev/null && [ ! -f "$REF/manifest.csv" ]; then
  echo "model-store: writing the atlases' reference phantoms to $REF"
  .venv/bin/python -m deepminer phantoms --out "$REF" --count 60 --seed 2 --size 1024 --splits 0,0,1 --jobs 2
fi

found=0
for MODEL in "$STORE"/*/model.pt; do
  [ -f "$MODEL" ] || continue
  found=1
  DIR=$(dirname "$MODEL")
  NAME=$(basename "$DIR")
  MAR=$STORE/$NAME.mar
  if [ -f "$MAR" ] && [ -z "$(find "$DIR" handlers serve/model-config.yaml deepminer -newer "$MAR" -type f \
        ! -path '*/__pycache__/*' ! -name '.*' 2>/dev/null | head -1)" ]; then
    continue  # up to date
  fi
  args=(archive --model "$MODEL" --name "$NAME" --out "$STORE")
  [ -f "$DIR/atlas/atlas.json" ] && args+=(--atlas "$DIR/atlas")
  for EXTRA in "$DIR"/*; do
    case "$(basename "$EXTRA")" in model.pt|atlas) continue ;; esac
    args+=(--extra "$EXTRA")
  done
  echo "model-store: building $MAR"
  .venv/bin/python -m deepminer "${args[@]}"
done
if [ "$found" = 0 ]; then
  echo "model-store: no $STORE/<name>/model.pt found yet; nothing to archive" >&2
fi
exit 0
