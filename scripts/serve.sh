#!/usr/bin/env bash
# TorchServe in the foreground (the `serve` process of the Procfile) with the profile named by
# DEEPMINER_PROFILE (demo: serve/config.properties, token auth off; lab: serve/config.lab.properties,
# token auth on). Works from var/serve/: TorchServe writes key_file.json, logs/ and its pid file there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILE=${DEEPMINER_PROFILE:-demo}
case "$PROFILE" in
  demo) CONFIG=$ROOT/serve/config.properties ;;
  lab)  CONFIG=$ROOT/serve/config.lab.properties ;;
  *)    echo "serve: error: DEEPMINER_PROFILE must be demo or lab, got '$PROFILE'" >&2; exit 2 ;;
esac
MODEL=${DEEPMINER_MODEL:-demo}
STORE=$ROOT/model_store
[ -f "$STORE/$MODEL.mar" ] || { echo "serve: error: $STORE/$MODEL.mar missing (run: make model-store)" >&2; exit 2; }
# every model of the store (model_store/<name>/model.pt with its built <name>.mar), one worker each
# (serve/model-config.yaml); the workers share the cores: torch threads per worker = cores / models
# (at least 1) unless OMP_NUM_THREADS is set (docs/serving.md, "Several models on one machine")
MODELS=()
for mar in "$STORE"/*/model.pt; do
  name=$(basename "$(dirname "$mar")")
  if [ -f "$STORE/$name.mar" ]; then MODELS+=("$name=$name.mar"); fi
done
[[ " ${MODELS[*]} " == *" $MODEL=$MODEL.mar "* ]] || MODELS+=("$MODEL=$MODEL.mar")
THREADS=$(( $(nproc) / ${#MODELS[@]} ))
# each archive again as the model's heavy pool (deepminer.client.HEAVY_SUFFIX): its own worker for
# /explanations (peer saliency) and set evaluations, so /predictions never waits behind them
# (DEEPMINER_HEAVY_POOL=0: none; docs/serving.md "Deploying in a lab")
if [ "${DEEPMINER_HEAVY_POOL:-1}" != 0 ]; then
  for m in "${MODELS[@]}"; do MODELS+=("${m%%=*}-heavy=${m#*=}"); done
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}
# OpenMP threads sleep between parallel regions instead of spinning: the cores are shared with the other
# workers and the workbench (docs/serving.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# long jobs (/explanations): the workers write progress to this file and read cancels from it; the
# workbench reads and writes the same one (deepminer.jobs, docs/serving.md "Long jobs")
export DEEPMINER_JOBS=${DEEPMINER_JOBS:-$ROOT/var/jobs.sqlite}
command -v java >/dev/null || { echo "serve: error: TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 2; }
WORK=$ROOT/var/serve
mkdir -p "$WORK/tmp"
cd "$WORK"
# a private TMPDIR keeps TorchServe's pid file and worker sockets apart from any other instance
export TMPDIR=$WORK/tmp TEMP=$WORK/tmp LOG_LOCATION=$WORK/logs METRICS_LOCATION=$WORK/logs
rm -f key_file.json
# serve/log4j2.xml: TorchServe's log files under var/serve/logs, only warnings on the console
exec "$ROOT/.venv/bin/torchserve" --foreground --ncs --ts-config "$CONFIG" --model-store "$STORE" \
  --models "${MODELS[@]}" --log-config "$ROOT/serve/log4j2.xml"
