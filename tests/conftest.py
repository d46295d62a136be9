"""Test configuration: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
fastsd (or fastsd.kernels) is imported by any test module.
"""
import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTSD_BACKEND", None)  # tests choose backends explicitly


def _inductor_cache_per_vector_isa():
    """torch.compile's on-disk graph cache (inductor, torch 2.14) keys a graph without the vector ISA
    its C++ code was generated for, which ATEN_CPU_CAPABILITY picks: a graph generated for AVX-512,
    served to a run with ATEN_CPU_CAPABILITY=avx2, is recompiled with 8-lane vectors for 16-lane
    loops (test_recipes' compile tests segfaulted; the other way round they computed a wrong
    permutation). Runs that set the capability get their own cache next to the default one."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if not cap or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # pragma: no cover - older torch: its default location
        import getpass
        import tempfile

        def default_cache_dir():
            return os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_isa_{cap.lower()}"


_inductor_cache_per_vector_isa()

import pytest  # noqa: E402
import torch  # noqa: E402

import fastsd  # noqa: E402
from fastsd import _backend, _ext  # noqa: E402


def _hypothesis_examples_from_the_strategies_only():
    """Hypothesis (6.131+) mixes into its draws literals harvested from every project module in
    sys.modules ("local constants"); which modules are loaded depends on which tests were collected
    and ran before, so a derandomized test drew other examples in full-suite order than alone
    (issue 11: test_kd_loss_matches_reference[cpp] failed in `make test` only). An empty pool makes
    every test's examples depend on its own strategies and settings alone (tests/test_fuzz.py::
    test_examples_do_not_depend_on_loaded_modules). A Hypothesis without the pool is left as it is."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - Hypothesis not installed or reorganised
        return
    if callable(getattr(providers, "_get_local_constants", None)) and hasattr(providers, "_local_constants"):
        empty = type(providers._local_constants)()
        providers._get_local_constants = lambda: empty


_hypothesis_examples_from_the_strategies_only()

# Backends that can run on this machine's CPU tensors (triton through the interpreter).
CPU_BACKENDS = [b for b in ("triton", "cpp", "torch") if not _backend.reasons("patch_swap", b, torch.empty(0))]
needs_cpp = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason=f"fastsd._C: {_ext.load_error()}")


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op threads set to n inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# The slowest files first, by their time in a run of the suite on two pytest-xdist workers here
# (2026-11-27, before each worker had one intra-op thread; seconds of the files' tests: test_fuzz
# 262, test_losses 241, test_aot 209, test_sass 157, test_patch_swap_triton 156, test_mix_triton 140,
# test_reliability 100, test_cuda_compile 81, test_mix 76, test_gpu_report 71, test_recipes 64, then
# under 45). The Makefile's pytest-xdist run
# hands whole files to the workers in this order (--dist loadfile --no-loadscope-reorder: xdist
# otherwise orders files by their number of tests, which put test_patch_swap_triton,
# test_reliability and test_recipes last), so the long ones start first instead of ending the run
# alone. test_aot comes first and test_sass fifth: with up to four workers (the Makefile's most),
# test_sass then starts on a worker once another file is done, mostly after test_aot, and reads the
# Triton cache its compiles filled instead of waiting on their lock. The other files keep their order.
SLOWEST_FIRST = ("test_aot.py", "test_fuzz.py", "test_losses.py", "test_patch_swap_triton.py", "test_sass.py",
                 "test_mix_triton.py", "test_reliability.py", "test_cuda_compile.py", "test_mix.py",
                 "test_gpu_report.py", "test_recipes.py", "test_loss_kernels.py", "test_ddp.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable


def pytest_report_header(config):
    return [f"fastsd backends runnable on CPU tensors here: {CPU_BACKENDS}",
            f"fastsd._C: {fastsd._ext.load_error() or 'loaded'}"]


class NoHostSync:
    """Patch the Python-level ways of reading a tensor's value on the host to raise inside the block
    (a host sync on a CUDA tensor stalls the GPU and breaks CUDA-graph capture)."""

    NAMES = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"]

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        self.saved_equal = torch.equal

        def boom(*a, **k):
            raise AssertionError("host synchronisation inside a fastsd op")

        for n in self.NAMES:
            setattr(torch.Tensor, n, boom)
        torch.equal = boom
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        torch.equal = self.saved_equal


def backward_tolerance(backend, dtype):
    """Tolerance of the patch swap backward (a gather plus, where two cells meet, one addition):
    exact on every backend. (The Triton interpreter converts fp32 to bf16 by truncation; the
    kernels round to nearest even there in integers, as a GPU's conversion does: kernels/patch_swap.py
    ``_round_to``.)"""
    return dict(rtol=0.0, atol=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device_asserts(monkeypatch):
    """The Triton interpreter running the kernels' ``tl.device_assert`` checks, as a GPU launch with
    debug=True does (fastsd's launchers pass it): the interpreter's builder has debug off, so it drops
    them otherwise. A failed assert raises (an InterpreterError naming the assert's message)."""
    import dataclasses

    if not _backend.triton_interpreting():
        pytest.skip("runs the Triton interpreter")
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
