"""Reliability of the ops: determinism across threads and calls, large tensors, memory, threads."""
import gc
import os
import threading

import pytest
import torch

import fastsd
from fastsd import reference as R
from fastsd.bench.cases import PATCH_SWAP_PARITY

from conftest import CPU_BACKENDS

COMPILED = [b for b in CPU_BACKENDS if b != "triton"]


def _swap_and_grad(backend, x, partner, mask, g):
    xr = x.clone().requires_grad_()
    with fastsd.use_backend(backend):
        out = fastsd.patch_swap(xr, partner, mask)
        out.backward(g)
    return out.detach(), xr.grad


@pytest.mark.parametrize("backend", COMPILED)
def test_bitwise_deterministic_across_threads_and_calls(backend):
    x, partner, mask = PATCH_SWAP_PARITY[0].make(torch.float32)
    perm = torch.randperm(x.shape[0])
    g = torch.randn(x.shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(_swap_and_grad(backend, x, perm, mask, g))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_deterministic_algorithms_mode_is_honoured():
    # every fastsd backend is deterministic (gathers, no atomics): auto still picks the fast one
    x, partner, mask = PATCH_SWAP_PARITY[0].make(torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = _swap_and_grad("auto", x, partner, mask, torch.ones_like(x))
        b = _swap_and_grad("auto", x, partner, mask, torch.ones_like(x))
        pairs = fastsd.intra_class_pairs(torch.randint(0, 3, (20,)), generator=torch.Generator().manual_seed(0))
        fastsd.patch_swap_mask(pairs, (4, 4), generator=torch.Generator().manual_seed(0))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_same_generator_state_same_result():
    labels = torch.randint(0, 5, (64,))
    x = torch.randn(64, 3, 16, 16)
    runs = [fastsd.intra_class_patch_swap(x, labels, generator=torch.Generator().manual_seed(11)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", COMPILED)
def test_two_python_threads_at_once(backend):
    cases = [c.make(torch.float32, seed=s) for s, c in enumerate(PATCH_SWAP_PARITY[:4])]
    expected = [R.patch_swap(*c) for c in cases]
    errors = []

    def worker(k):
        try:
            with fastsd.use_backend(backend):
                for _ in range(30):
                    for c, e in zip(cases, expected):
                        if not torch.equal(fastsd.patch_swap(*c), e):
                            errors.append(f"thread {k}: wrong answer")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the RSS")
@pytest.mark.parametrize("backend", COMPILED)
def test_no_memory_growth_over_1000_calls(backend):
    x, partner, mask = PATCH_SWAP_PARITY[0].make(torch.float32)
    g = torch.randn(x.shape)

    def call():
        xr = x.clone().requires_grad_()
        with fastsd.use_backend(backend):
            fastsd.patch_swap(xr, partner, mask).backward(g)

    for _ in range(100):  # warm up allocator caches
        call()
    gc.collect()
    before = _rss_bytes()
    for _ in range(1000):
        call()
    gc.collect()
    growth = _rss_bytes() - before
    # one call allocates ~ 4 x 10 KB; a leak of even one tensor a call would be > 10 MB here
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 calls"


@pytest.mark.slow
@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ backend is not built")
def test_more_than_2_to_31_elements_uint8_cpp():
    # 2 x 1 x 32769 x 32769 = 2,147,614,722 elements > 2**31 (4 GiB for x and the output)
    B, C, H, W = 2, 1, 32769, 32769
    assert B * C * H * W > 2**31
    x = torch.empty(B, C, H, W, dtype=torch.uint8)
    x[0].fill_(7)
    x[1].fill_(200)
    x[1, 0, -1, -7:] = torch.arange(7, dtype=torch.uint8)  # distinct values at the far end
    partner = torch.tensor([1, 0])
    mask = torch.zeros(B, 3, 4, dtype=torch.bool)
    mask[:, 2, 3] = True  # the last cell: rows >= 21846, cols >= 24577 (offsets past 2**31 in sample 1)
    mask[:, 0, 0] = True
    with fastsd.use_backend("cpp"):
        out = fastsd.patch_swap(x, partner, mask)
    r0, c0 = -(-2 * H // 3), -(-3 * W // 4)  # first row / col of cell (2, 3): ceil(k * H / gh)
    assert (r0 - 1) * 3 // H == 1 and r0 * 3 // H == 2 and (c0 - 1) * 4 // W == 2 and c0 * 4 // W == 3
    # sample 0 took the far corner of sample 1 (including the distinct values), the rest stayed
    assert torch.equal(out[0, 0, -1, -7:], torch.arange(7, dtype=torch.uint8))
    assert int(out[0, 0, r0:, c0:].min()) == 0 and int(out[0, 0, r0:, c0:-7].min()) == 200
    assert int(out[0, 0, r0 - 1, :].max()) == 7 and int(out[0, 0, :r0, c0:].max()) == 7
    assert int(out[1, 0, r0:, c0:].max()) == 7 and int(out[1, 0, :r0, c0:].min()) == 200
    assert int(out[0, 0, : H // 3, : W // 4].min()) == 200 and int(out[1, 0, : H // 3, : W // 4].max()) == 7
    # and against the reference, on the rows that hold the largest offsets
    del x
    expected_rows = torch.full((2, 1, 2, W), 0, dtype=torch.uint8)
    expected_rows[0], expected_rows[1] = 7, 200
    expected_rows[0, :, :, c0:], expected_rows[1, :, :, c0:] = 200, 7
    expected_rows[0, 0, -1, -7:] = torch.arange(7, dtype=torch.uint8)
    assert torch.equal(out[:, :, -2:], expected_rows)
