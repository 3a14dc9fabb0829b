#!/usr/bin/env bash
# Lint and types (rules and file lists in pyproject.toml): ruff on the whole project, mypy on the
# library, the handler, the TorchServe tooling and the workbench's logic/state. Both must be clean.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "lint: ruff"
.venv/bin/ruff check --quiet .
echo "lint: mypy"
.venv/bin/mypy --no-error-summary
echo "lint: clean"
