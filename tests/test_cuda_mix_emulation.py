"""The CUDA mix kernels (csrc/cuda/mix_kernel.cuh), run thread by thread on the CPU, against the reference.

The host build (tests/csrc/mix_host.cpp) runs every thread of the planned grid and checks each data
access the GPU would make: a vector access aligned to its size, inside its buffer, and counts the
loads and stores of every byte. Out of place, every output byte is stored once and the loads stay
within the minimum plus the vectors a box edge cuts; in place, exactly the vectors that hold mixed
pixels are stored, once each, and nothing outside a changing pair's vectors is read. Results compare
bit for bit with fastsd.reference.mix. With tiny `target_threads` / `max_grid_y` the plan puts several
rows (across planes) on a thread and loops over samples, the paths large inputs take on a GPU. What
this cannot see (the launcher's guard and stream, real memory ordering) is for the `gpu` tests.
"""
import ctypes

import pytest
import torch

import fastsd
import fastsd.mix.op
import host_kernels
from fastsd import reference as R
from mix_cases import LAYOUTS, bits, make

DTYPES = {torch.uint8: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
# aligned rows (16-byte vectors), odd ones (one element a thread), a row of 40 (box edges inside the
# vectors of every width), one-pixel-wide images, two samples, one
SHAPES = [(6, 3, 32, 32), (5, 3, 7, 9), (4, 2, 12, 40), (5, 1, 6, 1), (2, 4, 8, 16), (1, 3, 16, 16)]
ROWS = ("cutmix", "mixup", "mixed")


@pytest.fixture(scope="module")
def host_library(tmp_path_factory):
    return host_kernels.library(tmp_path_factory, "mix_host.cpp")


@pytest.fixture(scope="module")
def host_kernel(host_library):
    return host_kernels.function(host_library, "fastsd_mix_host",
                                 [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_void_p]
                                 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                                 + [ctypes.c_void_p] * 3)


def emulate(fn, x, partner, boxes, lam, use_box, inplace=False, backward=False, target_threads=1 << 18,
            max_grid_y=65535):
    """The launcher's steps (a new output in x's layout, or x itself; the backward's inverse of
    partner), then every thread. Returns the result and the plan, with per-byte load and store counts
    in memory order."""
    assert x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    channels_last = not x.is_contiguous()
    if inplace:
        out = x
    else:
        out = torch.empty_like(x)  # keeps x's layout
        out.untyped_storage().fill_(0xA5)  # stale bytes, as a new GPU tensor may hold
    nbytes = x.numel() * x.element_size()
    loads, stores = torch.zeros(nbytes, dtype=torch.int32), torch.zeros(nbytes, dtype=torch.int32)
    info = torch.zeros(7, dtype=torch.int64)
    p, b, l, u = partner.long().contiguous(), boxes.long().contiguous(), lam.contiguous(), use_box.contiguous()
    if backward:
        p = torch.argsort(p)
    B, C, H, W = x.shape
    rc = fn(DTYPES[x.dtype], 2 if backward else int(inplace), x.data_ptr(), None if inplace else out.data_ptr(), p.data_ptr(), b.data_ptr(),
            l.data_ptr(), int(l.dtype == torch.float64), u.data_ptr(), B, C, H, W, int(channels_last), target_threads,
            max_grid_y, loads.data_ptr(), stores.data_ptr(), info.data_ptr())
    assert rc == 0
    plan = dict(zip(("vec", "grid_x", "grid_y", "rows_per_thread", "bad_accesses", "races", "packed"), info.tolist()))
    return out, plan, loads, stores


def _per_vector(mask, channels_last, vec, itemsize, whole=False):
    """[B, C, H, W] element mask -> per-byte mask in memory order (NCHW or channels_last), widened to
    the vectors of `vec` elements (what a thread loads or stores at once) that hold a marked element
    (``whole``: only marked elements)."""
    B, C, H, W = mask.shape
    rows = (mask.permute(0, 2, 3, 1) if channels_last else mask).reshape(B, -1, W * (C if channels_last else 1))
    v = rows.reshape(*rows.shape[:2], -1, vec)
    v = (v.all(-1, keepdim=True) if whole else v.any(-1, keepdim=True)).expand(*rows.shape[:2], -1, vec)
    return v.reshape(B, -1).repeat_interleave(itemsize, dim=1)


def _mixed(partner, boxes, use_box, shape):
    """Which elements an in-place mix changes (or may: a MixUp row whole; a CutMix row its box, unless it
    is its own partner)."""
    B, C, H, W = shape
    inside = R.box_mask(boxes, H, W)[:, None].expand(B, C, H, W)
    own = (partner == torch.arange(B))[:, None, None, None]
    return torch.where(use_box[:, None, None, None], inside & ~own, torch.ones_like(inside))


def _check_forward(fn, x, partner, boxes, lam, use_box, **plan):
    before = x.clone()
    out, info, loads, stores = emulate(fn, x, partner, boxes, lam, use_box, **plan)
    assert info["bad_accesses"] == 0 and info["races"] == 0, info
    assert torch.equal(stores, torch.ones_like(stores)), "every output byte stored exactly once"
    want = R.mix(x, partner, boxes, lam, use_box)
    assert out.stride() == x.stride()
    assert torch.equal(bits(out), bits(want))
    assert torch.equal(bits(x), bits(before))  # the input is not modified
    # loads: a MixUp row reads both rows, a CutMix row one source per element, plus both sources of
    # the vectors its box edges cut (at most two a box row)
    B, C, H, W = x.shape
    sample = x[0].numel() * x.element_size()
    box_rows = (boxes[:, 1] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] > boxes[:, 2])
    planes = 1 if not x.is_contiguous() else C
    edge = 2 * 16 * int((box_rows * use_box).sum()) * planes
    minimum = sample * int((2 - use_box.long()).sum())
    assert minimum <= int(loads.sum()) <= minimum + edge, (int(loads.sum()), minimum, edge)
    return info


