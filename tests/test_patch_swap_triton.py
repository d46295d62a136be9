"""The Triton backend of patch swap under the interpreter: parity with the reference, memory
traffic, and 64-bit sample offsets in the compiled kernel (SPEC section 3).
"""
import re

import pytest
import torch
import triton
import triton.language as tl

import fastsd
from conftest import backward_tolerance
import triton_tools
from fastsd import _validate, reference
from fastsd.kernels import patch_swap as kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8]
FLOAT_DTYPES = [d for d in DTYPES if d.is_floating_point]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# (B, C, H, W, gh, gw): a grid that divides nothing, a single pixel, a full-resolution mask,
# an empty batch, one sample (its own partner), uneven cells, and grids whose cell runs let the
# kernel select per group of VEC elements (VEC 2..16 depending on dtype and layout; see
# test_shapes_cover_vector_widths).
SHAPES = [
    (3, 5, 33, 47, 7, 6),
    (1, 1, 1, 1, 1, 1),
    (2, 3, 8, 8, 8, 8),
    (0, 3, 8, 8, 2, 2),
    (1, 3, 9, 10, 3, 3),
    (5, 2, 21, 13, 4, 5),
    (3, 3, 32, 32, 8, 8),
    (3, 4, 16, 24, 2, 3),
    (2, 1, 6, 12, 3, 6),
    (2, 2, 4, 32, 2, 2),
    (2, 8, 3, 3, 3, 3),
    # Chunks of 16 or 32 bytes that hold one cell change (MIXED; the forward of 1- and 2-byte
    # elements merges words), and the narrow chunks of channels_last with 1-pixel cells (see
    # test_shapes_cover_every_spec).
    (2, 2, 2, 50, 2, 3),
    (2, 1, 4, 17, 2, 2),
    (2, 2, 2, 9, 2, 2),
    (2, 2, 2, 5, 2, 2),
    (2, 4, 3, 8, 3, 8),
    (2, 2, 3, 4, 3, 4),
    (2, 5, 4, 3, 2, 3),
    (2, 2, 2, 67, 2, 2),
    (2, 3, 4, 13, 2, 2),
    # EACH (16-byte chunks, a cell per element) for 1-3 px cells in NCHW rows of 16 bytes or more;
    # lines shorter than a 16-byte chunk keep 1-element and MIXED chunks (W = 1, 5; C*W = 3, 5).
    (2, 1, 2, 20, 2, 7),
    (2, 2, 4, 5, 2, 1),
    (2, 5, 4, 1, 2, 1),
    (2, 3, 4, 1, 2, 1),
    # EACH = 2 (lines of whole 16-byte chunks: W = 32 and 16 NCHW, C*W = 48 channels_last) and 1
    # (chunks across line ends: channels_last 1-pixel cells in lines of C*W = 15, run as NCHW).
    (2, 3, 2, 5, 2, 5),
    (2, 1, 3, 32, 2, 7),
    (2, 3, 2, 16, 2, 7),
    # channels_last EACH where W % gw != 0 (where it divides W, the launcher runs channels_last EACH
    # as NCHW EACH on lines of W * C: kernels.patch_swap._plan): lines of whole chunks and not.
    (2, 3, 3, 12, 2, 7),
    (2, 3, 3, 5, 2, 3),
    (2, 3, 3, 8, 2, 5),
    # EACH with CELL (NCHW cells of one power-of-two width, at most 4 bytes, in 1- and 2-byte
    # dtypes): 2-px cells on lines of whole chunks (fp16, uint8), 1-px (uint8), and across line ends
    # (2-px cells, uint8 4-px); the narrow vectors those shapes took before, now for 6- and 12-px
    # cells (fp16 VEC 2, uint8 VEC 4).
    (2, 2, 3, 16, 3, 8),
    (2, 2, 3, 16, 3, 16),
    (2, 3, 2, 20, 2, 10),
    (2, 2, 3, 20, 3, 5),
    (2, 2, 3, 12, 3, 2),
    (2, 2, 3, 24, 3, 2),
]
SHAPE_IDS = ["x".join(map(str, s[:4])) + f"-g{s[4]}x{s[5]}" for s in SHAPES]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64, torch.uint8: torch.uint8}


