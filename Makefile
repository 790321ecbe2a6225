# logitcache — one-command setup, demo and tests.
#   make demo   set up .venv, prepare the embedded teacher, capture RS-KD targets for the pydoc corpus, inspect
#   make test   set up .venv and run the whole test suite (unit + integration with the real SmolLM2 teacher)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first: a CPU build where one is provided (pip's find-links), so no CUDA wheels get pulled in
TORCH  ?= torch==2.13.0
EXTRAS ?= test,bench,zarr,s3
DEMO_OUT ?= cache/pydoc-rskd

.PHONY: setup demo test test-unit bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/logitcache capture --method sample --samples 50 --out $(DEMO_OUT)
	$(BIN)/logitcache verify $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python benchmarks/capture_speed.py --csv benchmarks/results/capture_speed.csv

clean:
	rm -rf $(VENV) cache .pytest_cache
