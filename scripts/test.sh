#!/usr/bin/env bash
# Lint and type-check (scripts/lint.sh), then run the whole suite (slow, serving and browser cases
# included) on two pytest-xdist workers: much of the suite waits on TorchServe, Streamlit and
# chromium, so two workers on two cores finish it in about two thirds of the time. Modules that share
# a session server stay in one worker (--dist loadgroup; tests/conftest.py). PYTEST_WORKERS=0 runs it
# in one process. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lint.sh
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadgroup "$@"
