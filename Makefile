# mlx-dpo: `make train` runs the demo end to end; `make test` runs the suite. Both set up .venv.
# Real runs: make train MODEL=path/or/hf-id DATA=file/or/folder CACHE=cache-dir OUT=run-dir
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

DEMO   := .demo
MODEL  ?= $(DEMO)/model
DATA   ?= $(DEMO)/data
CACHE  ?= $(DEMO)/cache
OUT    ?= runs/demo
PRECOMPUTE_ARGS ?= --max-length 256
# Tuned for the demo: a random-init tiny Llama learns the preference within a minute or two.
TRAIN_ARGS ?= --iters 150 --batch-size 8 --learning-rate 1e-4 --warmup-steps 10 --steps-per-report 10 --steps-per-eval 50 --steps-per-save 50
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install demo precompute train test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The embedded default: built deterministically, offline, only when the default paths are used.
$(DEMO)/.built: $(VENV)/.installed src/mlx_dpo/demo.py
	$(BIN)/python -m mlx_dpo.demo $(DEMO)
	touch $@

demo: $(DEMO)/.built

precompute: $(VENV)/.installed $(if $(filter $(DEMO)/%,$(MODEL) $(DATA)),$(DEMO)/.built)
	$(BIN)/mlx-dpo precompute --model $(MODEL) --data $(DATA) --out $(CACHE) $(PRECOMPUTE_ARGS)

train: precompute
	$(BIN)/mlx-dpo train --cache $(CACHE) --model $(MODEL) --output $(OUT) $(TRAIN_ARGS) --overwrite

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Side-by-side benchmark (not part of `make test`): writes bench/results.{json,md}; ~15 min on 2 cores.
# Installs mlx-lm-lora into bench/.venv-peers on first use. BENCH_ARGS=--quick for a < 3 min check.
bench: $(VENV)/.test-installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests

clean:
	rm -rf $(DEMO) runs .pytest_cache