def _check_inplace(fn, x, partner, boxes, lam, use_box, **plan):
    want = R.mix(x, partner, boxes, lam, use_box)
    y = x.clone()
    out, info, loads, stores = emulate(fn, y, partner, boxes, lam, use_box, inplace=True, **plan)
    assert info["bad_accesses"] == 0 and info["races"] == 0, info
    assert torch.equal(bits(y), bits(want))
    mixed = _mixed(partner, boxes, use_box, x.shape)
    channels_last = not x.is_contiguous()
    changed = _per_vector(mixed, channels_last, info["vec"], x.element_size())
    assert torch.equal(stores, changed.reshape(-1).int()), "exactly the vectors that hold mixed pixels, once each"
    # a row's vector is read where its partner's changes (the partner reads it), and where its own
    # changes, unless it takes all of it from the partner (a vector inside its box)
    taken = _per_vector(mixed & use_box[:, None, None, None], channels_last, info["vec"], x.element_size(), whole=True)
    read = changed[partner] | (changed & ~taken)
    assert torch.equal(loads, read.reshape(-1).int()), "reads each byte it needs once, and nothing else"
    return info


def _check_backward(fn, g, partner, boxes, lam, use_box, **plan):
    before = g.clone()
    out, info, loads, stores = emulate(fn, g, partner, boxes, lam, use_box, backward=True, **plan)
    assert info["bad_accesses"] == 0 and info["races"] == 0, info
    assert torch.equal(stores, torch.ones_like(stores)), "every input-gradient byte stored exactly once"
    assert torch.equal(bits(out), bits(R.mix_backward(g, partner, boxes, lam, use_box)))
    assert out.stride() == g.stride() and torch.equal(bits(g), bits(before))
    # each element of g is read at most once by the row that keeps it and once by the one it is sent to
    assert int(loads.max()) <= 2, int(loads.max())
    return info


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_kernel_matches_reference(host_kernel, dtype, layout, inplace):
    for seed, shape in enumerate(SHAPES):
        for rows in ROWS:
            lam_dtype = torch.float64 if seed % 2 else torch.float32
            x, *args = make(shape, dtype, layout, rows, seed, lam_dtype, involution=inplace)
            info = (_check_inplace if inplace else _check_forward)(host_kernel, x, *args)
            row_bytes = shape[3] * (shape[1] if layout == "channels_last" else 1) * x.element_size()
            assert info["vec"] == (16 // x.element_size() if row_bytes % 16 == 0 else 1), (shape, info)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_several_rows_per_thread_and_samples_per_block_row(host_kernel, dtype, layout, inplace):
    x, *args = make(WIDE, dtype, layout, "mixed", 3, involution=inplace)
    info = (_check_inplace if inplace else _check_forward)(host_kernel, x, *args, **_four_rows_a_thread(x))
    _assert_four_rows_a_thread(info)


# Wide rows, so that a sample has more vectors than a block has threads (the block-row-per-sample plan)
WIDE = (7, 3, 10, 1024)


def _four_rows_a_thread(x):
    """A thread target that gives each thread 4 rows (across the planes' boundaries in NCHW: the image
    row wraps from H - 1 = 9 to 0), and a short grid.y, so that blocks loop over samples."""
    row_vecs = x.shape[3] * (x.shape[1] if not x.is_contiguous() else 1) * x.element_size() // 16
    rows = x.shape[2] * (1 if not x.is_contiguous() else x.shape[1])
    return dict(target_threads=x.shape[0] * rows * row_vecs // 4, max_grid_y=3)


def _assert_four_rows_a_thread(info):
    assert info["rows_per_thread"] == 4 and info["grid_y"] == 3 and not info["packed"], info


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.is_floating_point], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_kernel_matches_reference(host_kernel, dtype, layout):
    for seed, shape in enumerate(SHAPES):
        for rows in ROWS:
            lam_dtype = torch.float64 if seed % 2 else torch.float32
            g, *args = make(shape, dtype, layout, rows, seed + 10, lam_dtype)
            _check_backward(host_kernel, g, *args)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_several_rows_per_thread(host_kernel, layout):
    g, *args = make(WIDE, torch.bfloat16, layout, "mixed", 4)
    _assert_four_rows_a_thread(_check_backward(host_kernel, g, *args, **_four_rows_a_thread(g)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64], ids=str)
def test_unaligned_data_pointer_takes_the_scalar_kernel(host_kernel, dtype):
    x, *args = make((4, 3, 16, 32), dtype, "nchw", "mixed", 5)
    x = torch.cat([x.new_zeros(1), x.reshape(-1)])[1:].view(x.shape)
    assert x.data_ptr() % 16 != 0
    assert _check_forward(host_kernel, x, *args)["vec"] == 1


@pytest.mark.parametrize("bad", [-1, 4, 10**9, -2**40])
def test_partner_out_of_range_reads_inside_x(host_kernel, bad):
    # unchecked calls: a partner outside range(B) is clamped to B - 1 (never an address outside x)
    x, partner, boxes, lam, use_box = make((4, 3, 16, 32), torch.float32, "nchw", "mixed", 6)
    partner[1] = bad
    out, info, _, _ = emulate(host_kernel, x, partner, boxes, lam, use_box)
    assert info["bad_accesses"] == 0
    clamped = torch.where((partner >= 0) & (partner < 4), partner, torch.full_like(partner, 3))
    assert torch.equal(bits(out), bits(R.mix(x, clamped, boxes, lam, use_box)))
    for direction in ("inplace", "backward"):  # in place: races (a wrong answer), but inside x
        _, info, _, _ = emulate(host_kernel, x.clone(), partner, boxes, lam, use_box, **{direction: True})
        assert info["bad_accesses"] == 0, direction


def test_harness_sees_a_race(host_kernel):
    # in place with a 3-cycle (not an involution): two threads write the same pixels, which the
    # harness must report (the public mix_ checks the involution first)
    x, partner, boxes, lam, use_box = make((3, 1, 4, 8), torch.float32, "nchw", "mixup", 8)
    _, info, _, _ = emulate(host_kernel, x.clone(), torch.tensor([1, 2, 0]), boxes, lam, use_box, inplace=True)
    assert info["races"] > 0


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_small_samples_share_blocks(host_kernel, inplace):
    # 8 x 8 images: a sample has fewer vectors than a block has threads, so blocks take (sample,
    # vector) pairs (else most of each block would idle)
    x, *args = make((40, 3, 8, 8), torch.float32, "channels_last", "mixed", 9, involution=inplace)
    info = (_check_inplace if inplace else _check_forward)(host_kernel, x, *args)
    assert info["packed"] == 1 and info["grid_y"] == 1 and info["grid_x"] == 40 * 8 * 6 // 256 + 1, info
    _check_backward(host_kernel, x, *args) if not inplace else None


MESSAGES = {
    "permutation": "fastsd.mix: partner must be a permutation of range(B)",
    "involution": "fastsd.mix_: partner must be an involution (partner[partner[i]] == i) to mix in place",
    "boxes": "fastsd.mix: boxes must satisfy 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W",
    "lam": "fastsd.mix: lam must be in [0, 1]",
}


@pytest.fixture(scope="module")
def host_check(host_library):
    return host_kernels.function(host_library, "fastsd_mix_check_host",
                                 [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_int64] * 3
                                 + [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p], restype=ctypes.c_int64)


def check_asserts(fn, partner, boxes, lam, H, W, involution=False):
    """{message key: threads whose assert fired} of mix_check_kernel on these values (the launcher's
    steps: partner sorted, unless it must be an involution)."""
    p, b, l = partner.long().contiguous(), boxes.long().contiguous(), lam.contiguous()
    s = p if involution else torch.sort(p).values
    counts = torch.zeros(len(MESSAGES), dtype=torch.int64)
    total = fn(p.data_ptr(), s.data_ptr(), b.data_ptr(), l.data_ptr(), int(l.dtype == torch.float64), p.numel(), H,
               W, int(involution), "\n".join(MESSAGES.values()).encode(), counts.data_ptr())
    fired = {k: n for k, n in zip(MESSAGES, counts.tolist()) if n}
    assert total == sum(fired.values()), (total, fired)  # no other message
    return fired


@pytest.mark.parametrize("lam_dtype", [torch.float32, torch.float64], ids=str)
def test_check_kernel_asserts_each_bad_value(host_check, lam_dtype):
    B, H, W = 300, 12, 40  # more than a block of rows
    g = torch.Generator().manual_seed(11)
    flip, pairs = torch.arange(B - 1, -1, -1), torch.randperm(B, generator=g)
    boxes = torch.tensor([[0, H, 0, W], [2, 2, 5, 5], [3, 7, 0, 40]] * (B // 3))
    lam = torch.rand(B, generator=g, dtype=torch.float64).to(lam_dtype)
    lam[:2] = torch.tensor([0.0, 1.0])
    assert check_asserts(host_check, pairs, boxes, lam, H, W) == {}
    assert check_asserts(host_check, flip, boxes, lam, H, W, involution=True) == {}
    bad = lambda t, i, v: t.clone().index_put_((torch.tensor([i]),), torch.tensor(v, dtype=t.dtype))
    # a repeated partner, or one out of range: the sorted partner is off range(B) from there on
    assert check_asserts(host_check, bad(pairs, 5, int(pairs[6])), boxes, lam, H, W).keys() == {"permutation"}
    assert check_asserts(host_check, bad(pairs, 299, -1), boxes, lam, H, W).keys() == {"permutation"}
    # in place: row 0 out of range (read as B - 1, whose partner is 0: no involution message for it);
    # row B - 1's partner 0 points elsewhere
    assert check_asserts(host_check, bad(flip, 0, 10**9), boxes, lam, H, W, involution=True) == {
        "permutation": 1, "involution": 1}
    assert check_asserts(host_check, pairs, boxes, lam, H, W, involution=True).keys() == {"involution"}
    for row in ([0, H + 1, 0, W], [3, 2, 0, W], [0, H, -1, W], [0, H, 5, 4], [0, H, 0, W + 1]):
        assert check_asserts(host_check, pairs, bad(boxes, 250, row), lam, H, W) == {"boxes": 1}, row
    for value in (-0.25, 1.5, float("nan")):
        assert check_asserts(host_check, pairs, boxes, bad(lam, 260, value), H, W) == {"lam": 1}, value


def test_harness_sees_a_wrong_kernel(host_kernel):
    # the checks must be able to fail: other weights, or a box the kernel does not see, change the answer
    x, partner, boxes, lam, use_box = make((4, 3, 16, 32), torch.float32, "nchw", "mixed", 7)
    out, *_ = emulate(host_kernel, x, partner, boxes, lam, use_box)
    assert not torch.equal(out, R.mix(x, partner, boxes, 1 - lam, use_box))
    assert not torch.equal(out, R.mix(x, partner, boxes, lam, ~use_box))


# --- the same kernels on a GPU (skipped without one, or without the CUDA kernels built) -------------

needs_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or not fastsd.mix.op._has_cuda_kernel("mix_check"),
    reason="needs a CUDA device and fastsd._C built with this version's CUDA mix kernels")


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("shape", SHAPES + [(64, 3, 224, 224), (256, 64, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernel_matches_reference(dtype, layout, inplace, shape):
    x, *args = make(shape, dtype, layout, "mixed", 1, torch.float32, involution=inplace)
    want = R.mix(x, *args)
    on = [t.cuda() for t in (x, *args)]
    if inplace:
        torch.ops.fastsd_C.mix_(*on)
        out = on[0]
    else:
        out = torch.ops.fastsd_C.mix(*on)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    assert torch.equal(bits(out.cpu()), bits(want))
    if dtype.is_floating_point and not inplace:
        grad = torch.ops.fastsd_C.mix_backward(*on)
        assert torch.equal(bits(grad.cpu()), bits(R.mix_backward(x, *args)))


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_kernel_runs_on_the_tensors_device_and_current_stream():
    x, *args = make((8, 3, 32, 32), torch.float32, "nchw", "mixed", 2)
    want = R.mix(x, *args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the launch follows the current stream, ordered after the copies
        out = torch.ops.fastsd_C.mix(*[t.cuda() for t in (x, *args)])
    stream.synchronize()
    assert torch.equal(bits(out.cpu()), bits(want))
    if torch.cuda.device_count() > 1:  # tensors on cuda:1 while cuda:0 is current
        with torch.cuda.device(0):
            out = torch.ops.fastsd_C.mix(*[t.to("cuda:1") for t in (x, *args)])
        assert out.device == torch.device("cuda:1")
        assert torch.equal(bits(out.cpu()), bits(want))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_gpu_public_functions_on_the_cuda_backend(inplace):
    # fastsd.mix.mix / mix_ with the cuda backend forced: the value-check kernel, the kernel, and (out of
    # place) the backward kernel
    import fastsd.mix as fm
    from fastsd import _backend

    x, *args = make((6, 3, 32, 32), torch.float32, "nchw", "mixed", 3, involution=inplace)
    want = R.mix(x, *args)
    on = [t.cuda() for t in (x, *args)]
    with _backend.use_backend("cuda"):
        if inplace:
            out = fm.mix_(*on)
        else:
            xg = on[0].requires_grad_()
            out = fm.mix(xg, *on[1:])
            out.backward(torch.ones_like(out))
            torch.testing.assert_close(xg.grad.cpu(), R.mix_backward(torch.ones_like(x), *args), rtol=0, atol=0)
    assert torch.equal(bits(out.detach().cpu()), bits(want))


def test_cuda_backend_checks_values_with_its_kernel_before_mixing(monkeypatch):
    # the Python wiring of the cuda backend, on CPU tensors with fastsd._C's ops recorded: the public
    # functions (eager, autograd and the registered op) run the check kernel (partner sorted, or the
    # involution itself in place) and then the mix kernel; mix_unchecked runs no check
    from fastsd import _backend, _ext, _validate
    import fastsd.mix as fm
    from fastsd.mix import op

    calls = []

    class Ops:
        def mix_check(self, partner, ordered, boxes, lam, H, W, involution):
            calls.append(("check", partner.dtype, ordered.tolist(), boxes.dtype, lam.dtype, H, W, involution))

        def mix(self, x, *args):
            calls.append(("mix",))
            return x.clone()

        def mix_(self, *args):
            calls.append(("mix_",))

    select = _backend.select
    monkeypatch.setattr(_ext, "ops", lambda: Ops())
    monkeypatch.setattr(_validate, "kernel_asserts", lambda *tensors: True)
    monkeypatch.setattr(_backend, "select", lambda name, *t, **k: {
        "mix": op._mix_cuda, "mix_": op._mix_inplace_cuda}.get(name) or select(name, *t, **k))
    x, partner = torch.randn(4, 3, 8, 6), torch.tensor([1, 0, 3, 2], dtype=torch.int32)
    boxes, lam, use_box = torch.tensor([[0, 8, 0, 6]] * 4, dtype=torch.int32), torch.rand(4, dtype=torch.float64), \
        torch.ones(4, dtype=torch.bool)
    fm.mix(x, torch.tensor([3, 1, 2, 0]), boxes, lam, use_box)
    assert calls == [("check", torch.int64, [0, 1, 2, 3], torch.int64, torch.float64, 8, 6, False), ("mix",)]
    calls.clear()
    fm.mix_(x, partner, boxes, lam, use_box)
    assert calls == [("check", torch.int64, [1, 0, 3, 2], torch.int64, torch.float64, 8, 6, True), ("mix_",)]
    calls.clear()
    fm.mix(x.clone().requires_grad_(), partner, boxes, lam, use_box)
    torch.ops.fastsd.mix(x, partner.long(), boxes.long(), lam, use_box, True)
    assert [c[0] for c in calls] == ["check", "mix", "check", "mix"]
    calls.clear()
    op.mix_unchecked(x, partner.long(), boxes.long(), lam, use_box)
    assert calls == [("mix",)]