def _make(shape, dtype, layout, specials=True):
    B, C, H, W, gh, gw = shape
    if dtype.is_floating_point:
        x = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype)
        if specials and x.numel() >= 4:
            flat = x.view(-1)
            flat[1], flat[-1], flat[x.numel() // 2] = -0.0, float("nan"), float("-inf")
    else:
        x = torch.randint(0, 256, (B, C, H, W), dtype=dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    partner = torch.randperm(B)  # any permutation, not only an involution
    mask = torch.rand(B, gh, gw) < 0.5  # independent masks: backward cells where both sides add
    return x, partner, mask


def _bits(t):
    return t.view(_BITS[t.dtype])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_reference(shape, dtype, layout):
    x, partner, mask = _make(shape, dtype, layout)
    x_before = x.clone()
    # A uint8 mask of 0/1 bytes runs as the bool one (other nonzero bytes: test_patch_swap.py's
    # test_uint8_mask_swaps_where_its_byte_is_nonzero): once a shape.
    for m in (mask, mask.to(torch.uint8)) if dtype == torch.float32 and layout == "nchw" else (mask,):
        with fastsd.use_backend("triton"):
            out = fastsd.patch_swap(x, partner, m)
        expected = reference.patch_swap(x, partner, m)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert out.is_contiguous(memory_format=_validate.memory_format(x))  # x's layout (SPEC)
        if x.numel() > 1:
            assert out.is_contiguous(memory_format=LAYOUTS[layout])
        # A copy: bit-exact, -0.0, NaN and inf included.
        assert torch.equal(_bits(out), _bits(expected))
    assert torch.equal(_bits(x), _bits(x_before))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_matches_reference(shape, dtype, layout):
    x, partner, mask = _make(shape, dtype, layout, specials=False)
    x.requires_grad_(True)
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(dtype)  # grad_output != 1
    with fastsd.use_backend("triton"):
        out = fastsd.patch_swap(x, partner, mask)
        out.backward(grad_out)
    expected = reference.patch_swap_backward(grad_out.contiguous(memory_format=LAYOUTS[layout]), partner, mask)
    assert x.grad.dtype == dtype
    tol = backward_tolerance("triton", dtype)  # exact, but for the interpreter's bf16 truncation
    torch.testing.assert_close(x.grad, expected, **tol)
    # The same through autograd of the reference forward (torch.where + indexing).
    x_ref = x.detach().clone().requires_grad_(True)
    reference.patch_swap(x_ref, partner, mask).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)


def test_shapes_cover_every_spec():
    # Every (dtype, layout, direction, CHUNK, MIXED, EACH, CELL) of the AOT specs is run by the parity tests, and
    # every one the launcher picks for an aligned sample (C*H*W % 16 == 0, the JIT variant the specs
    # compile) is an AOT spec, so fastsd.bench.sass reads the code a GPU runs.
    specs = set()
    for spec in kernels.AOT_SPECS:
        c = spec["constexprs"]
        if not c["BIG"]:
            specs.add((c["CHANNELS_LAST"], c["BACKWARD"], c["CHUNK"], c["MIXED"], c["EACH"], c["CELL"],
                       spec["signature"]["x_ptr"]))
    used, aligned = set(), set()
    for shape in SHAPES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                x, _, _ = _make(shape, dtype, layout, specials=False)
                if x.numel() <= 1:
                    continue
                for backward in (False, True) if dtype.is_floating_point else (False,):
                    channels_last, *config = kernels.launch_config(x, shape[4], shape[5], backward)
                    key = (channels_last, backward, *config, f"*{kernels._TL_DTYPES[dtype]}")
                    used.add(key)
                    if x[0].numel() % 16 == 0:
                        aligned.add(key)
    assert specs <= used, sorted(specs - used)
    assert aligned <= specs, sorted(aligned - specs)


def test_channels_last_each_runs_as_nchw_unless_that_needs_int64():
    # kernels.patch_swap._plan: channels_last EACH with cells that divide W runs as NCHW [B, 1, H, W * C]
    # (a full-resolution mask here) unless the longer line's constants need the int64 variant,
    # where it stays channels_last (W * C * gw past 32 bits); beyond, channels_last's own need it.
    for W, expected in ((27000, (False, 2)), (46000, (True, 2)), (47000, (True, 0))):
        x = torch.empty(1, 3, 1, W).contiguous(memory_format=torch.channels_last)
        channels_last, _, _, each, _ = kernels.launch_config(x, 1, W, False)
        assert (channels_last, each) == expected, W
    x, partner, mask = _make((2, 3, 2, 9, 2, 9), torch.float16, "channels_last")
    assert kernels.launch_config(x, 2, 9, False)[0] is False  # as NCHW
    # 4 uint8 channels, 1-px cells: CELL on the view (4-element cells); where the view is refused, the
    # 4-element vectors these cells take without CELL, not channels_last EACH (a cold review's find)
    for W, expected in ((1000, (False, 16, False, 2, 4)), (23184, (True, 4, False, 0, 0))):
        wide = torch.empty(1, 4, 1, W, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        assert kernels.launch_config(wide, 1, W, False) == expected, W
    assert torch.equal(_bits(kernels.patch_swap(x, partner, mask)), _bits(reference.patch_swap(x, partner, mask)))


@pytest.mark.parametrize("n, d, a_max", [(1, 1, 2**31 - 1), (1, 3, 2**31 - 1), (1, 2**31 - 1, 2**31 - 1), (7, 7, 1000),
                                         (3, 224, 223), (224, 224, 223), (5, 33, 32), (1, 47, 2**20), (6, 47, 46),
                                         (46340, 46341, 46340), (1, 12, 12 * 13)])
def test_frac_constants_are_exact(n, d, a_max):
    # The kernel's floor(a * n / d) = (a * m) >> s, over the whole range and at every step of the
    # result near the ends (where an inexact multiplier would first be off by one).
    m, s = kernels._frac_constants(n, d, a_max)
    assert 0 < m < 2**32 and s < 64
    probe = set(range(min(a_max, 3000) + 1)) | set(range(max(0, a_max - 3000), a_max + 1))
    probe |= {q * d // n + r for q in range(0, a_max * n // d + 1, max(1, a_max * n // d // 500)) for r in (-1, 0, 1)}
    for a in sorted(p for p in probe if 0 <= p <= a_max):
        assert (a * m) >> s == a * n // d, (a, n, d)


def test_frac_constants_refuse_what_32_bits_cannot_hold():
    # h * gh // H for a 50000-row image with 1-row cells: no 32-bit multiplier; the launcher then
    # takes the int64 variant (test_int64_variant_matches_reference).
    assert kernels._frac_constants(50000, 50000, 50000) is None
    assert kernels._geometry(1, 1, 50000, 1, 50000, 1, False, 1024)[1]  # BIG


@pytest.fixture
def int64_variant(monkeypatch):
    """Every launch takes the BIG variant (int64 indices, plain divisions): what a sample of 2**31
    elements gets, forced on small ones."""
    monkeypatch.setattr(kernels, "_INT32", 1)
    kernels._geometry.cache_clear()
    yield
    kernels._geometry.cache_clear()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(3, 5, 33, 47, 7, 6), (2, 2, 2, 50, 2, 3), (2, 4, 3, 8, 3, 8)],
                         ids=["awkward", "mixed", "narrow"])
def test_int64_variant_matches_reference(int64_variant, shape, layout):
    for dtype in (torch.float32, torch.float16, torch.uint8):
        x, partner, mask = _make(shape, dtype, layout)
        assert kernels._geometry(*x.shape, *mask.shape[1:], _validate.memory_format(x) == torch.channels_last,
                                 1024)[1]
        assert torch.equal(_bits(kernels.patch_swap(x, partner, mask)), _bits(reference.patch_swap(x, partner, mask)))
        if dtype.is_floating_point:
            g = torch.randn(x.shape).to(dtype).contiguous(memory_format=LAYOUTS[layout])
            torch.testing.assert_close(kernels.patch_swap_backward(g, partner, mask),
                                       reference.patch_swap_backward(g, partner, mask),
                                       **backward_tolerance("triton", dtype))


def test_tall_full_resolution_mask():
    # h * gh // H with H = gh = 50000 needs a 33-bit multiplier: the launcher takes the int64 variant.
    x = torch.randn(2, 1, 50000, 1)
    partner, mask = torch.tensor([1, 0]), torch.rand(2, 50000, 1) < 0.5
    assert torch.equal(kernels.patch_swap(x, partner, mask), reference.patch_swap(x, partner, mask))


def test_backward_takes_the_inverse_partner():
    x, partner, mask = _make((5, 3, 9, 10, 3, 3), torch.float32, "nchw", specials=False)
    inverse = torch.argsort(partner)
    expected = reference.patch_swap_backward(x, partner, mask)
    assert torch.equal(kernels.patch_swap_backward(x, partner, mask, inverse_partner=inverse), expected)
    # It is used, not recomputed: a wrong one gives a wrong gradient.
    assert not torch.equal(kernels.patch_swap_backward(x, partner, mask, inverse_partner=partner.roll(1)), expected)


def test_forward_asserts_the_sorted_partner_on_the_device(monkeypatch):
    # With sorted_partner the kernel itself asserts sorted_partner == range(B) (tl.device_assert,
    # compiled in with debug=True; the interpreter does not run it, so the launch is checked here
    # and the compiled assert in test_forward_spec_compiles_the_assert).
    x, partner, mask = _make((4, 3, 8, 8, 2, 2), torch.float32, "nchw", specials=False)
    launches = []
    kernel = kernels.cell_select_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((args, kwargs))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "cell_select_kernel", Recorder())
    sorted_partner = torch.sort(partner).values
    out = kernels.patch_swap(x, partner, mask, sorted_partner=sorted_partner)
    kernels.patch_swap(x, partner, mask)
    assert torch.equal(out, reference.patch_swap(x, partner, mask))
    (checked, options), (unchecked, _) = launches
    assert checked[4] is sorted_partner and checked[6] == x.shape[0] and unchecked[6] == -x.shape[0]
    assert options["debug"] and not options["sanitize_overflow"]


