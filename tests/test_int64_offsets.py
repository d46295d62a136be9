"""Every Triton kernel in fastsd.kernels adds 64-bit offsets to its argument pointers (issue 7).

B * C * H * W (or B * K logits, or a layer's numel) can pass 2**31, so an offset added to the base
pointer of a tensor of that size must be int64 before it is added: a 32-bit one wraps around and
reads or writes someone else's memory. The check reads the TTIR of every AOT spec (every kernel and
every dtype / layout / flag variant its launcher uses; see tests/triton_tools.py), compiled for
sm_90: the type of every ``tt.addptr`` offset applied to an argument pointer, directly or through
splat/broadcast. Offsets added to pointers derived from those (``row + offs`` within a row of K < 2**31
elements) are in-row indices and may stay 32-bit. Patch swap's variants are also checked, for fp32
only, in test_patch_swap_triton.py; this covers all kernels and dtypes.

:data:`SMALL` lists, per kernel, the arguments that never hold 2**31 elements, with the reason.
"""
import pytest

import triton_tools

SPECS = triton_tools.all_aot_specs()
SMALL = {
    "_pair_counts_kernel": {"labels_ptr": "[B]", "partner_ptr": "[B]", "counts_ptr": "2 counters"},
    "_pair_stats_kernel": {"labels_ptr": "[B]", "partner_ptr": "[B]", "counts_ptr": "2 counters",
                           "stats_ptr": "[B, chunks, 2]: a pair of values per chunk of >= 4096 logits"},
    "_pair_kd_kernel": {"labels_ptr": "[B]", "partner_ptr": "[B]", "counts_ptr": "2 counters",
                        "stats_ptr": "[B, chunks, 2]", "loss_ptr": "one value per row (or row chunk)"},
    "_kd_stats_kernel": {"stats_ptr": "[B, chunks, 2]: a pair of values per chunk of >= 4096 logits"},
    "_kd_kernel": {"stats_ptr": "[B, chunks, 2]", "loss_ptr": "one value per row (or row chunk)"},
    "_feature_elementwise_kernel": {"partial_ptr": "one value per program (numel / 4096)"},
    "_feature_cosine_kernel": {"partial_ptr": "one value per program"},
    "_pair_kernel": {"sorted_ptr": "[B] labels", "by_label_ptr": "[B]", "order_ptr": "[B]", "partner_ptr": "[B]"},
    "_mask_kernel": {"partner_ptr": "[B] (noise and mask rows, B * cells, are the large ones)"},
}


def _kernel(spec):
    return spec["fn"].__name__ if hasattr(spec["fn"], "__name__") else spec["fn"].fn.__name__


@pytest.fixture(scope="module")
def compiled():
    return triton_tools.aot_compile_all([(s["name"], 90) for s in SPECS])


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_argument_offsets_are_64_bit(compiled, spec):
    result = compiled[(spec["name"], 90)]
    assert result.error is None, result.error
    small = SMALL.get(_kernel(spec), {})
    offsets = triton_tools.argument_pointer_offsets(result.ttir)
    pointers = {name for name, ty in spec["signature"].items()
                if any(t.startswith("*") for t in ((ty,) if isinstance(ty, str) else ty))}
    if pointers - set(small):  # the check must see the large arguments (else it is stale, not passing)
        assert pointers & {arg for arg, _ in offsets} - set(small), (spec["name"], offsets)
    assert triton_tools.argument_offsets_are_64_bit(result.ttir, exempt=small) == [], offsets


def test_small_arguments_are_real_parameters():
    params = {}
    for s in SPECS:
        params.setdefault(_kernel(s), set()).update(k.split(".")[0] for k in s["signature"])
    for kernel, args in SMALL.items():
        assert kernel in params, f"SMALL names {kernel}, which has no AOT spec"
        assert set(args) <= params[kernel], (kernel, set(args) - params[kernel])


def test_check_sees_tuple_arguments_and_exemptions():
    bad = ("tt.func public @k(%students.0: !tt.ptr<f32> loc(\"students.0\"(#loc)), %partial_ptr: !tt.ptr<f32>) {\n"
           "  %s = tt.splat %students.0 : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>> loc(#loc3)\n"
           "  %s_1 = tt.addptr %s, %offs : tensor<64x!tt.ptr<f32>>, tensor<64xi32> loc(#loc3)\n"
           "  %2 = tt.addptr %partial_ptr, %pid : !tt.ptr<f32>, i32 loc(#loc4)\n")
    assert triton_tools.argument_pointer_offsets(bad) == [("students", "tensor<64xi32>"), ("partial_ptr", "i32")]
    assert triton_tools.argument_offsets_are_64_bit(bad) == ["tensor<64xi32>", "i32"]
    assert triton_tools.argument_offsets_are_64_bit(bad, exempt={"partial_ptr"}) == ["tensor<64xi32>"]
