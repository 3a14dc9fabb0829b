# The two commands a newcomer needs: `make run` and `make test`. Both set everything up first.
.PHONY: setup run test test-fast lint model-store clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

model-store: setup
	@bash scripts/model_store.sh

run: setup model-store
	@bash scripts/run.sh

test: setup model-store
	@bash scripts/test.sh

# ruff + mypy only (make test runs them first)
lint: setup
	@bash scripts/lint.sh

# the suite without the slow / serving / browser cases, for quick iteration
test-fast: setup
	@$(PY) -m pytest -q -m "not slow and not serve and not browser"

clean:
	rm -rf build var test-artifacts model_store/*.mar
