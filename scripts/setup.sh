#!/usr/bin/env bash
# Set up everything `make run` / `make test` need, idempotently: system packages (as root), the
# .venv with the pinned requirements, and the project itself (editable). A second run is fast:
# it compares a stamp of requirements.txt + pyproject.toml + the --no-deps pins, and the system-package list.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
SYSTEM_PACKAGES=(chromium fonts-dejavu-core nginx)   # chromium: the real browser for the UI tests; nginx: the lab profile's proxy (serve/proxy.py)
# a local PACS (Orthanc + its DICOMweb plugin, run unprivileged by deepminer.pacs, never the system
# service) and dciodvfy (dicom3tools) that validates the DICOM results the tests write
SYSTEM_PACKAGES+=(orthanc orthanc-dicomweb dicom3tools)

need_apt=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages: ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: warning: missing system packages (${need_apt[*]}); install them as root for the browser tests" >&2
  fi
fi
command -v java >/dev/null || { echo "setup: error: TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

# the stamp also covers the --no-deps pins below (quantus: its opencv-python would clash with our headless build)
want=$(cat requirements.txt pyproject.toml <(grep '^"$VENV/bin/pip" .*--no-deps' scripts/setup.sh) | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "setup: installing pinned requirements into $VENV (first run takes a few minutes)"
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored" || true
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "quantus==0.6.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import deepminer, torch, torchvision, timm, pydicom; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "setup: error: the venv does not import (see above)" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: ready ($VENV)"
