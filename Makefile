# The two commands: `make test` and `make bench`. Each creates .venv when missing, installs the
# pinned environment (the tested one, ../shared/VERIFYING.md) and the package, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PINS   := torch==2.14.1 torchvision==0.29.1 triton==3.8.0 numpy==2.4.6 pytest==9.2.0 \
          pytest-benchmark==5.3.1 ninja==1.13.2 hypothesis==6.170.15 tqdm==4.70.1 matplotlib==3.11.2 \
          scikit-learn==1.9.1 timm==1.0.31 kornia==0.9.0 pytest-xdist==3.8.0
# No pip cache: the wheels would be kept twice on disk (CI machines have little to spare).
# --no-compile: no .pyc of the ~11k modules installed (a minute of CPU here); Python writes those
# of the modules it imports, on first import.
PIP_FLAGS := --disable-pip-version-check -q --no-cache-dir --no-compile
# ...which needs Python allowed to write them: where PYTHONDONTWRITEBYTECODE is set (as in this
# machine's environment), every process, each test's subprocesses and pytest's assertion rewriting
# included, would compile torch and the rest from source again (3 s more a torch import here).
unexport PYTHONDONTWRITEBYTECODE
DEPS_STAMP := $(VENV)/.fastsd-deps
EXT_STAMP  := $(VENV)/.fastsd-ext
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp) \
        setup.py pyproject.toml
export CUDA_HOME ?= /usr/local/cuda

.PHONY: test test-avx2 test-triton-oldest bench bench-check gpu-report selftest readme-bench install clean
test: install
	$(PY) -m fastsd.selftest
	$(MAKE) --no-print-directory test-triton-oldest
	$(SCRATCH_ENV) $(PY) -m pytest -q -ra $(XDIST) -m "not serial" tests
	$(SCRATCH_ENV) $(PY) -m pytest -q -ra -m serial $(SERIAL_TESTS)
	$(MAKE) --no-print-directory test-avx2
	rm -rf $(SCRATCH)

# The test runs' compile caches (Triton's, Inductor's, the SASS report's) live in one scratch folder
# of the checkout, removed when `make test` passes, rather than in ~ and /tmp where they pile up run
# after run: CI machines have little disk to spare beside the pinned torch (about 6 GB).
# Those caches start cold, so the ahead-of-time compiles take two worker processes where the machine
# has two cores (tests/triton_tools.py; 158 s instead of 276 s for test_aot and test_sass here).
SCRATCH := $(VENV)/test-scratch
# The suite on pytest-xdist workers, one per core up to four (each holds torch and Triton, about 1
# GB), a test file to a worker (module fixtures, such as the AOT compiles, run once), the slowest
# files first (tests/conftest.py's order; --no-loadscope-reorder, or xdist orders files by their
# number of tests): 13.5 min in a fresh clone on this 2-core machine (2026-11-27).
# Each worker gets its share of the cores as torch's intra-op threads (OMP_NUM_THREADS unless you
# set it; one here): with torch's default, a thread per core in every worker, the workers' OpenMP
# threads spin-wait for each other's (tests/test_reliability.py alone on two workers here: 73 s of
# CPU in 45 s with the default, 33 s in 26 s with one thread each). tests/test_threads.py and the
# thread tests of test_losses and test_reliability split the C++ kernels' work over threads.
NPROC := $(shell nproc 2>/dev/null || echo 1)
TEST_WORKERS := $(shell [ $(NPROC) -gt 4 ] && echo 4 || echo $(NPROC))
TEST_THREADS := $(shell t=$$(($(NPROC) / $(TEST_WORKERS))); [ $$t -lt 1 ] && t=1; echo $$t)
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# Tests marked serial time the machine under a load they make themselves (a burst of processes on
# one CPU): another pytest-xdist worker beside them is a load they do not know of, which biased the
# bench method's self-check past its bound in one CI run (3.48 for a true 3, 2026-11-27). They run
# after the parallel suite, alone; their files are listed here.
SERIAL_TESTS := tests/test_bench_method.py
AOT_WORKERS := $(shell [ $(NPROC) -ge 2 ] && echo 2 || echo 1)
SCRATCH_ENV = TRITON_CACHE_DIR=$(CURDIR)/$(SCRATCH)/triton FASTSD_CACHE_DIR=$(CURDIR)/$(SCRATCH)/fastsd \
              TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(SCRATCH)/inductor$(1) FASTSD_AOT_WORKERS=$(AOT_WORKERS) \
              OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TEST_THREADS)}

# The parity checks again on PyTorch's and fastsd's AVX2 paths (ATEN_CPU_CAPABILITY caps both;
# FASTSD_CPU_CAPABILITY fastsd's alone): their tolerances measure torch's own error, which changes
# with the vector path, so an AVX-512 machine checks here what an AVX2-only one runs. The compiled
# backends only (the Triton interpreter does not use either path); fastsd.mix's and patch swap's bit-exact parity
# catches a vector path that rounds differently (an FMA contraction). Not the tests that start
# processes of their own with their own caps or none (what the suite ran already, again).
# Where the suite ran on the AVX2 paths already (PyTorch's and fastsd's in use are AVX2: a CPU with
# nothing wider), the rerun would run the same paths again: skipped, saying so. The probe prints
# "same" or "other"; anything else (it failed) stops make test.
AVX2 := ATEN_CPU_CAPABILITY=avx2 FASTSD_CPU_CAPABILITY=avx2
AVX2_SKIP := triton or instruction_sets or capability_bad_value or per_vector_isa or import_is_light
AVX2_PROBE := import torch, fastsd._ext as e; \
    ours = e.ops().cpu_capability()[0] if e.load_error() is None else "avx2"; \
    print("same" if torch.backends.cpu.get_cpu_capability() == "AVX2" and ours == "avx2" else "other")
