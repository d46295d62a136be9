"""The C++ CPU kernels of patch swap and mix split their work over torch's intra-op threads
(at::parallel_for in csrc/cpu/patch_swap.cpp and csrc/cpu/mix.cpp): each op here at one thread and
at four, on shapes several times the kernels' grain sizes, must give the same result bit for bit (the
split changes which thread does a unit of work, never the arithmetic). The losses' C++ kernels have
the same check in test_losses.py (test_cpp_results_do_not_depend_on_thread_count).

`make test` gives each pytest-xdist worker its share of the cores as intra-op threads (the Makefile's
OMP_NUM_THREADS; one where there are as many workers as cores), so the other tests mostly run these
kernels in one piece; these tests and the thread tests of test_losses and test_reliability set the
thread count themselves (conftest.torch_threads)."""
import pytest
import torch

import fastsd
from fastsd.mix import op as mix_op

from conftest import needs_cpp, torch_threads

pytestmark = needs_cpp
THREADS = 4  # more than this machine's cores is fine: the work is split all the same


def assert_same_at_one_and_many(fn):
    """fn()'s tensors, with the C++ backend, at 1 thread and at THREADS threads: equal bit for bit."""
    out = []
    for n in (1, THREADS):
        with torch_threads(n), fastsd.use_backend("cpp"):
            assert torch.get_num_threads() == n
            out.append(fn())
    one, many = out
    assert len(one) == len(many)
    for i, (a, b) in enumerate(zip(one, many)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"result {i} differs between 1 and {THREADS} threads"


def _images(dtype, layout, B, C=3, H=32, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 40 + 128
    x = x.clamp(0, 255).round().to(dtype) if dtype == torch.uint8 else x.to(dtype)
    return x.contiguous(memory_format=layout), g


def _partner(kind, B, g):
    if kind == "pairs":  # an involution: the forward's pair units (one read of both rows)
        return fastsd.intra_class_pairs(torch.randint(0, 4, (B,), generator=g), generator=g)
    return torch.randperm(B, generator=g)  # the general case: units in the permutation's cycle order


# Grids: 4 px cells (the select path, whole images a unit), cells of 6-7 px that do not divide 32,
# cells of 32 float32 px (128-byte runs: a copy per run, a cell row a unit), and more than 32 cells
# a row (masks expanded lane by lane, beyond one bit word).
GRIDS = {"8x8": ((8, 8), 32), "3x5": ((3, 5), 32), "4x1": ((4, 1), 32), "2x40": ((2, 40), 48)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("partner_kind", ["pairs", "permutation"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_patch_swap(dtype, layout, partner_kind, grid):
    (gh, gw), W = GRIDS[grid]
    x, g = _images(dtype, layout, B=66, W=W)  # 66 samples: chunks of units that start mid-pair
    B = x.shape[0]
    partner = _partner(partner_kind, B, g)
    mask = torch.rand(B, gh, gw, generator=g) < 0.5
    if partner_kind == "pairs":  # half the pairs under one mask (patch_swap_mask's: the swap loop)
        lead = torch.minimum(torch.arange(B), partner)
        mask = torch.where((lead % 2 == 0)[:, None, None], mask[lead], mask)
    grad = torch.randn(x.shape, generator=g).to(dtype) if dtype.is_floating_point else None

    def run():
        if grad is None:
            return [fastsd.patch_swap(x, partner, mask)]
        xr = x.clone().requires_grad_()
        out = fastsd.patch_swap(xr, partner, mask)
        out.backward(grad)  # the C++ backward: the gather through the inverse permutation
        return [out.detach(), xr.grad]

    assert_same_at_one_and_many(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("partner_kind", ["pairs", "permutation"])
def test_mix(dtype, layout, partner_kind):
    x, g = _images(dtype, layout, B=65, H=33, W=31)  # 65 samples: chunks that start mid-sample
    B, _, H, W = x.shape
    partner = _partner(partner_kind, B, g)
    y0 = torch.randint(0, H, (B,), generator=g)
    x0 = torch.randint(0, W, (B,), generator=g)
    boxes = torch.stack([y0, y0 + torch.randint(0, H + 1, (B,), generator=g).clamp(max=H - y0),
                         x0, x0 + torch.randint(0, W + 1, (B,), generator=g).clamp(max=W - x0)], 1)
    lam = torch.rand(B, generator=g)
    use_box = torch.rand(B, generator=g) < 0.5
    flip = torch.arange(B - 1, -1, -1)  # in place takes an involution

    def run():
        return [mix_op.mix(x, partner, boxes, lam, use_box), mix_op.mix_(x.clone(), flip, boxes, lam, use_box)]

    assert_same_at_one_and_many(run)
