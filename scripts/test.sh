#!/usr/bin/env bash
# Lint and type-check (scripts/lint.sh), then run the whole suite (slow, serving and browser cases
# included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lint.sh
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
