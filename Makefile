# fastopt: `make test` runs the tests, `make bench` the benchmark. Both create (or reuse) the
# virtualenv $(VENV), install what is missing, build the extension, and run.
#
# The venv sees the packages of $(PYTHON), so an installed torch is reused (e.g. a CUDA build on a
# GPU machine); torch==2.13.0 (a CPU build here) is installed only when none is importable.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton>=3.6,<3.10
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the suite is mostly single-threaded work, so 2 halves its time on
# a 2-core machine; PYTEST_JOBS=0 runs it in this process (e.g. under a debugger).
PYTEST_JOBS ?= 2
# Without a GPU, the triton backend's tests run in Triton's interpreter, three quarters of the
# suite's time: `sample` runs one triton case per test function (tests/conftest.py; CI's second
# environment too, with the GPU machine's Triton), `half` about half of them, `full` all; a GPU
# runs all.
TRITON_MATRIX ?= sample
# A test that hangs fails on its own after TEST_TIMEOUT seconds (pytest-timeout, thread method:
# every thread's stack is printed and the test process ends; pytest-xdist names the test), rather
# than holding the whole run until CI's limit. The slowest test takes about 30 s here.
TEST_TIMEOUT ?= 600
TIMEOUT_ARGS := --timeout=$(TEST_TIMEOUT) --timeout-method=thread
BENCH_ARGS ?=

