# Set-up in two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This build machine has a CPU build of torch 2.13.0 on local disk; an unpinned torch would pull a multi-GB
# CUDA build. Users with a GPU override it: `make install TORCH_SPEC='torch>=2.5'`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

# On a CUDA machine: parity on the GPU (fp32, bf16), the compiled engine with CUDA graphs, benchmarks/generate.py at
# batch 32 and 128, in one table (GPU_CHECK_ARGS='--out gpu_check.txt' also writes it to a file). PyPI's
# torch==2.13.0 for Linux x86-64 is a CUDA build; for another CUDA version name its wheel and index, e.g.
# `PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 make gpu-check TORCH_SPEC='torch==2.13.0+cu126'`.
# Without a GPU, `$(BIN)/python benchmarks/gpu_check.py --device cpu --quick` is a smoke run of every section.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) demo_out
