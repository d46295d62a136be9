"""Patch swap: the reference against the SPEC formula, the C++ and torch backends against the
reference, gradients, torch.library registration, torch.compile, host syncs, bad input.

The Triton backend's parity and traffic tests live in test_patch_swap_triton.py.
"""
import itertools

import pytest
import torch

import fastsd
from fastsd import reference as R
from fastsd.bench.cases import DTYPES, PATCH_SWAP_PARITY

from conftest import CPU_BACKENDS, NoHostSync

COMPILED = [b for b in CPU_BACKENDS if b != "triton"]  # triton: test_patch_swap_triton.py
FLOAT_DTYPES = ["float32", "float16", "bfloat16", "float64"]


def naive_patch_swap(x, partner, mask):
    """The SPEC formula, pixel by pixel (float64, small shapes only)."""
    B, C, H, W = x.shape
    gh, gw = mask.shape[1:]
    out = x.clone()
    for i, h, w in itertools.product(range(B), range(H), range(W)):
        if mask[i, h * gh // H, w * gw // W]:
            out[i, :, h, w] = x[int(partner[i]), :, h, w]
    return out


def naive_patch_swap_backward(g, partner, mask):
    """grad_x[j] = g[j] * (1 - mask[j]) + g[q[j]] * mask[q[j]], cell by cell."""
    B, C, H, W = g.shape
    gh, gw = mask.shape[1:]
    q = {int(p): i for i, p in enumerate(partner)}
    out = torch.zeros_like(g)
    for j, h, w in itertools.product(range(B), range(H), range(W)):
        cell = (h * gh // H, w * gw // W)
        out[j, :, h, w] = g[j, :, h, w] * (1 - int(mask[j][cell])) + g[q[j], :, h, w] * int(mask[q[j]][cell])
    return out


@pytest.mark.parametrize("case", PATCH_SWAP_PARITY[:4], ids=lambda c: c.name)
def test_reference_matches_spec_formula(case):
    x, partner, mask = case.make(torch.float64)
    # a general permutation with independent masks exercises the backward's two terms separately
    perm = torch.randperm(x.shape[0])
    indep = torch.rand(mask.shape) < 0.5
    for p, m in [(partner, mask), (perm, indep)]:
        assert torch.equal(R.patch_swap(x, p, m), naive_patch_swap(x, p, m))
        g = torch.randn_like(x)
        torch.testing.assert_close(R.patch_swap_backward(g, p, m), naive_patch_swap_backward(g, p, m))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", PATCH_SWAP_PARITY, ids=lambda c: c.name)
def test_forward_parity(case, dtype, backend):
    x, partner, mask = case.make(DTYPES[dtype])
    x0 = x.clone()
    with fastsd.use_backend(backend):
        out = fastsd.patch_swap(x, partner, mask)
    assert torch.equal(x, x0), "x was modified"
    assert torch.equal(out, R.patch_swap(x, partner, mask))  # a copy: bit-exact
    assert out.dtype == x.dtype and out.shape == x.shape
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", PATCH_SWAP_PARITY, ids=lambda c: c.name)
def test_backward_parity(case, dtype, backend):
    x, partner, mask = case.make(DTYPES[dtype])
    # independent masks and a general permutation: every one of the four keep/take cases occurs
    perm = torch.randperm(x.shape[0])
    indep = torch.rand(mask.shape) < 0.5
    for p, m in [(partner, mask), (perm, indep)]:
        xr = x.detach().clone().requires_grad_()
        g = torch.randn(x.shape).to(x.dtype)  # grad_output != 1
        with fastsd.use_backend(backend):
            fastsd.patch_swap(xr, p, m).backward(g)
        expected = R.patch_swap_backward(g, p, m)
        torch.testing.assert_close(xr.grad, expected, rtol=0, atol=0)  # sum of <= 2 terms, exact
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        assert xr.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", COMPILED)
def test_non_contiguous_inputs(backend):
    base = torch.randn(4, 6, 20, 30)
    x = base[:, ::2, 1:-1, ::3]  # strided view
    partner = torch.tensor([2, 3, 0, 1])
    mask = (torch.rand(8, 5, 4) < 0.5)[::2]  # non-contiguous mask
    xr = x.detach().clone().requires_grad_()
    with fastsd.use_backend(backend):
        out = fastsd.patch_swap(x, partner, mask)
        y = fastsd.patch_swap(xr, partner.to(torch.int32), mask.to(torch.uint8))
    assert torch.equal(out, R.patch_swap(x, partner, mask))
    assert torch.equal(y, out)
    g = torch.randn(4, 10, 18, 3).permute(0, 3, 2, 1)  # neither NCHW nor channels_last
    y.backward(g)
    torch.testing.assert_close(xr.grad, R.patch_swap_backward(g, partner, mask))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "uint8", "float32"])
