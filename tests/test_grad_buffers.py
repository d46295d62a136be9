"""Gradient buffers: the losses' backward and the C++ kernels' huge-page output buffers.

A loss op saves the gradient it computed in the forward; its backward multiplies it by grad_output,
in place when autograd frees the graph after that backward, else into a new tensor (scale_grad).
scale_grad is torch's multiply on every backend; the C++ one writes into a buffer from
fastsd::cpu::empty (csrc/cpu/alloc.h), which is 2 MiB aligned and madvise(MADV_HUGEPAGE)'d when
it holds more than 32 MiB. Tests: in place exactly when safe (retain_graph and create_graph give
the same gradients twice), bitwise parity of scale_grad with the torch multiply, opcheck, the
alignment of large outputs of every C++ op that makes one, and that the profiler (the bench's CPU
peak-memory column) sees those buffers.
"""
import os
import sys

import pytest
import torch

import fastsd
from fastsd import _backend, _ext

from conftest import CPU_BACKENDS, needs_cpp

HUGE = 2 << 20
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cases(dtype):
    gen = torch.Generator().manual_seed(0)
    grad2 = torch.randn(37, 11, generator=gen).to(dtype)
    flat = torch.randn(5 * 7 * 3 + 13 + 1, generator=gen).to(dtype)
    return [
        ("scalar", grad2, torch.tensor(0.37), []),
        ("scalar of another dtype", flat, torch.tensor(-2.5, dtype=torch.float64), []),
        ("per row", grad2, torch.randn(37, generator=gen), []),
        ("per segment", flat, torch.randn(3, generator=gen), [105, 118, 119]),
        ("empty segment", flat, torch.randn(3, generator=gen), [105, 105, 119]),
    ]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_cpp_is_torch_multiply_bitwise(dtype):
    for name, grad, scale, ends in _cases(dtype):
        want = _backend._REGISTRY["scale_grad"]["torch"].fn(grad, scale, ends)
        if not ends:  # the plain formula the torch backend stands for
            s = scale.to(dtype)
            torch.testing.assert_close(want, grad * (s if s.dim() == 0 else s[:, None]), rtol=0, atol=0)
        got = _backend._REGISTRY["scale_grad"]["cpp"].fn(grad, scale, ends)
        assert got.dtype == dtype and got.shape == grad.shape, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_scale_grad_per_segment_formula():
    flat = torch.arange(6.0)
    got = _backend._REGISTRY["scale_grad"]["torch"].fn(flat, torch.tensor([2.0, -1.0]), [2, 6])
    assert got.tolist() == [0.0, 2.0, -2.0, -3.0, -4.0, -5.0]


@needs_cpp
def test_scale_grad_opcheck():  # the C++ op's Meta kernel is what torch.compile traces
    for _name, grad, scale, ends in _cases(torch.float32):
        torch.library.opcheck(torch.ops.fastsd_C.scale_grad.default, (grad, scale, ends))


# --- in place exactly when autograd frees the graph -------------------------------------------------------


def _loss_cases():
    """name -> fn(gen) -> (inputs that require grad, loss fn of no arguments, grad_output)."""
    def pair(gen):
        z = torch.randn(7, 13, generator=gen, requires_grad=True)
        y = torch.tensor([0, 0, 1, 1, 2, -100, 2])
        p = fastsd.intra_class_pairs(y.clamp(min=0), generator=gen)
        return [z], lambda: fastsd.pair_kd_loss(z, y, p, temperature=2.0), torch.tensor(3.0)

    def kd(gen):
        s, t = torch.randn(5, 11, generator=gen, requires_grad=True), torch.randn(5, 11, generator=gen)
        return [s], lambda: fastsd.kd_loss(s, t, reduction="none"), torch.randn(5, generator=gen)

    def features(reduction):
        def make(gen):
            s = [torch.randn(3, 4, 5, generator=gen, requires_grad=True),
                 torch.randn(2, 6, generator=gen, requires_grad=True)]
            t = [torch.randn(3, 4, 5, generator=gen), torch.randn(2, 6, generator=gen)]
            g = torch.randn(2, generator=gen) if reduction == "none" else torch.tensor(-1.5)
            return s, lambda: fastsd.feature_alignment_loss(s, t, reduction=reduction), g
        return make

    return {"pair_kd_loss": pair, "kd_loss per row": kd, "feature_alignment_loss": features("mean"),
            "feature_alignment_loss per layer": features("none")}


