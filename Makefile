# Two commands on a fresh machine: `make demo` (main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint default-model

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The Gradio demo on the bundled checkpoint: http://127.0.0.1:7860 (Ctrl-C stops it).
demo: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/cola demo

test: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

# Rebuild the bundled unified checkpoint in demo/checkpoint from scratch, on this machine's CPU
# (measured on the 2-core CPU: see README "The bundled model" for the times of each step).
SHAPES_DIFFICULTY ?= 2
default-model: $(STAMP)
	$(BIN)/cola make-shards text --default-corpus --output data/stdlib
	$(BIN)/cola make-shards shapes --n-train 20000 --n-heldout 500 \
		--difficulty $(SHAPES_DIFFICULTY) --output data/shapes
	$(BIN)/cola train --preset shapes-default --stage 1 --out runs/shapes-s1
	$(BIN)/cola train --preset shapes-default --stage 2 --init runs/shapes-s1/final \
		--out runs/shapes-s2
	$(BIN)/cola export runs/shapes-s2/final demo/checkpoint --dtype bf16 --force
	$(BIN)/cola eval all --checkpoint demo/checkpoint
