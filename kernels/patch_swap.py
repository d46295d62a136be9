"""Triton kernels of patch swap (SPEC section 3).

Forward: ``out[i, c, h, w] = x[partner[i], c, h, w]`` where ``mask[i, cell(h, w)]``, else
``x[i, c, h, w]``, with ``cell(h, w) = (floor(h * gh / H), floor(w * gw / W))``.

Backward, with q the inverse permutation of partner:
``grad_x[j] = g[j] * (1 - mask[j]) + g[q[j]] * mask[q[j]]``, evaluated cell by cell.

Both directions are one gather, ``cell_select`` (the same as csrc/cpu/patch_swap.cpp)::

    out[b] = (keep ? x[b] : 0) + (take ? x[src[b]] : 0)
    keep = !mask[b, cell],  take = mask[mask_row[b], cell]
    forward:  src = partner, mask_row = b   (exactly one of keep/take holds: a copy)
    backward: src = mask_row = q = argsort(partner)

Each selected input element is loaded once (masked loads), and the two sides are added only where
both keep and take hold, so copies are bit-exact (-0.0 and NaN included); that add runs in fp32
for 16-bit floats. No atomics: the backward is bitwise deterministic.

Grid: one program per (sample, block of the sample's C*H*W elements), flattened to one axis.
A block is [BLOCK // VEC, VEC]: groups of VEC contiguous elements that the launcher has checked
never straddle two cells (VEC divides every cell boundary of a row, in elements), so each group
reads one mask byte and the masked loads and the store become 16-byte vector accesses on the GPU
(VEC = 1 when the grid does not allow it, e.g. 47 px in 6 cells). Sample offsets are int64
(B*C*H*W may pass 2**31); the index inside a sample takes the width of ``sample_numel`` as the JIT
passes it (i32 below 2**31, i64 above), so the common case keeps 32-bit divisions.

Under TRITON_INTERPRET=1 (CPU tensors, tests only) the launcher uses larger blocks: the
interpreter's cost grows with the number of programs.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fastsd import _validate


@triton.jit
def cell_select_kernel(
    x_ptr,  # [B, C, H, W] input (x forward, grad backward), NCHW or channels_last contiguous
    out_ptr,  # same shape, dtype and layout as x
    src_ptr,  # int64 [B]: the sample whose `take` cells are read (partner forward, q backward)
    mask_ptr,  # uint8 [B, gh, gw], nonzero = swap
    C,
    H,
    W,
    gh,
    gw,
    sample_numel,  # C * H * W
    blocks_per_sample,
    BLOCK: tl.constexpr,  # elements a program
    VEC: tl.constexpr,  # the launcher's promise: aligned groups of VEC elements never straddle two cells
    CHANNELS_LAST: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK // VEC
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    blk = pid - b * blocks_per_sample
    # First element of each group; `sample_numel * 0` gives it the width of sample_numel as the
    # JIT passes it (i64 only past 2**31 elements a sample).
    first = ((blk + sample_numel * 0) * GROUPS + tl.arange(0, GROUPS)) * VEC
    e = first[:, None] + tl.arange(0, VEC)[None, :]  # [GROUPS, VEC] in-sample element index
    valid = e < sample_numel

    # One cell per group (from its first element): the select below is uniform along VEC, so the
    # compiler can vectorise the masked loads and the store.
    if CHANNELS_LAST:
        w = (first // C) % W
        h = first // (C * W)
    else:
        w = first % W
        h = (first // W) % H
    cell = (h * gh // H) * gw + w * gw // W
    in_sample = first < sample_numel

    b64 = b.to(tl.int64)
    src = tl.load(src_ptr + b64)  # int64
    cells = gh * gw
    if BACKWARD:
        keep = tl.load(mask_ptr + b64 * cells + cell, mask=in_sample, other=1) == 0
        take = tl.load(mask_ptr + src * cells + cell, mask=in_sample, other=0) != 0
    else:
        take = tl.load(mask_ptr + b64 * cells + cell, mask=in_sample, other=0) != 0
        keep = ~take
    keep = keep[:, None]
    take = take[:, None]

    # Each selected input element is loaded once; the other side's load is masked off.
    s = tl.load(x_ptr + b64 * sample_numel + e, mask=valid & keep, other=0)
    t = tl.load(x_ptr + src * sample_numel + e, mask=valid & take, other=0)
    out = tl.where(keep, s, t)  # a bit-exact copy (or 0 where neither side is selected)
    if BACKWARD:
        if s.dtype.primitive_bitwidth < 32:  # fp16/bf16: add in fp32, round once
            both = (s.to(tl.float32) + t.to(tl.float32)).to(s.dtype)
        else:
            both = s + t
        out = tl.where(keep & take, both, out)
    tl.store(out_ptr + b64 * sample_numel + e, out, mask=valid)


# --- launch configuration ------------------------------------------------------------------------

NUM_WARPS = 4
# 32 bytes per thread on the GPU: 1024 fp32, 2048 fp16/bf16, 4096 uint8, 512 fp64 elements a program.
_BYTES_PER_THREAD = 32
# Widest global access: 16 bytes (ld.global.v4.b32).
_VECTOR_BYTES = 16
# Under the interpreter, cost grows with the number of programs, not with the block size.
_INTERPRETER_MAX_BLOCK = 1 << 16

_TL_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.uint8: "u8",
}


def _gpu_block(dtype: torch.dtype) -> int:
    return NUM_WARPS * 32 * _BYTES_PER_THREAD // dtype.itemsize


def _vec_sizes(dtype: torch.dtype):
    """The VEC values the launcher may pick for ``dtype``: powers of two up to 16 bytes."""
    return [1 << i for i in range((_VECTOR_BYTES // dtype.itemsize).bit_length())]


@functools.lru_cache(maxsize=1024)
def _vec(W: int, gw: int, unit: int, widest: int) -> int:
    """Largest power of two <= widest that divides every cell boundary along a row.

    Within a row, cell cw covers columns [ceil(cw * W / gw), ceil((cw + 1) * W / gw)), i.e. elements
    ``unit`` times those (unit = C in channels_last, 1 in NCHW); rows (and NCHW planes) start at
    multiples of W * unit. When VEC divides all of them, no aligned group of VEC elements straddles
    two cells, so the kernel can select per group.
    """
    g = 0
    for cw in range(1, gw + 1):
        g = math.gcd(g, -(-cw * W // gw) * unit)
    vec = widest
    while g % vec:
        vec //= 2
    return vec


def _launch(x: torch.Tensor, src: torch.Tensor, mask: torch.Tensor, backward: bool) -> torch.Tensor:
    fmt = _validate.memory_format(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    B, C, H, W = x.shape
    sample_numel = C * H * W
    if B == 0 or sample_numel == 0:
        return out
    gh, gw = mask.shape[1], mask.shape[2]
    src, mask = src.contiguous(), mask.contiguous()  # no-ops for the validated inputs
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    channels_last = fmt == torch.channels_last
    vec = _vec(W, gw, C if channels_last else 1, _vec_sizes(x.dtype)[-1])
    block = _gpu_block(x.dtype)
    if x.device.type == "cpu":  # only under TRITON_INTERPRET=1: few, large programs run fastest
        block = max(block, min(triton.next_power_of_2(sample_numel), _INTERPRETER_MAX_BLOCK))
    blocks_per_sample = triton.cdiv(sample_numel, block)
    cell_select_kernel[(B * blocks_per_sample,)](
        x, out, src, mask,
        C, H, W, gh, gw, sample_numel, blocks_per_sample,
        BLOCK=block, VEC=vec, CHANNELS_LAST=channels_last, BACKWARD=backward,
        num_warps=NUM_WARPS,
    )
    return out


def patch_swap(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward patch swap. ``x`` contiguous (NCHW or channels_last), ``partner`` int64 ``[B]``
    permutation, ``mask`` bool/uint8 ``[B, gh, gw]`` contiguous (validated by the caller)."""
    return _launch(x, partner, mask, backward=False)


