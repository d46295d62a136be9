"""The CUDA patch swap kernel, run thread by thread on the CPU, against the reference.

csrc/cuda/patch_swap_kernel.cuh holds the kernel body and its launch plan without torch, so the same
code compiles for the host (tests/csrc/patch_swap_host.cpp, with a C++ compiler, a few seconds). The
host build runs every thread of the planned grid and checks each access the GPU would make: a vector
access aligned to its size (a GPU faults otherwise), inside its buffer, every output byte stored
exactly once. With tiny `target_threads` / `max_grid_y` the plan puts several rows and planes on a
thread and loops over samples, the paths large inputs take on a GPU. What this cannot see (the
launcher's guard and stream, real memory ordering) is for the `gpu` tests.
"""
import ctypes

import pytest
import torch

import fastsd
import host_kernels
from fastsd.reference.patch_swap import patch_swap as ref_forward, patch_swap_backward as ref_backward

DTYPES = {torch.uint8: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    return host_kernels.function(host_kernels.library(tmp_path_factory, "patch_swap_host.cpp"),
                                 "fastsd_patch_swap_host",
                                 [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
                                 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p])


def emulate(fn, x, partner, mask, backward, target_threads=1 << 18, max_grid_y=65535):
    """The launcher's steps (partner or its inverse, a new output in x's layout), then every thread."""
    channels_last = not x.is_contiguous()
    assert not channels_last or x.is_contiguous(memory_format=torch.channels_last)
    src = torch.argsort(partner) if backward else partner.contiguous()
    out = torch.empty_like(x)  # keeps x's layout
    out.untyped_storage().fill_(0xA5)  # stale bytes, as a new GPU tensor may hold
    info = torch.zeros(8, dtype=torch.int64)
    m = mask.to(torch.uint8).contiguous()
    B, C, H, W = x.shape
    rc = fn(DTYPES[x.dtype], int(backward), x.data_ptr(), out.data_ptr(), src.data_ptr(), m.data_ptr(),
            B, C, H, W, mask.shape[1], mask.shape[2], int(channels_last), target_threads, max_grid_y,
            info.data_ptr())
    assert rc == 0
    keys = ("vec", "grid_x", "grid_y", "rows_per_thread", "planes_per_thread", "plane_splits", "bad_accesses",
            "bytes_not_stored_once")
    return out, dict(zip(keys, info.tolist()))


def _inputs(dtype, shape, grid, channels_last, seed=0, offset=0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    n = B * C * H * W
    if dtype == torch.uint8:
        flat = torch.randint(0, 256, (n + offset,), generator=g, dtype=torch.uint8)
    else:  # signed values and exact zeros of both signs: the backward adds, the forward copies bits
        flat = torch.randn(n + offset, generator=g, dtype=torch.float64)
        flat[::7] = 0.0
        flat[3::7] = -0.0
        flat = flat.to(dtype)
    flat = flat[offset:]  # offset > 0: a data pointer that is not 16-byte aligned
    if channels_last:
        x = flat.view(B, H, W, C).permute(0, 3, 1, 2)
    else:
        x = flat.view(B, C, H, W)
    partner = torch.randperm(B, generator=g)
    mask = torch.rand(B, *grid, generator=g) < 0.5
    return x, partner, mask


def _reference(x, partner, mask, backward):
    return (ref_backward if backward else ref_forward)(x, partner, mask)


def _check(fn, x, partner, mask, backward, **plan):
    out, info = emulate(fn, x, partner, mask, backward, **plan)
    assert info["bad_accesses"] == 0, info
    assert info["bytes_not_stored_once"] == 0, info
    expected = _reference(x, partner, mask, backward)
    assert out.is_contiguous(memory_format=torch.channels_last) == (not x.is_contiguous())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    return info


CASES = [  # (shape, grid): rows of whole 16-byte vectors, cells across vectors, 1-pixel cells
    ((4, 3, 32, 32), (4, 4)),
    ((3, 3, 32, 32), (3, 5)),   # cell edges inside vectors
    ((2, 5, 12, 48), (12, 48)),  # one pixel per cell
    ((3, 2, 9, 16), (1, 1)),
    ((5, 4, 7, 7), (3, 2)),     # rows of 7: one element per thread
]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1][0]}x{c[1][1]}")
def test_kernel_matches_reference(host_kernel, dtype, channels_last, backward, case):
    shape, grid = case
    x, partner, mask = _inputs(dtype, shape, grid, channels_last)
    info = _check(host_kernel, x, partner, mask, backward)
    row_bytes = shape[3] * (shape[1] if channels_last else 1) * x.element_size()
    assert info["vec"] == (16 // x.element_size() if row_bytes % 16 == 0 else 1), info


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("grid", [(3, 5), (4, 4)], ids=["g3x5", "g4x4"])
def test_several_rows_and_planes_per_thread_and_samples_per_block_row(host_kernel, dtype, channels_last, backward,
                                                                        grid):
    # a small thread target: each thread walks rows (across cell rows, which 4 x 4 cells end exactly
    # on) and planes; a short grid.y makes blocks loop over samples
    x, partner, mask = _inputs(dtype, (7, 6, 20, 32), grid, channels_last, seed=1)
    info = _check(host_kernel, x, partner, mask, backward, target_threads=8, max_grid_y=3)
    assert info["rows_per_thread"] > 1 or info["planes_per_thread"] > 1, info
    assert info["grid_y"] == 3


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_unaligned_data_pointer_takes_the_scalar_kernel(host_kernel, dtype, backward):
    x, partner, mask = _inputs(dtype, (3, 3, 16, 32), (4, 4), False, offset=1)
    assert x.data_ptr() % 16 != 0
    info = _check(host_kernel, x, partner, mask, backward)
    assert info["vec"] == 1


def test_harness_sees_a_wrong_kernel(host_kernel):
    # the checks must be able to fail: a mask the kernel does not see gives a different answer
    x, partner, mask = _inputs(torch.float32, (4, 3, 16, 16), (4, 4), False)
    out, _ = emulate(host_kernel, x, partner, mask, False)
    assert not torch.equal(out, _reference(x, partner, ~mask, False))


def test_permutation_check_kernel_asserts_where_partner_is_no_permutation(tmp_path_factory):
    """The cuda backend's check kernel (permutation_check_thread), every thread of a launch: no assert
    for a permutation, one per row whose sorted value is off otherwise (duplicates, -1, B + 10**6),
    over more than one block of rows."""
    check = host_kernels.function(host_kernels.library(tmp_path_factory, "patch_swap_host.cpp"),
                                  "fastsd_permutation_check_host", [ctypes.c_void_p, ctypes.c_int64],
                                  restype=ctypes.c_int64)

    def fired(partner):
        s = torch.sort(partner.long()).values.contiguous()
        return check(s.data_ptr(), s.numel())

    B = 300
    g = torch.Generator().manual_seed(5)
    assert fired(torch.randperm(B, generator=g)) == 0 and fired(torch.arange(B - 1, -1, -1)) == 0
    assert fired(torch.zeros(0, dtype=torch.long)) == 0
    dup = torch.arange(B)
    dup[7] = 8  # sorted: ..., 6, 8, 8, 9, ...: row 7 is off
    assert fired(dup) == 1
    minus = torch.arange(B - 1, -1, -1)
    minus[0] = -1  # sorted: -1, 0, ..., B - 2: every row off
    assert fired(minus) == B
    big = torch.arange(B)
    big[B - 1] = B + 10 ** 6
    assert fired(big) == 1


def test_cuda_backend_checks_the_permutation_with_its_kernel(monkeypatch):
    # the Python wiring of the cuda backend, on CPU tensors with fastsd._C's ops recorded: a checked call
    # (eager, autograd, the registered op) sorts partner and runs the check kernel on the sorted values,
    # then the patch swap kernel, with no ATen compare; a fastsd._C without the check kernel falls back
    # to the ATen check; an involution from fastsd's own pairing is not checked
    import importlib

    from fastsd import _backend, _ext, _validate

    ps = importlib.import_module("fastsd.patch_swap")  # the module (fastsd.patch_swap is also the function)
    calls = []

    class Ops:
        def patch_swap_check(self, sorted_partner):
            calls.append(("check", sorted_partner.tolist()))

        def patch_swap(self, x, partner, mask):
            calls.append(("patch_swap",))
            return x.clone()

    select = _backend.select
    monkeypatch.setattr(_ext, "ops", lambda: Ops())
    monkeypatch.setattr(_validate, "kernel_asserts", lambda *tensors: True)
    monkeypatch.setattr(ps, "_has_cuda_kernel", lambda name: name == "patch_swap_check")
    monkeypatch.setattr(_backend, "select", lambda name, *t, **k: ps._patch_swap_cuda if name == "patch_swap"
                        else select(name, *t, **k))
    compares = []
    monkeypatch.setattr(ps, "assert_permutation", lambda *a: compares.append(a))
    x, mask = torch.randn(4, 3, 8, 8), torch.rand(4, 2, 2) < 0.5
    partner = torch.tensor([2, 0, 3, 1])
    fastsd.patch_swap(x, partner, mask)
    assert calls == [("check", [0, 1, 2, 3]), ("patch_swap",)] and not compares
    calls.clear()
    fastsd.patch_swap(x.clone().requires_grad_(), partner, mask)
    torch.ops.fastsd.patch_swap(x, partner, mask)
    assert [c[0] for c in calls] == ["check", "patch_swap", "check", "patch_swap"] and not compares
    calls.clear()
    monkeypatch.setattr(ps, "_has_cuda_kernel", lambda name: False)  # an older fastsd._C: the ATen check
    fastsd.patch_swap(x, partner, mask)
    assert calls == [("patch_swap",)] and len(compares) == 1


# --- the same kernels on a GPU (skipped without one, or without the CUDA kernels built) -------------

needs_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or fastsd._ext.load_error() is not None or not fastsd._ext.has_cuda(),
    reason="needs a CUDA device and fastsd._C built with its CUDA kernels")


