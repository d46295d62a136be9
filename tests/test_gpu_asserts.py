"""On a GPU: the device-side value checks of the Triton path fire, with their messages.

On CUDA tensors the public functions leave their value checks to the kernels (``tl.device_assert``,
compiled in with debug=True): no host sync and a launch or none instead of a row of ATen ops
(tests/test_launches.py counts them). tests/test_mix_triton.py and friends run the same asserts under
the interpreter; here the compiled ones must trap. A device-side assert leaves the CUDA context
unusable, so each case runs in its own process (all at once): it must fail, and print the assert's
message (the device's printf) and PyTorch's "device-side assert triggered".
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_SETUP = """
import torch, fastsd, fastsd.mix as fm
B = 8
x = torch.randn(B, 3, 32, 32, device="cuda")
flip = torch.arange(B - 1, -1, -1, device="cuda")
boxes = torch.tensor([[4, 20, 6, 22]] * B, device="cuda")
lam = torch.full((B,), 0.5, device="cuda")
use_box = (torch.arange(B, device="cuda") % 2) == 0
mask = torch.rand(B, 4, 4, device="cuda") < 0.5
"""

CASES = {  # (the call, the assert's message)
    "mix lam": ("fm.mix(x, flip, boxes, lam + 1, use_box)", "lam must be in [0, 1]"),
    "mix boxes": ("fm.mix(x, flip, boxes + 20, lam, use_box)", "boxes must satisfy"),
    "mix partner": ("fm.mix(x, torch.zeros_like(flip), boxes, lam, use_box)", "partner must be a permutation"),
    "mix_ involution": ("fm.mix_(x, torch.tensor([1, 2, 0, 4, 3, 6, 5, 7], device='cuda'), boxes, lam, use_box)",
                        "partner must be an involution"),
    "patch_swap partner": ("fastsd.patch_swap(x, torch.zeros_like(flip), mask)", "partner must be a permutation"),
    # out of range(B): the message, not an illegal address (the kernels never read outside x)
    "patch_swap partner -1": ("fastsd.patch_swap(x, torch.where(flip == 0, -1, flip), mask)",
                              "partner must be a permutation"),
    "patch_swap partner + 10**6": ("fastsd.patch_swap(x, flip + 10**6, mask)", "partner must be a permutation"),
    "mix partner + 10**6": ("fm.mix(x, flip + 10**6, boxes, lam, use_box)", "partner must be a permutation"),
}
# The same checks on the CUDA C++ backend (its check kernel, csrc/cuda/mix_kernel.cuh), where fastsd._C
# has it: the backend of torch 2.4-2.7, whose Triton is too old
CUDA_CASES = {
    "cuda mix lam": ("fm.mix(x, flip, boxes, lam + 1, use_box)", "lam must be in [0, 1]"),
    "cuda mix boxes": ("fm.mix(x, flip, boxes + 20, lam, use_box)", "boxes must satisfy"),
    "cuda mix partner": ("fm.mix(x, torch.zeros_like(flip), boxes, lam, use_box)", "partner must be a permutation"),
    "cuda mix partner + 10**6": ("fm.mix(x, flip + 10**6, boxes, lam, use_box)", "partner must be a permutation"),
    "cuda mix_ involution": ("fm.mix_(x, torch.tensor([1, 2, 0, 4, 3, 6, 5, 7], device='cuda'), boxes, lam, use_box)",
                             "partner must be an involution"),
    # patch swap's check kernel (csrc/cuda/patch_swap_kernel.cuh, permutation_check_thread)
    "cuda patch_swap partner": ("fastsd.patch_swap(x, torch.zeros_like(flip), mask)", "partner must be a permutation"),
    "cuda patch_swap partner + 10**6": ("fastsd.patch_swap(x, flip + 10**6, mask)", "partner must be a permutation"),
}
# (each set forced through the environment, and the child checks which implementation it got: auto
# takes the CUDA C++ kernels of the mix op first where fastsd._C has them, fastsd._backend.
# CUDA_FIRST, and the Triton ones otherwise; their messages are the same)
_CHECK_CUDA = """
import importlib, fastsd._backend as _b
_op = importlib.import_module("{module}")
_fn = _b.select("{op}", {args})
assert getattr(_fn, "__wrapped__", _fn) is _op.{impl}, _fn
"""


def _triton_runs():
    from fastsd import _backend

    return not _backend.reasons("mix", "triton", torch.empty(0, device="cuda"))


def _has_cuda_kernels():
    from fastsd.mix import op

    return op._has_cuda_kernel("mix_check")  # a fastsd._C built with this version's CUDA mix kernels


@pytest.fixture(scope="module")
def outcomes():
    """Every case at once, each in its own process (about one process's start-up in all: the lease's
    test step has a time limit)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSD_BACKEND")}
    procs = {}
    cases = {**(CASES if _triton_runs() else {}), **(CUDA_CASES if _has_cuda_kernels() else {})}
    for case, (call, _) in cases.items():
        code = textwrap.dedent(_SETUP)
        if case in CUDA_CASES and "patch_swap" in case:
            code += _CHECK_CUDA.format(module="fastsd.patch_swap", op="patch_swap", args="x, flip, mask",
                                       impl="_patch_swap_cuda")
        elif case in CUDA_CASES:
            inplace = "fm.mix_(" in call
            code += _CHECK_CUDA.format(module="fastsd.mix.op", op="mix_" if inplace else "mix",
                                       args="x, flip, boxes, lam, use_box",
                                       impl="_mix_inplace_cuda" if inplace else "_mix_cuda")
        code += f"\nout = {call}\ntorch.cuda.synchronize()\nprint('SYNCED')\n"
        procs[case] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env={**env, "FASTSD_BACKEND": "cuda" if case in CUDA_CASES else "triton"},
                                       text=True)
    out = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[case] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", list(CASES) + list(CUDA_CASES))
def test_bad_values_trap_on_the_device(outcomes, case):
    if case in CUDA_CASES and not _has_cuda_kernels():
        pytest.skip("fastsd._C has no CUDA kernels")
    if case in CASES and not _triton_runs():
        pytest.skip("the Triton backend cannot run here")
    _, message = {**CASES, **CUDA_CASES}[case]
    returncode, stdout, stderr = outcomes[case]
    output = stdout + stderr
    # (the message check also rules out a process that failed for another reason, e.g. an import)
    assert returncode != 0 and "SYNCED" not in stdout, output[-3000:]
    assert message in output and "device-side assert" in output, output[-3000:]