def patch_swap_backward(grad: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`patch_swap` with respect to x: a gather with q = argsort(partner)."""
    inverse_partner = torch.argsort(partner)  # on the device: no host sync, deterministic
    return _launch(grad, inverse_partner, mask, backward=True)


# --- ahead-of-time compilation specs (tests/test_aot.py) -------------------------------------------


def _aot_specs():
    specs = []
    for dtype, ty in _TL_DTYPES.items():
        for backward in (False, True):
            if backward and not dtype.is_floating_point:
                continue  # uint8 has no gradient
            for channels_last in (False, True):
                for vec in _vec_sizes(dtype):
                    direction = "backward" if backward else "forward"
                    layout = "channels_last" if channels_last else "nchw"
                    signature = {
                        "x_ptr": f"*{ty}", "out_ptr": f"*{ty}", "src_ptr": "*i64", "mask_ptr": "*u8",
                        "C": "i32", "H": "i32", "W": "i32", "gh": "i32", "gw": "i32",
                        "sample_numel": "i32", "blocks_per_sample": "i32",
                        "BLOCK": "constexpr", "VEC": "constexpr", "CHANNELS_LAST": "constexpr",
                        "BACKWARD": "constexpr",
                    }
                    # What the JIT specialises on for typical images: 16-byte aligned tensors and
                    # C*H*W % 16 == 0 (e.g. 3 x 32 x 32, 3 x 224 x 224).
                    aligned = ("x_ptr", "out_ptr", "src_ptr", "mask_ptr", "sample_numel")
                    specs.append({
                        "name": f"patch_swap_{direction}_{ty}_{layout}_vec{vec}",
                        "fn": cell_select_kernel,
                        "signature": signature,
                        "constexprs": {"BLOCK": _gpu_block(dtype), "VEC": vec, "CHANNELS_LAST": channels_last,
                                       "BACKWARD": backward},
                        "attrs": {(list(signature).index(a),): [["tt.divisibility", 16]] for a in aligned},
                        "options": {"num_warps": NUM_WARPS},
                    })
    # The JIT turns integer arguments equal to 1 into constexprs (C = 1 images, one cell, one
    # block a sample); compile the extreme where all of them are.
    for backward in (False, True):
        base = next(s for s in specs if s["name"] == f"patch_swap_{'backward' if backward else 'forward'}_fp32_nchw_vec1")
        ints = [a for a, t in base["signature"].items() if t == "i32"]
        specs.append({**base, "name": base["name"] + "_int_args_1",
                      "signature": {a: "constexpr" if a in ints else t for a, t in base["signature"].items()},
                      "constexprs": {**base["constexprs"], **{a: 1 for a in ints}},
                      "attrs": {k: v for k, v in base["attrs"].items()
                                if list(base["signature"])[k[0]] not in ints}})
    return specs


# Every (dtype, layout, direction, VEC) the launchers use on the GPU, for triton.compile without a GPU.
AOT_SPECS = _aot_specs()
