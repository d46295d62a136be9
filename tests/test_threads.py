"""The C++ CPU kernels split their work over torch's intra-op threads (at::parallel_for): each op
here at one thread and at four, on shapes several times the kernels' grain sizes, must give the same
result bit for bit (the split changes which thread does a unit of work, never the arithmetic).

`make test` runs the suite's pytest-xdist workers with one intra-op thread each where there are as
many workers as cores (the Makefile's OMP_NUM_THREADS; two workers of two threads on two cores spent
most of their CPU in OpenMP's spin-waits), so the other tests no longer split the work; these do."""
import contextlib

import pytest
import torch

import fastsd
from fastsd.mix import op as mix_op

from conftest import needs_cpp

pytestmark = needs_cpp
THREADS = 4  # more than this machine's cores is fine: the work is split all the same


@contextlib.contextmanager
def threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def at_one_and_many(fn):
    """fn()'s tensors at 1 thread and at THREADS threads, with the C++ backend."""
    out = []
    for n in (1, THREADS):
        with threads(n), fastsd.use_backend("cpp"):
            assert torch.get_num_threads() == n
            out.append(fn())
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x, y), f"result {i} differs between 1 and {THREADS} threads"


def _images(dtype, layout, B=64, C=3, H=32, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 40 + 128
    x = x.clamp(0, 255).round().to(dtype) if dtype == torch.uint8 else x.to(dtype)
    return x.contiguous(memory_format=layout), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("partner_kind", ["pairs", "permutation"])
@pytest.mark.parametrize("grid", [(8, 8), (3, 5)])
def test_patch_swap(dtype, layout, partner_kind, grid):
    x, g = _images(dtype, layout)
    B = x.shape[0]
    labels = torch.randint(0, 4, (B,), generator=g)
    partner = fastsd.intra_class_pairs(labels, generator=g) if partner_kind == "pairs" else torch.randperm(B, generator=g)
    mask = torch.rand(B, *grid, generator=g) < 0.5
    grad = torch.randn(x.shape, generator=g).to(dtype) if dtype.is_floating_point else None

    def run():
        if grad is None:
            return [fastsd.patch_swap(x, partner, mask)]
        xr = x.clone().requires_grad_()
        out = fastsd.patch_swap(xr, partner, mask)
        out.backward(grad)
        return [out.detach(), xr.grad]

    assert_same(*at_one_and_many(run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_mix(dtype, layout):
    x, g = _images(dtype, layout, H=33, W=31)
    B, _, H, W = x.shape
    partner = torch.randperm(B, generator=g)
    y0 = torch.randint(0, H, (B,), generator=g)
    x0 = torch.randint(0, W, (B,), generator=g)
    boxes = torch.stack([y0, y0 + torch.randint(0, H + 1, (B,), generator=g).clamp(max=H - y0),
                         x0, x0 + torch.randint(0, W + 1, (B,), generator=g).clamp(max=W - x0)], 1)
    lam = torch.rand(B, generator=g)
    use_box = torch.rand(B, generator=g) < 0.5
    grad = torch.randn(x.shape, generator=g).to(dtype) if dtype.is_floating_point else None

    flip = torch.arange(B - 1, -1, -1)  # in place: an involution

    def run():
        outs = [mix_op.mix_(x.clone(), flip, boxes, lam, use_box)]
        if grad is None:
            return outs + [mix_op.mix(x, partner, boxes, lam, use_box)]
        xr = x.clone().requires_grad_()
        out = mix_op.mix(xr, partner, boxes, lam, use_box)
        out.backward(grad)
        return outs + [out.detach(), xr.grad]

    assert_same(*at_one_and_many(run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses(dtype):
    g = torch.Generator().manual_seed(1)
    B, K = 256, 1000  # 8192 / K rows a task: 32 tasks
    logits = (torch.randn(B, K, generator=g) * 3).to(dtype)
    teacher = (torch.randn(B, K, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 10, (B,), generator=g)
    partner = fastsd.intra_class_pairs(labels, generator=g)
    shapes = [((16, 64, 16, 16), False), ((16, 128, 8, 8), True), ((16, 256, 4, 4), False)]
    s, t = [], []
    for shape, channels_last in shapes:
        a, b = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            a, b = (u.contiguous(memory_format=torch.channels_last) for u in (a, b))
        s.append(a)
        t.append(b)

    def run():
        z = logits.clone().requires_grad_()
        xs = [u.clone().requires_grad_() for u in s]
        losses = [fastsd.pair_kd_loss(z, labels, partner, temperature=4.0),
                  fastsd.kd_loss(z, teacher, temperature=2.0)]
        losses += [fastsd.feature_alignment_loss(xs, t, kind=kind, weights="cosine")
                   for kind in ("mse", "l1", "smooth_l1", "cosine")]
        grads = torch.autograd.grad(sum(losses), [z] + xs)
        return [loss.detach() for loss in losses] + list(grads)

    assert_same(*at_one_and_many(run))
