#!/usr/bin/env bash
# `make run`: build the model store if missing, start TorchServe + the Streamlit workbench from the
# Procfile (honcho), wait until both answer, print the URLs. Ctrl-C stops everything.
#   DEEPMINER_PROFILE=demo|lab   (lab: token authorization on; the UI reads var/serve/key_file.json;
#                                 nginx with TLS + sign-in on DEEPMINER_PROXY_PORT=8443, see docs/serving.md)
#   DEEPMINER_MODEL=demo         (the workbench's first pick; every model_store/<name>.mar is served)
#   DEEPMINER_UI_PORT=8501
set -euo pipefail
cd "$(dirname "$0")/.."
export DEEPMINER_PROFILE=${DEEPMINER_PROFILE:-demo}
export DEEPMINER_MODEL=${DEEPMINER_MODEL:-demo}
export DEEPMINER_UI_PORT=${DEEPMINER_UI_PORT:-8501}
PY=.venv/bin/python

bash scripts/model_store.sh
if [ ! -f "model_store/$DEEPMINER_MODEL.mar" ]; then
  echo "run: error: model_store/$DEEPMINER_MODEL.mar is missing and could not be built (no model_store/$DEEPMINER_MODEL/model.pt?)" >&2
  exit 1
fi
SERVED=$(for m in model_store/*/model.pt; do n=$(basename "$(dirname "$m")"); if [ -f "model_store/$n.mar" ]; then printf '%s ' "$n"; fi; done)
# the URL and key file the UI/CLI use, and a check that every port is free (one line if not)
ENVS=$($PY -m serve.launch env --profile "$DEEPMINER_PROFILE" --ui-port "$DEEPMINER_UI_PORT")
eval "$ENVS"

PROCS=(-c proxy=0)   # the sign-in proxy runs in the lab profile only
if [ "$DEEPMINER_PROFILE" = lab ]; then
  PROCS=()
  USERS=${DEEPMINER_USERS_FILE:-var/proxy/users}
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { echo "run: error: the lab profile needs nginx (bash scripts/setup.sh as root, or apt-get install nginx)" >&2; exit 1; }
  [ -s "$USERS" ] || { echo "run: error: nobody can sign in yet: add a user first (.venv/bin/deepminer users add NAME)" >&2; exit 1; }
fi
# a local PACS (Orthanc + DICOMweb on 127.0.0.1:$DEEPMINER_PACS_PORT, data under var/pacs) only with
# DEEPMINER_PACS=orthanc; DEEPMINER_DICOMWEB_URL names any other DICOMweb server (docs/serving.md)
if [ "${DEEPMINER_PACS:-}" = orthanc ]; then
  export DEEPMINER_DICOMWEB_URL=${DEEPMINER_DICOMWEB_URL:-http://127.0.0.1:${DEEPMINER_PACS_PORT:-8042}/dicom-web}
elif ((${#PROCS[@]})); then
  PROCS=(-c "${PROCS[1]},pacs=0")
else
  PROCS=(-c pacs=0)
fi
.venv/bin/honcho start -f Procfile "${PROCS[@]}" &
HONCHO=$!
stop() { trap - INT TERM; echo; echo "run: stopping"; kill -TERM "$HONCHO" 2>/dev/null || true; wait "$HONCHO" 2>/dev/null || true; exit 130; }
trap stop INT TERM

if $PY -m serve.launch wait --profile "$DEEPMINER_PROFILE" --ui-port "$DEEPMINER_UI_PORT" --timeout 300 --pid "$HONCHO"; then
  cat <<MSG

  DeepMiner Studio is running ($DEEPMINER_PROFILE profile, models: ${SERVED% }; default $DEEPMINER_MODEL)
    workbench   http://127.0.0.1:$DEEPMINER_UI_PORT${DEEPMINER_USER_HEADER:+   (lab: sign in at https://$(hostname -f 2>/dev/null || hostname):${DEEPMINER_PROXY_PORT:-8443}/, API under /api/)}
    inference   $DEEPMINER_SERVE_URL/predictions/<model>   (e.g. /predictions/$DEEPMINER_MODEL)
    models      $DEEPMINER_MANAGEMENT_URL/models
    metrics     $DEEPMINER_METRICS_URL/metrics${DEEPMINER_DICOMWEB_URL:+
    PACS        $DEEPMINER_DICOMWEB_URL   (DICOMweb; the Studies page)}
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
