# fastopt: `make test` runs the tests, `make bench` the benchmark. Both create (or reuse) the
# virtualenv $(VENV), install what is missing, build the extension, and run.
#
# The venv sees the system's site-packages, so an installed torch is reused (e.g. a CUDA build on
# a GPU machine); torch==2.13.0 (a CPU build here) is installed only when none is importable.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton>=3.6,<3.10
PYTEST_ARGS ?=
BENCH_ARGS ?=

BUILD_STAMP := $(VENV)/.fastopt-built
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test bench build deps clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

deps: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@for mod in pytest numpy ninja setuptools wheel; do \
	  $(PY) -c "import $$mod" 2>/dev/null || missing="$$missing $$mod"; \
	done; \
	if [ -n "$$missing" ]; then $(PY) -m pip install -q $$missing; fi
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	@$(PY) -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda)"

$(BUILD_STAMP): $(SOURCES) | deps
	FASTOPT_REQUIRE_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p $(dir $@) && touch $@

build: deps $(BUILD_STAMP)

test: build
	FASTOPT_REQUIRE_EXT=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib \
	  || echo "matplotlib could not be installed: the benchmark runs without plots"
	$(PY) benchmarks/bench_optim.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastopt/_C*.so $(BUILD_STAMP)