def _saved_gradient(loss_fn):
    """The loss, and the gradient buffer its op saved for the backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    assert len(saved) == 1
    return loss, saved[0]


def _shares(grads, buffer):
    return [g.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for g in grads]


@pytest.mark.parametrize("case", list(_loss_cases()))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_scales_in_place_only_when_the_graph_is_freed(backend, case):
    xs, loss_fn, g_out = _loss_cases()[case](torch.Generator().manual_seed(0))
    with fastsd.use_backend(backend):
        # retain_graph: two backward passes through one graph, each gets the same gradients
        loss, buffer = _saved_gradient(loss_fn)
        kept = buffer.clone()
        first = torch.autograd.grad(loss, xs, g_out, retain_graph=True)
        assert not any(_shares(first, buffer)) and torch.equal(buffer, kept)
        second = torch.autograd.grad(loss, xs, g_out)  # the last one: in place
        assert all(_shares(second, buffer))
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # create_graph keeps the graph too
        loss, buffer = _saved_gradient(loss_fn)
        created = torch.autograd.grad(loss, xs, g_out, create_graph=True)
        assert not any(_shares(created, buffer)) and torch.equal(buffer, kept)
        for a, b in zip(created, first):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # a plain backward into .grad
        loss = loss_fn()
        loss.backward(g_out)
        for x, b in zip(xs, first):
            torch.testing.assert_close(x.grad, b, rtol=0, atol=0)


# --- huge-page buffers --------------------------------------------------------------------------------

linux_cpp = pytest.mark.skipif(not sys.platform.startswith("linux") or bool(_ext.load_error())
                               or os.environ.get("FASTSD_HUGEPAGES") == "0",
                               reason="huge-page buffers: Linux, fastsd._C loaded, FASTSD_HUGEPAGES not 0")


LARGE = ["patch_swap", "patch_swap_backward", "feature_alignment_loss", "feature_alignment_loss retain_graph",
         "pair_kd_loss"]


def _large_outputs(name):
    """The large tensors (each over 32 MiB) a C++ op returns."""
    gen = torch.Generator().manual_seed(0)
    if name.startswith("patch_swap"):
        x = torch.randn(4, 3, 1024, 720, generator=gen)  # 33.75 MiB
        partner = fastsd.intra_class_pairs(torch.tensor([0, 0, 1, 1]), generator=gen)
        mask = fastsd.patch_swap_mask(partner, (8, 8), generator=gen)
        op = fastsd.patch_swap if name == "patch_swap" else torch.ops.fastsd.patch_swap_backward
        return [op(x, partner, mask)]
    if name.startswith("feature_alignment_loss"):
        s = torch.randn(2, 64, 256, 264, generator=gen, requires_grad=True)  # 33 MiB
        s2 = torch.randn(2, 8, 8, 8, generator=gen, requires_grad=True)
        loss = fastsd.feature_alignment_loss([s, s2], [torch.zeros_like(s), torch.zeros_like(s2)])
        # the gradients are views of one flat buffer: the forward's (scaled in place), or with
        # retain_graph a new one from scale_grad
        return list(torch.autograd.grad(loss * 0.5, [s], retain_graph=name.endswith("retain_graph")))
    logits = torch.randn(64, 140000, generator=gen, requires_grad=True)  # 34.2 MiB
    y = torch.randint(0, 10, (64,), generator=gen)
    return list(torch.autograd.grad(fastsd.pair_kd_loss(logits, y, fastsd.intra_class_pairs(y, generator=gen)) * 2.0,
                                    [logits]))


@linux_cpp
@pytest.mark.parametrize("name", LARGE)
def test_large_cpp_outputs_are_huge_page_aligned(name):
    with fastsd.use_backend("cpp"):
        outs = _large_outputs(name)
    for out in outs:
        assert out.untyped_storage().nbytes() > 32 * 2**20
        assert out.untyped_storage().data_ptr() % HUGE == 0, f"{name}: output not from the huge-page allocator"


@linux_cpp
def test_profiler_sees_huge_page_buffers():
    from fastsd.bench.traffic import peak_cpu_memory

    s = torch.randn(4, 256, 96, 96, requires_grad=True)  # 36 MiB
    t = torch.randn(4, 256, 96, 96)
    nbytes = s.numel() * 4
    with fastsd.use_backend("cpp"):
        peak = peak_cpu_memory(lambda: torch.autograd.grad(fastsd.feature_alignment_loss(s, t) * 3.0, [s]))
    # the forward's gradient buffer, seen by the profiler, and nothing else of its size: the
    # backward scales it in place
    assert nbytes <= peak < 1.5 * nbytes, f"peak {peak} B for a {nbytes} B gradient"


MIB = 2**20


def _scaled_copy(mib: float) -> torch.Tensor:
    """A fresh C++ output of about mib MiB (scale_grad of a flat gradient)."""
    n = int(mib * MIB) // 4
    return _backend._REGISTRY["scale_grad"]["cpp"].fn(torch.ones(n), torch.tensor(2.0), [])


@linux_cpp
def test_freed_huge_buffers_are_reused_and_bounded():
    fastsd.empty_cache()
    first = _scaled_copy(40)
    ptr = first.data_ptr()
    del first
    again = _scaled_copy(39)  # fits the freed 40 MiB block with less than 1/8 to spare
    assert again.data_ptr() == ptr, "a freed buffer of the size asked for was not reused"
    assert torch.equal(again, torch.full_like(again, 2.0)), "a reused buffer was not fully written"
    del again
    assert fastsd.empty_cache() == 40 * MIB
    assert fastsd.empty_cache() == 0
    # at most 8 blocks are kept, the oldest go first
    sizes = [34 + 6 * i for i in range(10)]  # MiB, each more than 1/8 apart: no reuse among them
    for mib in sizes:
        _scaled_copy(mib)  # freed at once
    assert fastsd.empty_cache() == sum(sizes[-8:]) * MIB


@linux_cpp
def test_reused_buffer_gives_the_reference_answer():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 1024, 720, generator=gen)  # 33.75 MiB
    partner = fastsd.intra_class_pairs(torch.tensor([0, 0, 1, 1]), generator=gen)
    mask = fastsd.patch_swap_mask(partner, (8, 8), generator=gen)
    with fastsd.use_backend("cpp"):
        stale = fastsd.patch_swap(x * 0 + float("nan"), partner, mask)  # leaves NaN in the freed block
        ptr = stale.data_ptr()
        del stale
        out = fastsd.patch_swap(x, partner, mask)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, fastsd.reference.patch_swap(x, partner, mask), rtol=0, atol=0)
