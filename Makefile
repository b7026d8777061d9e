# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users install a CUDA build into .venv first (README).
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast test-kernels lint bench clean

$(BIN)/genattr: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[all,dev]"
	touch $(BIN)/genattr

setup: $(BIN)/genattr

demo: setup
	$(BIN)/genattr demo --out demo-out

test: setup
	$(BIN)/ruff check src tests benchmarks experiments scripts
	$(BIN)/ruff format --check src tests benchmarks experiments scripts
	$(BIN)/mypy
	$(BIN)/pytest

# The unit tests a developer runs after every change (under 2 minutes): everything not
# marked slow. `make test` (CI) stays the whole suite.
test-fast: setup
	$(BIN)/pytest -m "not slow" -q

# The suite under the default CPU kernels and a second family (scripts/test_kernel_families.sh).
test-kernels: setup
	scripts/test_kernel_families.sh

bench: setup
	$(BIN)/python benchmarks/eval_speed.py

clean:
	rm -rf $(VENV) demo-out
