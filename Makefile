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

demo: $(STAMP)
	$(BIN)/cola generate "The function returns" --max-new-tokens 64 --seed 0

test: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

# Rebuild the bundled checkpoint in demo/checkpoint from scratch. Stage 1 takes ~7 min on a
# 2-core CPU; stage 2 (batch 128) ~6 min on one H200 GPU, ~5 h on a 2-core CPU.
default-model: $(STAMP)
	$(BIN)/cola make-shards text --default-corpus --output data/stdlib
	$(BIN)/cola train --preset text-default --stage 1 --out runs/text-default-s1
	$(BIN)/cola train --preset text-default --stage 2 --init runs/text-default-s1/final \
		--out runs/text-default-s2 --set data.batch_size=128 --set optim.lr=1.5e-3 \
		--set optim.vae_lr_mult=0.3 --set stage2.steps=2200
	$(BIN)/cola export runs/text-default-s2/final demo/checkpoint --dtype bf16
	$(BIN)/cola eval text-vae --checkpoint demo/checkpoint --data data/stdlib/heldout
