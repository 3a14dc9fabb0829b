#!/usr/bin/env bash
# Run the whole suite (slow, serving and browser cases included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