BUILD_STAMP := $(VENV)/.fastopt-built
SOURCES := setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*/*.cpp csrc/*/*/*.h \
  csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test test-capabilities bench build deps test-deps clean cuda-check asan

# The venv sees the packages of the interpreter that made it, even when that interpreter is itself
# a venv (as on the GPU machines, where torch lives in one): --system-site-packages alone would
# only show the base installation's.
$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "import site; print('\n'.join(site.getsitepackages()))" > \
	  "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_fastopt_parent.pth"

deps: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@for dep in pytest xdist:pytest-xdist pytest_timeout:pytest-timeout numpy ninja cmake setuptools wheel packaging \
	  expecttest; do \
	  $(PY) -c "import $${dep%%:*}" 2>/dev/null || missing="$$missing $${dep#*:}"; \
	done; \
	if [ -n "$$missing" ]; then $(PY) -m pip install -q $$missing; fi
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	@$(PY) -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda)"

$(BUILD_STAMP): $(SOURCES) | deps
	FASTOPT_REQUIRE_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p $(dir $@) && touch $@

build: deps $(BUILD_STAMP)

# What the example (examples/train_resnet.py) and the framework tests (tests/test_integrations.py)
# need, beyond the build's deps: `make test` installs them and requires them
# (FASTOPT_REQUIRE_INTEGRATIONS=1: their tests fail instead of skipping when one is missing).
# The versions are the ones the tests were written against; the installed torch is kept.
TEST_DEPS ?= sklearn:scikit-learn matplotlib:matplotlib tqdm:tqdm lightning:lightning==2.6.6 \
  transformers:transformers==5.24.0 accelerate:accelerate==1.15.0
test-deps: deps
	@for dep in $(TEST_DEPS); do \
	  $(PY) -c "import $${dep%%:*}" 2>/dev/null || missing="$$missing $${dep#*:}"; \
	done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; $(PY) -m pip install -q $$missing; fi

test: build cuda-check test-deps
	FASTOPT_REQUIRE_EXT=1 FASTOPT_REQUIRE_INTEGRATIONS=1 FASTOPT_TRITON_MATRIX=$(TRITON_MATRIX) $(PY) -m pytest -q \
	  $(if $(filter-out 0,$(PYTEST_JOBS)),-n $(PYTEST_JOBS)) $(TIMEOUT_ARGS) $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-capabilities

# test-capabilities: the cpu backend's optimizer, numerics and BatchNorm+ReLU tests once more with
# each other build of the CPU kernels this CPU runs (FASTOPT_CPU_CAPABILITY; the suite above ran the
# best one, the default choice).
CAPABILITY_TESTS ?= tests/test_optim.py tests/test_numerics.py tests/test_batch_norm_relu.py tests/test_clipping.py \
  tests/test_multi_tensor.py tests/test_master_weights.py tests/test_amp.py tests/test_fuzz.py tests/test_failed_step.py \
  tests/test_cpu_capability.py
test-capabilities: build
	@levels=$$($(PY) -c "import fastopt; print(' '.join(fastopt.cpu_capabilities()[:-1]))"); \
	for level in $$levels; do \
	  echo "== the cpu tests with FASTOPT_CPU_CAPABILITY=$$level"; \
	  FASTOPT_CPU_CAPABILITY=$$level FASTOPT_REQUIRE_EXT=1 $(PY) -m pytest -q -p no:cacheprovider \
	    $(if $(filter-out 0,$(PYTEST_JOBS)),-n $(PYTEST_JOBS)) $(TIMEOUT_ARGS) -k "cpu and not triton" $(CAPABILITY_TESTS) || exit 1; \
	done

# cuda-check: every .cu file compiled by nvcc for the distributable CUDA architectures (Note [CUDA
# architectures], CMakeLists.txt), warnings as errors, on a machine without a GPU or a CUDA build of
# torch, plus the CUDA plans' bindings (csrc/bindings/plans.cpp): CMakeLists.txt's FASTOPT_CUDA_CHECK configuration.
# Skipped without nvcc.
NVCC ?= nvcc
CUDA_CHECK_DIR ?= build/cuda-check

cuda-check: deps
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	  $(VENV)/bin/cmake -S . -B $(CUDA_CHECK_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	    -DPython_EXECUTABLE=$(abspath $(PY)) -DFASTOPT_CUDA_CHECK=ON -DCMAKE_CUDA_COMPILER=$$(command -v $(NVCC)) \
	    >$(CUDA_CHECK_DIR).log 2>&1 || { cat $(CUDA_CHECK_DIR).log; exit 1; }; \
	  grep "CUDA architectures" $(CUDA_CHECK_DIR).log; \
	  $(VENV)/bin/cmake --build $(CUDA_CHECK_DIR) -j2; \
	else echo "cuda-check: no nvcc on this machine, CUDA sources not compiled"; fi

# The peers the low-precision rows are timed against (issue 27), where they install: torch-optimi
# (pure PyTorch, kahan_sum) and torchao (_AdamW(bf16_stochastic_round=True)); --no-deps keeps the
# installed torch. A peer that is missing is reported as skipped in the results, not an error.
BENCH_PEERS ?= optimi:torch-optimi==0.3.3 torchao:torchao==0.18.0
bench: build
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib \
	  || echo "matplotlib could not be installed: the benchmark runs without plots"
	@for dep in $(BENCH_PEERS); do \
	  $(PY) -c "import $${dep%%:*}" 2>/dev/null || $(PY) -m pip install -q --no-deps "$${dep#*:}" \
	    || echo "$${dep#*:} could not be installed: its rows are reported as skipped"; \
	done
	$(PY) benchmarks/bench_optim.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_bn_relu.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_resnet.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_fsdp.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastopt/_C*.so $(BUILD_STAMP)

# asan: the C++ part built with AddressSanitizer into $(ASAN_DIR) (a copy of the package; the
# in-place build is left alone), then the fuzz test (more sequences than in `make test`) and the
# tests that throw through the compiled code run against it, with libasan preloaded into Python
# (and libstdc++ with it: python itself does not link it, and ASan's interception of C++ throws
# needs it loaded from the start, or the first exception torch throws aborts the process).
# Any ASan report fails the run (halt_on_error). Leak checks are off: CPython and torch keep
# allocations alive until exit by design.
ASAN_DIR ?= build/asan
ASAN_SEQUENCES ?= 150
ASAN_TESTS ?= tests/test_fuzz.py tests/test_failed_step.py tests/test_ops.py tests/test_plan_life_cycle.py
asan: deps
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	cp -r setup.py CMakeLists.txt pyproject.toml README.md csrc triton_kernels $(ASAN_DIR)/
	cp -r fastopt $(ASAN_DIR)/ && rm -rf $(ASAN_DIR)/fastopt/_C*.so
	cd $(ASAN_DIR) && FASTOPT_SANITIZE=address FASTOPT_REQUIRE_EXT=1 MAX_JOBS=2 \
	  $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(ASAN_DIR) && LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	  FASTOPT_EXPECT_ASAN=1 FASTOPT_FUZZ_SEQUENCES=$(ASAN_SEQUENCES) FASTOPT_REQUIRE_EXT=1 \
	  $(abspath $(PY)) -m pytest -q -p no:cacheprovider -p no:xdist -k "not triton and not cuda" \
	  --rootdir $(CURDIR) -c $(CURDIR)/pyproject.toml $(addprefix $(CURDIR)/,$(ASAN_TESTS))
