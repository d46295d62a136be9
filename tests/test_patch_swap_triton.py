"""The Triton backend of patch swap under the interpreter: parity with the reference, memory
traffic, and 64-bit sample offsets in the compiled kernel (SPEC section 3).
"""
import re

import pytest
import torch

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
    for m in (mask, mask.to(torch.uint8)):
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


def test_shapes_cover_vector_widths():
    # Every VEC the launcher can pick, for every dtype and layout, is run by the parity tests.
    for dtype in DTYPES:
        for layout in LAYOUTS:
            used = {kernels._vec(W, gw, C if layout == "channels_last" else 1, kernels._vec_sizes(dtype)[-1])
                    for B, C, H, W, gh, gw in SHAPES if B * C * H * W > 1}
            assert used == set(kernels._vec_sizes(dtype)), (dtype, layout, used)


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
TRAFFIC_CASES = [(4, 3, 32, 32, 8, 8, torch.float32), (4, 3, 32, 32, 8, 8, torch.bfloat16),
                 (3, 5, 33, 47, 7, 6, torch.float16)]


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
    assert traffic["x"]["load"] <= 1.05 * size, report
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
                if s["constexprs"]["VEC"] * _ITEMSIZE[s["signature"]["x_ptr"][1:]] == 16]


@pytest.fixture(scope="module")
def compiled_sm90():
    return triton_tools.aot_compile_all([(name, 90) for name in sorted(set(FP32_SPECS + WIDEST_SPECS))])


@pytest.mark.parametrize("name", FP32_SPECS)
def test_sample_offsets_are_64_bit(compiled_sm90, name):
    result = compiled_sm90[(name, 90)]
    assert result.error is None, result.error
    assert "tt.addptr" in result.ttir
    assert argument_offsets_are_64_bit(result.ttir) == []


@pytest.mark.parametrize("name", WIDEST_SPECS)
def test_wide_groups_use_16_byte_accesses(compiled_sm90, name):
    # With VEC * itemsize == 16 both x loads and the store are 16-byte vector accesses on the GPU
    # (given the alignment the JIT specialises on), as the interpreter cannot show.
    result = compiled_sm90[(name, 90)]
    assert result.error is None, result.error
    vector = r"\.v(?:4\.b32|2\.b64)\b"
    assert re.search(r"ld\.global" + vector, result.ptx), "x loads are not 16-byte vectors"
    assert re.search(r"st\.global" + vector, result.ptx), "the store is not a 16-byte vector"