def _on_gpu(x, partner, mask, backward, device="cuda"):
    op = torch.ops.fastsd_C.patch_swap_backward if backward else torch.ops.fastsd_C.patch_swap
    return op(x.to(device), partner.to(device), mask.to(device))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("case", CASES + [((64, 3, 224, 224), (3, 5)), ((256, 64, 8, 8), (2, 2))],
                         ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1][0]}x{c[1][1]}")
def test_gpu_kernel_matches_reference(dtype, channels_last, backward, case):
    shape, grid = case
    x, partner, mask = _inputs(dtype, shape, grid, channels_last)
    out = _on_gpu(x, partner, mask, backward)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out.cpu(), _reference(x, partner, mask, backward), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_kernel_runs_on_the_tensors_device_and_current_stream():
    x, partner, mask = _inputs(torch.float32, (8, 3, 32, 32), (4, 4), False)
    expected = _reference(x, partner, mask, False)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the launch follows the current stream, ordered after the copies
        out = _on_gpu(x, partner, mask, False)
    stream.synchronize()
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
    if torch.cuda.device_count() > 1:  # tensors on cuda:1 while cuda:0 is current
        with torch.cuda.device(0):
            out = _on_gpu(x, partner, mask, False, device="cuda:1")
        assert out.device == torch.device("cuda:1")
        torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