@pytest.mark.parametrize("shape, grid, partner, channels_last", [
    # Triton's EACH chunks (16 bytes, a cell an element), float16 and uint8: lines of whole chunks
    # and chunks across line ends (kernels.patch_swap.launch_config)
    ((4, 2, 6, 24), (3, 8), [1, 0, 3, 2], False),
    ((3, 2, 5, 27), (2, 9), [2, 0, 1], False),
    ((4, 3, 6, 8), (3, 8), [1, 0, 3, 2], True),  # run as NCHW on lines of W * C
    ((3, 3, 4, 16), (2, 16), [2, 0, 1], True),
    ((2, 3, 3, 12), (2, 7), [1, 0], True),  # channels_last EACH (W % gw != 0)
    ((4, 2, 6, 16), (3, 8), [1, 0, 3, 2], False),  # EACH with CELL (2-px cells, lines of whole chunks)
    ((3, 2, 5, 20), (2, 5), [2, 0, 1], False),  # uint8 4-px cells across line ends
])
def test_uint8_mask_swaps_where_its_byte_is_nonzero(backend, dtype, shape, grid, partner, channels_last):
    """A uint8 mask swaps every cell whose byte is nonzero (SPEC 3), 2, 127, 128 and 255 as 1: the
    output and gradient of its bool mask, the mask unchanged (the Triton launcher turns it into 0/1
    bytes, which the kernel's word selects multiply by their bit fields)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(shape, generator=g) * 200).to(DTYPES[dtype])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    partner = torch.tensor(partner)
    values = torch.tensor([0, 1, 2, 127, 128, 255], dtype=torch.uint8)
    mask = values[torch.randint(0, len(values), (shape[0], *grid), generator=g)]
    mask0 = mask.clone()
    as_bool = mask != 0
    xr = x.detach().clone().requires_grad_(x.is_floating_point())
    with fastsd.use_backend(backend):
        out = fastsd.patch_swap(xr, partner, mask)
        if x.is_floating_point():
            grad = torch.rand(shape, generator=g).to(x.dtype)
            out.backward(grad)
    assert torch.equal(out, R.patch_swap(x, partner, as_bool)) and torch.equal(mask, mask0)
    if x.is_floating_point():
        assert torch.equal(xr.grad, R.patch_swap_backward(grad, partner, as_bool))


@pytest.mark.parametrize("backend", COMPILED)
def test_gradcheck_float64(backend):
    x = torch.randn(4, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    partner = torch.tensor([3, 2, 1, 0])
    mask = torch.rand(4, 3, 2) < 0.5
    with fastsd.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: fastsd.patch_swap(t, partner, mask), (x,))
        assert torch.autograd.gradgradcheck(lambda t: fastsd.patch_swap(t, partner, mask), (x,))
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        perm = torch.tensor([2, 0, 3, 1])  # not an involution: the two backward terms differ
        assert torch.autograd.gradcheck(lambda t: fastsd.patch_swap(t, perm, mask), (x_cl,))


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    x = torch.randn(4, 3, 9, 10, requires_grad=True)
    partner = torch.tensor([1, 0, 3, 2])
    mask = torch.rand(4, 3, 5) < 0.5
    with fastsd.use_backend(backend):
        torch.library.opcheck(torch.ops.fastsd.patch_swap.default, (x, partner, mask))
        torch.library.opcheck(torch.ops.fastsd.patch_swap_backward.default, (x.detach(), partner, mask))
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.library.opcheck(torch.ops.fastsd.patch_swap.default, (xc, partner, mask))


def test_deterministic_backward():
    case = PATCH_SWAP_PARITY[0]
    x, partner, mask = case.make(torch.float32)
    grads = []
    for backend in COMPILED:
        for _ in range(2):
            xr = x.clone().requires_grad_()
            with fastsd.use_backend(backend):
                fastsd.patch_swap(xr, partner, mask).square().sum().backward()
            grads.append(xr.grad)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    out = fastsd.patch_swap(x, torch.empty(0, dtype=torch.long), torch.zeros(0, 2, 2, dtype=torch.bool))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    y, partner, mask = fastsd.intra_class_patch_swap(torch.randn(0, 3, 32, 32), torch.empty(0, dtype=torch.long))
    assert y.shape == (0, 3, 32, 32) and partner.shape == (0,) and mask.shape == (0, 8, 8)


def test_intra_class_patch_swap_default_grid_and_determinism():
    x = torch.randn(16, 3, 32, 32)
    labels = torch.randint(0, 3, (16,))
    a = fastsd.intra_class_patch_swap(x, labels, generator=torch.Generator().manual_seed(1))
    b = fastsd.intra_class_patch_swap(x, labels, generator=torch.Generator().manual_seed(1))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert a[2].shape == (16, 8, 8)  # 4 px cells at 32 x 32
    assert fastsd.default_patch_size(224, 224) == (32, 32)  # 7 cells a side at 224 x 224
    x2 = torch.randn(2, 3, 33, 47)
    y, partner, mask = fastsd.intra_class_patch_swap(x2, torch.tensor([0, 0]), patch_size=(5, 6))
    assert mask.shape == (2, 7, 8)  # ceil(33 / 5), ceil(47 / 6)
    assert partner.tolist() == [1, 0] and mask.sum() == 2 * round(0.5 * 56)
    assert torch.equal(y, R.patch_swap(x2, partner, mask))


def test_nn_module():
    m = fastsd.nn.IntraClassPatchSwap(patch_size=4, generator=torch.Generator().manual_seed(0))
    x, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    y, partner, mask = m(x, labels)
    assert torch.equal(labels[partner], labels) and mask.shape == (8, 4, 4) and mask.any()
    m.eval()
    y, partner, mask = m(x, labels)
    assert torch.equal(y, x) and not mask.any()


def test_torch_compile_fullgraph_matches_eager():
    import torch._dynamo
    import torch._inductor.config as inductor_config

    def step(x, labels, w):
        swapped, partner, mask = fastsd.intra_class_patch_swap(x, labels, patch_size=4)
        return (swapped * w).square().mean(), swapped

    x = torch.randn(8, 3, 16, 20)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    w = torch.randn(3, 1, 1, requires_grad=True)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):  # compiled RNG == eager RNG
        compiled = torch.compile(step, fullgraph=True)
        torch.manual_seed(5)
        loss_c, out_c = compiled(x, labels, w)
        (gc,) = torch.autograd.grad(loss_c, w)
    torch.manual_seed(5)
    loss_e, out_e = step(x, labels, w)
    (ge,) = torch.autograd.grad(loss_e, w)
    assert torch.equal(out_c, out_e)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("backend", COMPILED)
def test_no_host_sync(backend):
    x = torch.randn(12, 3, 17, 19, requires_grad=True)
    labels = torch.randint(0, 3, (12,))
    g = torch.Generator().manual_seed(0)
    with fastsd.use_backend(backend), NoHostSync():
        partner = fastsd.intra_class_pairs(labels, generator=g)
        mask = fastsd.patch_swap_mask(partner, (5, 4), ratio=0.3, prob=0.7, generator=g)
        box = fastsd.box_mask(partner, (17, 19), generator=g)
        y = fastsd.patch_swap(x, partner, mask) + fastsd.patch_swap(x, partner, box)
        y.backward(torch.ones_like(y))
        fastsd.intra_class_patch_swap(x.detach(), labels, patch_size=3, generator=g)
    # and the guard itself works:
    with pytest.raises(AssertionError), NoHostSync():
        torch.ones(1).item()


# --- bad input ---------------------------------------------------------------------------------

X = torch.randn(4, 3, 8, 8)
P = torch.tensor([1, 0, 3, 2])
M = torch.zeros(4, 2, 2, dtype=torch.bool)

BAD_PATCH_SWAP = [
    ("x not a tensor", (X.numpy(), P, M), TypeError, "x"),
    ("x rank 3", (X[0], P, M), ValueError, "x"),
    ("x int32", (X.int(), P, M), TypeError, "x"),
    ("x complex", (X.to(torch.complex64), P, M), TypeError, "x"),
    ("partner float", (X, P.float(), M), TypeError, "partner"),
    ("partner 2-D", (X, P[None], M), ValueError, "partner"),
    ("partner wrong length", (X, P[:3], M), ValueError, "partner"),
    ("partner not a permutation", (X, torch.tensor([0, 0, 1, 2]), M), ValueError, "partner"),
    ("partner out of range", (X, torch.tensor([1, 0, 3, 4]), M), ValueError, "partner"),
    ("partner negative", (X, torch.tensor([1, 0, 3, -1]), M), ValueError, "partner"),
    ("mask float", (X, P, M.float()), TypeError, "mask"),
    ("mask rank 2", (X, P, M[0]), ValueError, "mask"),
    ("mask wrong batch", (X, P, M[:3]), ValueError, "mask"),
    ("grid larger than image", (X, P, torch.zeros(4, 9, 2, dtype=torch.bool)), ValueError, "gh"),
    ("grid zero", (X, P, torch.zeros(4, 0, 2, dtype=torch.bool)), ValueError, "gh"),
    ("device mismatch", (X, P.to("meta"), M), ValueError, "partner"),
]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("args,exc,word", [c[1:] for c in BAD_PATCH_SWAP], ids=[c[0] for c in BAD_PATCH_SWAP])
def test_patch_swap_bad_input(args, exc, word, backend):
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with fastsd.use_backend(backend), pytest.raises(exc, match=word):
        fastsd.patch_swap(*args)
    for a, c in zip(args, copies):
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            assert torch.equal(a, c), "an input was modified"


def test_uint8_cannot_require_grad_and_info():
    # uint8 tensors cannot require grad in torch itself; the op returns uint8 with no grad_fn
    y = fastsd.patch_swap(X.to(torch.uint8), P, M)
    assert y.dtype == torch.uint8 and y.grad_fn is None


BAD_HELPERS = [
    ("pairs labels float", lambda: fastsd.intra_class_pairs(torch.rand(4)), TypeError, "labels"),
    ("pairs labels 2-D", lambda: fastsd.intra_class_pairs(torch.zeros(2, 2, dtype=torch.long)), ValueError, "labels"),
    ("pairs bad generator", lambda: fastsd.intra_class_pairs(P, generator=3), TypeError, "generator"),
    ("mask ratio > 1", lambda: fastsd.patch_swap_mask(P, (2, 2), ratio=1.5), ValueError, "ratio"),
    ("mask ratio < 0", lambda: fastsd.patch_swap_mask(P, (2, 2), ratio=-0.1), ValueError, "ratio"),
    ("mask prob > 1", lambda: fastsd.patch_swap_mask(P, (2, 2), prob=2), ValueError, "prob"),
    ("mask prob nan", lambda: fastsd.patch_swap_mask(P, (2, 2), prob=float("nan")), ValueError, "prob"),
    ("mask grid 0", lambda: fastsd.patch_swap_mask(P, (0, 2)), ValueError, "grid"),
    ("mask grid 3 ints", lambda: fastsd.patch_swap_mask(P, (2, 2, 2)), TypeError, "grid"),
    ("mask partner float", lambda: fastsd.patch_swap_mask(P.float(), (2, 2)), TypeError, "partner"),
    ("box area order", lambda: fastsd.box_mask(P, (8, 8), area=(0.6, 0.2)), ValueError, "area"),
    ("box area > 1", lambda: fastsd.box_mask(P, (8, 8), area=(0.2, 1.2)), ValueError, "area"),
    ("box size 0", lambda: fastsd.box_mask(P, (0, 8)), ValueError, "size"),
    ("swap patch_size 0", lambda: fastsd.intra_class_patch_swap(X, P, patch_size=0), ValueError, "patch_size"),
    ("swap patch_size > image", lambda: fastsd.intra_class_patch_swap(X, P, patch_size=9), ValueError, "patch_size"),
    ("swap patch_size float", lambda: fastsd.intra_class_patch_swap(X, P, patch_size=2.5), TypeError, "patch_size"),
    ("swap labels length", lambda: fastsd.intra_class_patch_swap(X, P[:3]), ValueError, "labels"),
    ("swap ratio", lambda: fastsd.intra_class_patch_swap(X, P, ratio=3), ValueError, "ratio"),
]


@pytest.mark.parametrize("call,exc,word", [c[1:] for c in BAD_HELPERS], ids=[c[0] for c in BAD_HELPERS])
def test_helpers_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


# Every path of the C++ CPU gather: narrow cells (bit select, mask from the cells' bit word), grids
# wider than one bit word (32 cells), wide cells (a copy per run), uniform cell rows (one block),
# cells that do not divide the image, images of several units (64 x 64: two of 8 cell rows in NCHW,
# four of 4 in channels_last), an odd batch (the middle row its own partner); NCHW and channels_last.
BIT_EXACT_SHAPES = [
    ((6, 3, 32, 32), (8, 8)),
    ((4, 2, 64, 64), (16, 16)),
    ((4, 2, 9, 40), (3, 40)),
    ((4, 2, 8, 70), (2, 35)),
    ((4, 3, 6, 96), (3, 2)),
    ((5, 3, 7, 33), (3, 5)),
]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.mark.parametrize("pairs", [False, True, "shared"], ids=["perm", "involution", "shared"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "uint8"])
@pytest.mark.parametrize("shape,grid", BIT_EXACT_SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_cpp_gather_is_bit_exact(shape, grid, dtype, channels_last, pairs):
    """Copies move bits: NaN payloads and -0.0 come through the forward, and through the backward's
    cells with one source (gather with the inverse permutation; zero with none, a sum with both).
    ``pairs``: partner an involution with a fixed point (the forward writes a pair's two outputs in
    one pass), each row of a pair under its own mask; "shared": the pairs' rows under the same mask
    (patch_swap_mask's, the swap loop) but for one cell of one pair, in its last cell row, and the
    same cells in other bytes for another pair (a uint8 mask of 0 / 1 against one of 0 / 2: the pair
    loop)."""
    if "cpp" not in COMPILED:
        pytest.skip("C++ backend not built")
    dt = DTYPES[dtype]
    itype = INT_VIEW[torch.empty((), dtype=dt).element_size()]
    gen = torch.Generator().manual_seed(7)
    B, C, H, W = shape
    bits = torch.randint(-(2 ** 15), 2 ** 15, shape, generator=gen).to(itype)  # NaN payloads, -0.0, ...
    x = bits.view(dt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    partner = torch.randperm(B, generator=gen)
    if pairs:  # (0, B - 1), (1, B - 2), ...; the middle row its own partner where B is odd
        partner = torch.arange(B).flip(0)
    mask = torch.rand((B,) + grid, generator=gen) < 0.5
    mask[0, 0] = True  # a uniform cell row of each kind
    mask[1, 0] = False
    if pairs == "shared":
        mask = mask[torch.minimum(torch.arange(B), partner)]
        mask[B - 1, -1, 0] = ~mask[0, -1, 0]  # (0, B - 1) differ in one cell of their last unit
        mask = mask.to(torch.uint8)
        mask[B - 2] *= 2  # (1, B - 2): the same cells, other bytes
    m = R.upsample_mask(mask != 0, H, W)[:, None]
    xi = x.contiguous().view(itype)
    out = torch.ops.fastsd_C.patch_swap(x, partner, mask)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(out.contiguous().view(itype), torch.where(m, xi[partner], xi))
    grad_x = torch.ops.fastsd_C.patch_swap_backward(x, partner, mask)
    q = torch.argsort(partner)
    keep, take = ~m, m[q]
    gi = grad_x.contiguous().view(itype)
    one = keep ^ take
    expected = torch.where(keep, xi, xi[q])
    assert torch.equal(gi[one.expand_as(gi)], expected[one.expand_as(gi)])
    assert not gi[(~keep & ~take).expand_as(gi)].any()
    both = (keep & take).expand_as(gi)
    xc = x.contiguous()  # (a sum's NaN payload is the hardware's choice)
    torch.testing.assert_close(grad_x.contiguous()[both], (xc + xc[q])[both], rtol=0, atol=0, equal_nan=True)


def test_cuda_backend_passes_planes_its_int32_indexing_cannot_take():
    """auto takes patch swap's CUDA C++ forward first (fastsd._backend.CUDA_FIRST): it indexes a plane
    (and a cell row, H x gh and W x gw) in int32, so a larger one is a reason to pass it over (Triton's
    kernel has a 64-bit variant) rather than an error at the launch. Meta tensors: no memory."""
    import importlib

    ps = importlib.import_module("fastsd.patch_swap")  # (fastsd.patch_swap is also the function)

    partner, mask = torch.zeros(2, dtype=torch.long), torch.zeros(2, 2, 2, dtype=torch.bool)
    assert ps._cuda_reasons(torch.empty(2, 3, 2 ** 15, 2 ** 16 - 1, device="meta"), partner, mask) == []
    why = ps._cuda_reasons(torch.empty(2, 1, 2 ** 15, 2 ** 16, device="meta"), partner, mask)
    assert len(why) == 1 and "2**31" in why[0]
    cl = torch.empty(2, 3, 2 ** 15, 2 ** 15, device="meta").to(memory_format=torch.channels_last)
    assert ps._cuda_reasons(cl, partner, mask) != []  # H x W x C in channels_last
    assert ps._cuda_reasons(torch.empty(2, 3, 2 ** 15, 2 ** 15, device="meta"), partner, mask) == []
    row = torch.empty(2, 1, 1, 2 ** 16, device="meta")  # a small plane, a long cell row: W x gw
    assert ps._cuda_reasons(row, partner, torch.zeros(2, 1, 2 ** 15 - 1, dtype=torch.bool, device="meta")) == []
    assert ps._cuda_reasons(row, partner, torch.zeros(2, 1, 2 ** 15, dtype=torch.bool, device="meta")) != []
    col = torch.empty(2, 1, 2 ** 16, 1, device="meta")  # H x gh
    assert ps._cuda_reasons(col, partner, torch.zeros(2, 2 ** 15, 1, dtype=torch.bool, device="meta")) != []