def test_forward_sorted_partner_assert_fires(device_asserts):
    # The assert itself, run by the interpreter with debug on (as on a GPU launch).
    x, partner, mask = _make((4, 3, 8, 8, 2, 2), torch.float32, "nchw", specials=False)
    out = kernels.patch_swap(x, partner, mask, sorted_partner=torch.sort(partner).values)
    assert torch.equal(out, reference.patch_swap(x, partner, mask))
    bad = torch.tensor([0, 0, 1, 2])  # in range, not a permutation
    with pytest.raises(Exception, match="partner must be a permutation"):
        kernels.patch_swap(x, bad, mask, sorted_partner=torch.sort(bad).values)
    kernels.patch_swap(x, bad, mask)  # unchecked without sorted_partner


@pytest.mark.parametrize("value", [-1, 4, 10**9, 2**32 + 2, -2**32])
@pytest.mark.parametrize("shape, dtype", [((4, 3, 8, 8, 2, 2), torch.float32), ((4, 2, 5, 12, 2, 3), torch.uint8)])
def test_forward_partner_out_of_range_stays_inside_x(device_asserts, shape, dtype, value):
    """A partner outside range(B) fails the permutation assert, but on a GPU that assert may fire in
    another program after this one has loaded: the program reads inside x instead, sample B - 1 or
    the one the value's low 32 bits name (never an address outside x, whose fault would hide the
    assert's message), and the assert still fires."""
    x, partner, mask = _make(shape, dtype, "nchw", specials=False)
    mask[1] = True  # row 1 takes every cell from its partner
    bad = partner.clone()
    bad[1] = value
    low = bad & 0xFFFFFFFF  # the kernel's int32 of the value, as unsigned
    clamped = torch.where(low < 4, low, 3)
    assert torch.equal(kernels.patch_swap(x, bad, mask), reference.patch_swap(x, clamped, mask))
    with pytest.raises(Exception, match="partner must be a permutation"):
        kernels.patch_swap(x, bad, mask, sorted_partner=torch.sort(bad).values)