test-avx2: install
	@paths=$$($(PY) -c '$(AVX2_PROBE)') || exit 1; \
	case "$$paths" in \
	    same) echo "test-avx2: SKIPPED: the suite ran on PyTorch's and fastsd's AVX2 paths already (nothing wider in use on this CPU)";; \
	    other) $(MAKE) --no-print-directory avx2-run;; \
	    *) echo "test-avx2: the probe of the vector paths in use printed '$$paths'"; exit 1;; \
	esac

.PHONY: avx2-run
avx2-run: install
	$(AVX2) $(PY) -m fastsd.selftest
	$(AVX2) $(call SCRATCH_ENV,_avx2) $(PY) -m pytest -q -ra $(XDIST) -k "not ($(AVX2_SKIP))" tests/test_losses.py tests/test_fuzz.py tests/test_mix.py tests/test_patch_swap.py

# The Triton backend is offered from fastsd._backend.TRITON_MIN_VERSION on (torch 2.8 ships 3.4):
# for sm_90, the specs that between them show every element type and every code-path constexpr of
# each kernel (tests/triton_tools.py, code_path_specs), and one spec of each kernel with its integer
# arguments equal to 1 (constexprs under the JIT), compiled by that release, installed beside the
# pinned one for the run (0.65 GB) and removed after it. The pinned Triton compiles every spec for
# sm_90 in the suite (and reads its SASS).
# Skipped, saying so, where the disk has less than OLDEST_MIN_MB free.
TRITON_OLDEST := $(SCRATCH)/triton-oldest
OLDEST_MIN_MB := 1500
test-triton-oldest: install
	@mkdir -p $(SCRATCH); free=$$(df -Pk $(SCRATCH) | awk 'NR == 2 {print int($$4 / 1024)}'); \
	if [ "$$free" -lt $(OLDEST_MIN_MB) ]; then \
	    echo "test-triton-oldest: SKIPPED: $$free MB free on disk, $(OLDEST_MIN_MB) MB needed to install the oldest Triton beside the pinned one"; \
	else $(MAKE) --no-print-directory triton-oldest-run; fi

.PHONY: triton-oldest-run
triton-oldest-run:
	$(PIP) install $(PIP_FLAGS) --no-deps --target $(TRITON_OLDEST) \
	    "triton==$$($(PY) -c 'from fastsd._backend import TRITON_OLDEST_TESTED as v; print(v)')"
	PYTHONPATH=$(TRITON_OLDEST) $(PY) -c "import triton, fastsd._backend as b; assert triton.__version__ == b.TRITON_OLDEST_TESTED, triton.__version__; print('triton', triton.__version__)"
	PYTHONPATH=$(TRITON_OLDEST) FASTSD_AOT_ARCHS=90:paths $(call SCRATCH_ENV,_oldest) $(PY) -m pytest -q -ra -p no:cacheprovider tests/test_aot.py
	rm -rf $(TRITON_OLDEST) $(SCRATCH)/triton

bench: install
	$(PY) -m fastsd.bench --quick

# Regenerate the README's benchmark section from a run on this machine (no hand-edited numbers).
readme-bench: install
	$(PY) -m fastsd.bench --quick --readme README.md

# This checkout's fastsd speedups against the README's run (its report, kept by readme-bench in
# docs/bench/), decided on the intervals: exit 1 where one is wholly more than 1.1x below the README's.
# Meaningful on the machine that made the README's run.
bench-check: install
	$(PY) -m fastsd.bench --quick --no-plots --no-traffic --compare docs/bench/bench-cpu.json

selftest: install
	$(PY) -m fastsd.selftest

# For the day a GPU is lent: the gpu-marked tests, the CUDA bench, and per kernel the measured time
# and bandwidth beside the compiled-code model's prediction, in one JSON file.
gpu-report: install
	$(PY) -m fastsd.bench.gpu_report --json bench-results/gpu-report.json

install: $(EXT_STAMP)

$(DEPS_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) $(PINS)
	touch $@

# --no-build-isolation: build fastsd._C against the torch just installed (not a second copy).
$(EXT_STAMP): $(DEPS_STAMP) $(CSRC)
	$(PIP) install $(PIP_FLAGS) --no-build-isolation -e .
	$(PY) -m fastsd.info --short
	touch $@

clean:
	rm -rf build *.egg-info fastsd/_C*.so fastsd/_build_log.txt $(EXT_STAMP)

# Regenerate the README's accuracy section (examples/sweep.py: 5 seeds x 3 settings x the patch-swap
# arguments, one torch thread per run; runs cached in docs/recipes/sweep.json under a fingerprint of
# their code are kept, the others run again).
.PHONY: readme-accuracy
readme-accuracy: install
	$(PY) examples/sweep.py --readme README.md
