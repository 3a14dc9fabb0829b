#!/usr/bin/env bash
# `make run`: build the model store if missing, start TorchServe + the Streamlit workbench from the
# Procfile (honcho), wait until both answer, print the URLs. Ctrl-C stops everything.
#   DEEPMINER_PROFILE=demo|lab   (lab: token authorization on; the UI reads var/serve/key_file.json)
#   DEEPMINER_MODEL=demo         (model_store/<name>.mar)      DEEPMINER_UI_PORT=8501
set -euo pipefail
cd "$(dirname "$0")/.."
export DEEPMINER_PROFILE=${DEEPMINER_PROFILE:-demo}
export DEEPMINER_MODEL=${DEEPMINER_MODEL:-demo}
export DEEPMINER_UI_PORT=${DEEPMINER_UI_PORT:-8501}
PY=.venv/bin/python

bash scripts/model_store.sh
if [ ! -f "model_store/$DEEPMINER_MODEL.mar" ]; then
  echo "run: error: model_store/$DEEPMINER_MODEL.mar is missing and could not be built (no model_store/demo/model.pt?)" >&2
  exit 1
fi
# the URL and key file the UI/CLI use, and a check that every port is free (one line if not)
ENVS=$($PY -m serve.launch env --profile "$DEEPMINER_PROFILE" --ui-port "$DEEPMINER_UI_PORT")
eval "$ENVS"

.venv/bin/honcho start -f Procfile &
HONCHO=$!
stop() { trap - INT TERM; echo; echo "run: stopping"; kill -TERM "$HONCHO" 2>/dev/null || true; wait "$HONCHO" 2>/dev/null || true; exit 130; }
trap stop INT TERM

if $PY -m serve.launch wait --profile "$DEEPMINER_PROFILE" --ui-port "$DEEPMINER_UI_PORT" --timeout 300 --pid "$HONCHO"; then
  cat <<MSG

  DeepMiner Studio is running ($DEEPMINER_PROFILE profile, model $DEEPMINER_MODEL)
    workbench   http://127.0.0.1:$DEEPMINER_UI_PORT
    inference   $DEEPMINER_SERVE_URL/predictions/$DEEPMINER_MODEL
    metrics     $DEEPMINER_METRICS_URL/metrics
  Press Ctrl-C to stop.

MSG
else
  echo "run: error: the services did not come up (see the log above and var/serve/logs/)" >&2
  kill -TERM "$HONCHO" 2>/dev/null || true
  wait "$HONCHO" 2>/dev/null || true
  exit 1
fi
set +e
wait "$HONCHO"
status=$?
trap - INT TERM
exit $status