def test_misaligned_sample_falls_back_to_whole_chunks():
    # The forward's word merge of MIXED chunks needs 4-byte aligned samples: a view one byte into its
    # storage takes chunks that never straddle a cell instead, with the same result.
    base, partner, mask = _make((2, 2, 2, 50, 2, 3), torch.uint8, "nchw")
    x = torch.empty(base.numel() + 1, dtype=torch.uint8)[1:].view(base.shape).copy_(base)
    assert kernels.launch_config(base, 2, 3, False)[2] and not kernels.launch_config(x, 2, 3, False)[2]
    assert torch.equal(kernels.patch_swap(x, partner, mask), reference.patch_swap(base, partner, mask))


def test_misaligned_gradient_falls_back_to_whole_chunks():
    # The 16-bit backward's word select of MIXED chunks (HALVES) needs 4-byte aligned samples too: a
    # gradient one element into its storage takes chunks that never straddle a cell instead.
    base, partner, mask = _make((2, 2, 2, 50, 2, 3), torch.float16, "nchw", specials=False)
    grad = torch.empty(base.numel() + 1, dtype=base.dtype)[1:].view(base.shape).copy_(base)
    assert kernels.launch_config(base, 2, 3, True)[2] and not kernels.launch_config(grad, 2, 3, True)[2]
    torch.testing.assert_close(kernels.patch_swap_backward(grad, partner, mask),
                               reference.patch_swap_backward(base, partner, mask), rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_launchers_on_empty_batch(layout):
    x = torch.empty(0, 3, 8, 8).contiguous(memory_format=LAYOUTS[layout])
    partner, mask = torch.empty(0, dtype=torch.int64), torch.empty(0, 2, 2, dtype=torch.bool)
    for fn in (kernels.patch_swap, kernels.patch_swap_backward):
        out = fn(x, partner, mask)
        assert out.shape == x.shape and out.is_contiguous(memory_format=_validate.memory_format(x))


def test_launchers_do_not_sync_with_the_host(monkeypatch):
    x, partner, mask = _make((3, 3, 32, 32, 8, 8), torch.float32, "nchw", specials=False)
    expected = (reference.patch_swap(x, partner, mask), reference.patch_swap_backward(x, partner, mask))

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation in a patch swap launcher")

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    got = (kernels.patch_swap(x, partner, mask), kernels.patch_swap_backward(x, partner, mask))
    monkeypatch.undo()
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_non_contiguous_partner():
    x, _, mask = _make((4, 2, 6, 6, 3, 3), torch.float32, "nchw", specials=False)
    pairs = torch.stack([torch.tensor([2, 3, 0, 1]), torch.zeros(4, dtype=torch.int64)], dim=1)
    partner = pairs[:, 0]  # a strided view
    assert not partner.is_contiguous()
    assert torch.equal(kernels.patch_swap(x, partner, mask), reference.patch_swap(x, partner, mask))


def test_backward_is_forward_for_an_involution_with_shared_masks():
    # SPEC: for an involution with shared masks the backward is the forward op on g.
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    partner = fastsd.intra_class_pairs(labels)
    mask = fastsd.patch_swap_mask(partner, (4, 3))
    g = torch.randn(7, 3, 11, 9)
    assert torch.equal(kernels.patch_swap_backward(g, partner, mask), kernels.patch_swap(g, partner, mask))


# --- memory traffic ---------------------------------------------------------------------------------

# A CIFAR-like batch (cells of 4 px: VEC > 1) and an awkward one (VEC 1, ragged blocks).
# A CIFAR-like batch (cells of 4 px: whole 16-byte chunks), an awkward one (ragged blocks) and two
# whose chunks may straddle a cell change (MIXED: 3 uneven cells a row).
TRAFFIC_CASES = [(4, 3, 32, 32, 8, 8, torch.float32), (4, 3, 32, 32, 8, 8, torch.bfloat16),
                 (3, 5, 33, 47, 7, 6, torch.float16), (2, 3, 6, 34, 3, 3, torch.float32),
                 (2, 2, 2, 50, 2, 3, torch.float16)]


def _straddling_bytes(x, mask, backward):
    """Bytes a launch may read beyond the elements it needs: where MIXED or EACH, a chunk that holds a
    cell change reads the whole chunk from each source it needs anywhere in it (one vector load each;
    the extra bytes lie in the 32-byte sectors the needed ones come from, so DRAM traffic does not grow)."""
    B, C, H, W = x.shape
    gh, gw = mask.shape[1:]
    _, chunk, mixed, each, _ = kernels.launch_config(x, gh, gw, backward)
    if not (mixed or each):
        return 0
    channels_last = _validate.memory_format(x) == torch.channels_last  # the cells of x's own layout
    cell = (torch.arange(H)[:, None] * gh // H) * gw + torch.arange(W)[None, :] * gw // W
    flat = (cell[:, :, None].expand(H, W, C) if channels_last else cell.expand(C, H, W)).reshape(-1)
    flat = torch.cat([flat, flat[-1:].expand(-flat.numel() % chunk)])  # the sample's last chunk
    chunks = flat.view(-1, chunk)
    straddling = int((chunks.amin(1) != chunks.amax(1)).sum())
    return B * straddling * chunk * x.element_size() * (2 if backward else 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", TRAFFIC_CASES,
                         ids=lambda c: "x".join(map(str, c[:4])) + "-" + str(c[-1]).replace("torch.", ""))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_traffic_is_one_read_and_one_write(direction, case, layout, record_property):
    *shape, dtype = case
    x, partner, mask = _make(tuple(shape), dtype, layout, specials=False)
    # the forward op returns (out, inverse_partner)
    op = (lambda *a: torch.ops.fastsd.patch_swap(*a)[0]) if direction == "forward" else torch.ops.fastsd.patch_swap_backward
    with fastsd.use_backend("triton"):
        out, traffic = triton_tools.count_traffic(op, x, partner, mask,
                                                  tensors={"x": x, "partner": partner, "mask": mask})
    torch.testing.assert_close(
        out, (reference.patch_swap if direction == "forward" else reference.patch_swap_backward)(x, partner, mask))
    size = x.numel() * x.element_size()
    report = (f"{direction} {tuple(shape)} {dtype} {layout}: x {x.nbytes} B, mask {mask.numel()} B, "
              f"partner {partner.nbytes} B; counted {traffic}")
    record_property("traffic", report)
    print(report)
    assert traffic["x"]["load"] <= 1.05 * size + _straddling_bytes(x, mask, direction == "backward"), report
    assert traffic["x"]["store"] == 0, report
    assert size <= traffic["out"]["store"] <= 1.05 * size, report
    assert traffic["out"]["load"] == 0, report
    # The mask is gathered per element (it is tiny and stays in cache on a GPU): at most one byte
    # per element and direction it is read for; the partner (or inverse) one int64 per program.
    assert traffic["mask"]["load"] <= (1 if direction == "forward" else 2) * x.numel(), report
    assert traffic["mask"]["store"] == traffic["partner"]["store"] == traffic["other"]["store"] == 0, report


# --- 64-bit sample offsets ------------------------------------------------------------------------------

argument_offsets_are_64_bit = triton_tools.argument_offsets_are_64_bit  # shared with test_int64_offsets


def test_ttir_check_catches_32_bit_offsets():
    bad = ("tt.func public @k(%x_ptr: !tt.ptr<f32>, %n: i32) {\n"
           "  %0 = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>>\n"
           "  %1 = tt.addptr %0, %offs : tensor<128x!tt.ptr<f32>>, tensor<128xi32>\n")
    assert argument_offsets_are_64_bit(bad) == ["tensor<128xi32>"]


FP32_SPECS = [s["name"] for s in kernels.AOT_SPECS if "_fp32_" in s["name"]]
_ITEMSIZE = {ty: dtype.itemsize for dtype, ty in kernels._TL_DTYPES.items()}
# The specs whose groups are 16 bytes wide: VEC * itemsize == 16.
WIDEST_SPECS = [s["name"] for s in kernels.AOT_SPECS
                if s["constexprs"]["CHUNK"] * _ITEMSIZE[s["signature"]["x_ptr"][1:]] == 16]


@pytest.fixture(scope="module")
def compiled_sm90():
    return triton_tools.aot_compile_all([(name, 90) for name in sorted(set(FP32_SPECS + WIDEST_SPECS))])


@pytest.mark.parametrize("name", FP32_SPECS)
def test_sample_offsets_are_64_bit(compiled_sm90, name):
    result = compiled_sm90[(name, 90)]
    assert result.error is None, result.error
    assert "tt.addptr" in result.ttir
    assert argument_offsets_are_64_bit(result.ttir) == []


def test_forward_spec_compiles_the_assert(compiled_sm90):
    # The device-side permutation check is in the forward's code (debug=True), not the backward's.
    ptx = {name: compiled_sm90[(name, 90)].ptx for name in FP32_SPECS}
    assert all(("__assertfail" in p) == ("_forward_" in n) for n, p in ptx.items()), sorted(ptx)


@pytest.mark.parametrize("name", WIDEST_SPECS)
def test_wide_groups_use_16_byte_accesses(compiled_sm90, name):
    # With VEC * itemsize == 16 both x loads and the store are 16-byte vector accesses on the GPU
    # (given the alignment the JIT specialises on), as the interpreter cannot show.
    result = compiled_sm90[(name, 90)]
    assert result.error is None, result.error
    vector = r"\.v(?:4\.b32|2\.b64)\b"
    assert re.search(r"ld\.global" + vector, result.ptx), "x loads are not 16-byte vectors"
    assert re.search(r"st\.global" + vector, result.ptx), "the store is not a 16-byte vector"


@triton.jit
def _words_of_kernel(n_ptr, out_ptr, ITEMSIZE: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, kernels._words_of(tl.load(n_ptr + i), ITEMSIZE))


def test_word_indices_hold_up_to_2_31_elements():
    # The word paths (EACH and MIXED forwards of 1- and 2-byte elements) index samples of up to
    # 2**31 - BLOCK elements in int32, their words too: n * itemsize // 4 without the product,
    # which overflows from 2**30 2-byte elements (a cold review found the write then wild).
    n = torch.tensor([0, 4, 8, 2**30 - 4, 2**30, 2**30 + 8, 2**31 - 2**16, 2**31 - 4], dtype=torch.int32)
    for itemsize in (1, 2):
        out = torch.empty_like(n)
        _words_of_kernel[(1,)](n, out, ITEMSIZE=itemsize, N=n.numel())
        assert out.tolist() == [v * itemsize // 4 for v in n.tolist()], itemsize


@pytest.mark.parametrize("shape, layout", [((1, 3, 4, 21, 4, 7), "nchw"), ((1, 1, 1, 40, 1, 13), "nchw"),
                                           ((1, 3, 4, 7, 4, 7), "channels_last"), ((1, 3, 4, 16, 4, 7), "nchw"),
                                           ((1, 3, 4, 16, 4, 16), "channels_last")],
                         ids=["3x4x21-nchw", "1x1x40-nchw", "3x4x7-channels_last", "3x4x16-nchw", "3x4x16-g4x16-channels_last"])
def test_each_reads_no_mask_byte_outside_the_rows(shape, layout):
    # EACH loads the mask bytes unmasked, past the sample's end too (its last program's tail, a
    # chunk's next line): every cell it computes must lie in the sample's own mask row (the clamps
    # of h in channels_last, the wrap of h in NCHW). With one sample, a byte outside the row is
    # outside the mask tensor: counted as "other" (or as x's or out's, which read nothing else).
    for dtype in (torch.float32, torch.float16, torch.uint8):
        x, partner, mask = _make(shape, dtype, layout, specials=False)
        for backward in (False, True) if dtype.is_floating_point else (False,):
            assert kernels.launch_config(x, shape[4], shape[5], backward)[3], (dtype, backward)  # EACH
            _assert_reads_inside_the_tensors(x, partner, mask, backward)


def _assert_reads_inside_the_tensors(x, partner, mask, backward):
    """The launch's result, and its loads and stores counted: none outside x, partner, mask and out,
    out never read, x read at most twice."""
    fn = kernels.patch_swap_backward if backward else kernels.patch_swap
    kwargs = {"inverse_partner": partner} if backward else {}
    out, traffic = triton_tools.count_traffic(fn, x, partner, mask, tensors={"x": x, "partner": partner, "mask": mask},
                                              **kwargs)
    expected = (reference.patch_swap_backward if backward else reference.patch_swap)(x, partner, mask)
    assert torch.equal(_bits(out), _bits(expected))
    assert traffic["other"] == {"load": 0, "store": 0}, traffic
    assert traffic["out"]["load"] == 0 and traffic["x"]["load"] <= 2 * x.nbytes, traffic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8], ids=lambda d: str(d).replace("torch.", ""))
def test_each_finds_the_cell_of_every_element(dtype):
    # Both EACH variants (1: a chunk may cross a line end, 2: lines of whole chunks), with a mask
    # that differs between any two neighbouring cells (a checkerboard, shifted a sample): an element
    # given the cell of a neighbouring row or column (the next line's row taken as the cell row
    # below, a crossing missed) changes the result. The random masks of the other tests leave such
    # a mistake a fair chance of going unseen with few cells.
    cases = [((2, 3, 6, 20, 3, 7), "nchw"), ((2, 3, 6, 32, 3, 7), "nchw"), ((2, 2, 4, 5, 2, 1), "nchw"),
             ((2, 3, 6, 5, 3, 5), "channels_last"), ((2, 3, 4, 16, 2, 7), "channels_last")]
    seen = _checkerboards(dtype, cases, lambda config: config[3])  # EACH
    assert seen == {1, 2}, seen


def _checkerboards(dtype, cases, variant):
    """Each (shape, layout) of ``cases`` with checkerboard masks, shifted a sample, forward and (floats)
    backward, where ``variant(launch_config)`` is truthy: equal to the reference, bit for bit. Returns
    the variants seen."""
    seen = set()
    for shape, layout in cases:
        x, _, _ = _make(shape, dtype, layout, specials=False)
        B, _, _, _, gh, gw = shape
        r, c = torch.arange(gh)[:, None], torch.arange(gw)[None, :]
        mask = torch.stack([(r + c + b) % 2 == 1 for b in range(B)])
        partner = torch.arange(B).flip(0)
        for backward in (False, True) if dtype.is_floating_point else (False,):
            which = variant(kernels.launch_config(x, gh, gw, backward))
            if not which:
                continue
            seen.add(which)
            out = (kernels.patch_swap_backward if backward else kernels.patch_swap)(x, partner, mask)
            expected = (reference.patch_swap_backward if backward else reference.patch_swap)(x, partner, mask)
            assert torch.equal(_bits(out), _bits(expected)), (shape, layout, backward, which)
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.uint8], ids=lambda d: str(d).replace("torch.", ""))
def test_cell_variant_finds_the_cell_of_every_element(dtype):
    # EACH with CELL (kernels.patch_swap._cell_width: cells of one power-of-two width): an element's
    # cell is its chunk's first cell plus its constant place (k // CELL), its byte picked from one
    # vector load of the chunk's cell bytes on lines of whole chunks, loaded per cell across line ends.
    # Checkerboard masks, shifted a sample: an element given a neighbouring cell, or a byte of the
    # wrong place in the chunk, changes the result. channels_last with 2 channels runs as NCHW lines
    # of 2-element cells (1-px cells, W * C wide).
    cases = [((2, 2, 3, 16, 3, 16), "nchw"), ((2, 2, 3, 16, 3, 8), "nchw"), ((2, 3, 2, 20, 2, 10), "nchw"),
             ((2, 2, 3, 20, 3, 5), "nchw"), ((2, 2, 4, 32, 4, 8), "nchw"), ((2, 2, 3, 8, 3, 8), "channels_last"),
             ((2, 2, 3, 10, 3, 10), "channels_last")]
    seen = _checkerboards(dtype, cases, lambda config: config[3:] if config[4] else None)  # (EACH, CELL)
    # (EACH, CELL): lines of whole chunks (2) or not (1); 1-px cells only on lines of whole chunks
    assert seen == ({(2, 1), (2, 2), (1, 2)} if dtype.itemsize == 2 else {(2, 1), (2, 2), (1, 2), (1, 4), (2, 4)}), seen


@pytest.mark.parametrize("shape", [(1, 3, 4, 16, 4, 16), (1, 1, 3, 40, 3, 20), (1, 2, 2, 20, 2, 5)],
                         ids=["3x4x16-g4x16", "1x3x40-g3x20", "2x2x20-g2x5"])
def test_cell_variant_reads_no_mask_byte_outside_the_rows(shape):
    # As test_each_reads_no_mask_byte_outside_the_rows, for CELL: the chunk's cell bytes in one load
    # at a line's end, and the cells of a chunk that crosses a line end or the sample's end.
    ran = 0
    for dtype in (torch.float16, torch.uint8):
        x, partner, mask = _make(shape, dtype, "nchw", specials=False)
        for backward in (False, True) if dtype.is_floating_point else (False,):
            if kernels.launch_config(x, shape[4], shape[5], backward)[4]:  # CELL
                ran += 1
                _assert_reads_inside_the_tensors(x, partner, mask, backward)
    assert ran, "no CELL launch"
