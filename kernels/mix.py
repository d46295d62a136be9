"""Triton kernel of the fused mix op (SPEC section 6): CutMix box rows and MixUp rows in one pass.

Per row i, with p = partner[i] and (y0, y1, x0, x1) = boxes[i] (half-open), as
fastsd/reference/mix.py defines it:

* CutMix row (``use_box[i]``): ``out[i, :, h, w] = x[p, :, h, w]`` inside the box, else ``x[i]``;
* MixUp row: ``out[i] = x[i] * lam[i] + x[p] * (1 - lam[i])``, rounded as the reference rounds it
  (:func:`_mixup`): no fused multiply-add (the launch compiles with ``enable_fp_fusion=False``), each
  product of a 16-bit x rounded to its dtype before the float32 sum, uint8 rounded half to even.
  The weights come from lam in the kernel (one scalar load a row): ``lam`` cast to the compute type
  (float64 for float64 x, else float32) and ``1 - lam`` in lam's dtype, then cast.

One kernel, two modes:

* out of place (``INPLACE`` false): each program writes BLOCK elements of row i. A chunk (VEC
  consecutive elements of one line, 16 bytes where the shape allows) is loaded from x[i] unless it
  lies wholly inside a CutMix box, and from x[p] where it meets the box or the row is a MixUp row:
  a CutMix row reads each element from one source (a chunk that straddles a box edge reads both,
  within the same 32-byte sectors), then each element takes its side;
* in place (``INPLACE``, :func:`mix_`, partner an involution): the program of row i with
  i <= p = partner[i] handles the pair: it loads both rows' chunks that either row's output needs,
  then stores both, and only the chunks that change (a CutMix row's box, a MixUp row whole; a CutMix
  row that is its own partner is left as it is). The programs of rows i > p do nothing. A thread
  holds half the elements of the out-of-place pass: the same bytes, two rows.

The backward (:func:`mix_backward`, ``mix_backward_kernel``) is the gather of
``fastsd.reference.mix_backward`` through the inverse permutation q: ``grad_x[j] = kept(g)[j] +
sent(g)[q[j]]``, each side loaded only where it is nonzero somewhere in the chunk, rounded as the
reference (weights cast to g's dtype, each product and the sum rounded to it). No atomics.

A chunk never straddles two lines (VEC divides the line length L: W in NCHW, W * C in
channels_last), so its row h and its first column j0 (in elements of the line) are computed once a
chunk. The box test is in elements of the line: columns [x0 * C, x1 * C) in channels_last, so no
element's pixel column is ever divided out. Loads and stores are masked per chunk (a mask that is
constant over the vector keeps 16-byte accesses); the selection inside the chunk is per element.
Lines of odd length take 1-element chunks (:func:`_mix_flat`, and its twin in the backward): with
nothing shared between a thread's elements, the chunk-level tests are dropped, the box test is made
once an element and only in a CutMix row's branch, and a MixUp row blends without it.

No integer division on the GPU: the sample of a program, the line and the plane of a chunk are
``(a * m) >> s`` (patch swap's ``_frac``), with constants the launcher computes from the shapes. Indices
inside a sample are int32, sample offsets int64; samples of 2**31 elements or more take the ``BIG``
variant (int64 indices, plain divisions). No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsd import _validate

from . import _aot
from .patch_swap import (_BYTES_PER_THREAD, _INT32, _INTERPRETER_MAX_BLOCK, _OPTIONS, _TL_DTYPES, NUM_WARPS, _add,
                         _frac_constants, _gpu_block, _line, _offset, _program, _round_to, _vec, _vec_sizes)

# Never specialised on their values (one variant for every shape); sample_numel keeps its divisibility.
_SHAPE_ARGS = ("programs_per_sample", "L", "H", "C")
_FRAC_ARGS = tuple(f"{ms}_{name}" for name in ("program", "line", "plane") for ms in "ms")
# MixUp rounds each product and the sum as PyTorch's eager ops do: no FMA contraction.
_MIX_OPTIONS = {**_OPTIONS, "enable_fp_fusion": False}
# 1.5 * 2**23: v + it rounds 0 <= v < 2**22 half to even in float32 arithmetic, the same compiled and
# under the interpreter (which has no libdevice rint).
_RINT_MAGIC = tl.constexpr(12582912.0)
@triton.jit
def _mul(s, w):
    """s * w rounded to s's dtype, as PyTorch multiplies (16-bit floats: in float32, rounded once)."""
    if s.dtype == tl.float16 or s.dtype == tl.bfloat16:
        return _round_to(s.to(tl.float32) * w, s.dtype)
    else:
        return s * w


@triton.jit
def _mixup(s, t, w1, w2):
    """s * w1 + t * w2 as fastsd.reference.mix rounds it (w1, w2 in the compute type)."""
    if s.dtype == tl.uint8:
        v = s.to(tl.float32) * w1 + t.to(tl.float32) * w2
        # torch.round (half to even) and the cast: v + 1.5 * 2**23 has ulp 1, so the float32 sum
        # rounds v, and its low mantissa bits are the integer (0 <= round(v) <= 255)
        return (v + _RINT_MAGIC).to(tl.uint32, bitcast=True).to(tl.uint8)
    else:
        return _add(_mul(s, w1), _mul(t, w2))


@triton.jit
def _row(r, boxes_ptr, use_box_ptr, lam_ptr, C, CHANNELS_LAST: tl.constexpr, FP64: tl.constexpr,
         BIG: tl.constexpr):
    """Row r's (use_box, y0, y1, box columns [c0, c1) in elements of a line, w1, w2)."""
    r = r.to(tl.int64)
    use_box = tl.load(use_box_ptr + r) != 0
    y0 = tl.load(boxes_ptr + 4 * r)
    y1 = tl.load(boxes_ptr + 4 * r + 1)
    c0 = tl.load(boxes_ptr + 4 * r + 2)
    c1 = tl.load(boxes_ptr + 4 * r + 3)
    if not BIG:  # coordinates <= H, W * C < 2**31
        y0, y1, c0, c1 = y0.to(tl.int32), y1.to(tl.int32), c0.to(tl.int32), c1.to(tl.int32)
    if CHANNELS_LAST:
        c0 = c0 * C
        c1 = c1 * C
    lam = tl.load(lam_ptr + r)
    if FP64:
        w1 = lam.to(tl.float64)
        w2 = (1 - lam).to(tl.float64)
    else:
        w1 = lam.to(tl.float32)
        w2 = (1 - lam).to(tl.float32)  # in lam's dtype, then cast
    return use_box, y0, y1, c0, c1, w1, w2


@triton.jit
def _box(h, j0, use_box, y0, y1, c0, c1, VEC: tl.constexpr):
    """Per chunk: whether it meets the box and whether it lies wholly inside (both false for a MixUp
    row), and the box's columns in the chunk's rows (an empty range in the others)."""
    rows = use_box & (h >= y0) & (h < y1) & (c0 < c1)  # an empty column range meets no chunk
    meets = rows & (j0 < c1) & (j0 + VEC > c0)
    within = rows & (j0 >= c0) & (j0 + VEC <= c1)
    return meets, within, tl.where(rows, c0, 0), tl.where(rows, c1, 0)


@triton.jit
def _row_out(s, t, j, c0, c1, use_box, w1, w2):
    """A row's output from its own elements s and its partner's t: a CutMix row takes t inside the
    box (columns [c0, c1) of the chunk, per element), a MixUp row blends. One branch a row: a
    thread issues one of the two."""
    if use_box:
        out = tl.where((j >= c0[:, None]) & (j < c1[:, None]), t, s)
    else:
        out = _mixup(s, t, w1, w2)
    return out


@triton.jit
def _chunks(sample_numel, programs_per_sample, L, H, m_program, s_program, m_line, s_line, m_plane, s_plane,
            BLOCK: tl.constexpr, VEC: tl.constexpr, CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr):
    """The program's sample b and its chunks: which are in the sample, their image row h and first
    element j0 in their line ([BLOCK // VEC]), and per element its position j in its line and its
    index in the sample ([BLOCK // VEC, VEC])."""
    GROUPS: tl.constexpr = BLOCK // VEC
    b, first = _program(programs_per_sample, m_program, s_program, BLOCK, BIG)
    e = first + tl.arange(0, GROUPS) * VEC  # first element of each chunk
    in_sample = e < sample_numel  # VEC divides sample_numel: whole chunks
    line, h = _line(e, L, H, m_line, s_line, m_plane, s_plane, CHANNELS_LAST, BIG)
    j0 = e - line * L  # the chunk's first element in its line
    k = tl.arange(0, VEC)
    return b, in_sample, h, j0, j0[:, None] + k[None, :], e[:, None] + k[None, :]


@triton.jit
def _inside(h, j, use_box, y0, y1, c0, c1):
    """Per element of 1-element chunks ([BLOCK, 1]): inside the row's box."""
    return (use_box & (h >= y0) & (h < y1))[:, None] & (j >= c0) & (j < c1)


@triton.jit
def _mix_flat(x_b, x_p, o_b, p, b, in_sample, h, j, offs, box_b, y0, y1, c0, c1, w1, w2,
              boxes_ptr, use_box_ptr, lam_ptr, C, CHANNELS_LAST: tl.constexpr, INPLACE: tl.constexpr,
              FP64: tl.constexpr):
    """mix_kernel on 1-element chunks, 32-bit indices only (lines of odd length: each element has its
    own line, so the chunk math is per element and nothing is shared): the box test once an element,
    in the CutMix branch of a row only (a MixUp row blends without it), each element read from the
    source(s) its output needs."""
    m = in_sample[:, None]
    if INPLACE:
        # the pair's program is row min(b, p)'s; a CutMix row that is its own partner is unchanged
        if p >= b:
            box_p, py0, py1, pc0, pc1, pw1, pw2 = _row(p, boxes_ptr, use_box_ptr, lam_ptr, C, CHANNELS_LAST, FP64, False)
            pair = p != b
            if box_b:  # b's output is t in its box
                store_b = m & _inside(h, j, pair, y0, y1, c0, c1)
            else:
                store_b = m
            if box_p:
                store_p = m & _inside(h, j, pair, py0, py1, pc0, pc1)
            else:
                store_p = m & pair
            s = tl.load(x_b + offs, mask=(store_b & (box_b == 0)) | store_p)
            t = tl.load(x_p + offs, mask=(store_p & (box_p == 0)) | store_b)
            if box_b:
                out_b = t
            else:
                out_b = _mixup(s, t, w1, w2)
            if box_p:
                out_p = s
            else:
                out_p = _mixup(t, s, pw1, pw2)
            tl.store(x_b + offs, out_b, mask=store_b)
            tl.store(x_p + offs, out_p, mask=store_p)
    else:
        if box_b:
            inside = _inside(h, j, box_b, y0, y1, c0, c1)
            s = tl.load(x_b + offs, mask=m & (inside == 0))
            t = tl.load(x_p + offs, mask=m & inside)
            out = tl.where(inside, t, s)
        else:
            s = tl.load(x_b + offs, mask=m)
            t = tl.load(x_p + offs, mask=m)
            out = _mixup(s, t, w1, w2)
        tl.store(o_b + offs, out, mask=m)


@triton.jit
def _mix_pair(x_b, x_p, offs, j, in_sample, pair, meets, within, b_c0, b_c1, w1, w2,
              meets_p, within_p, p_c0, p_c1, pw1, pw2, BOX_B: tl.constexpr, BOX_P: tl.constexpr):
    """mix_kernel in place: rows b and p (p >= b, the pair's program; ``pair``: p != b) of the kinds
    BOX_B, BOX_P (CutMix where true), each output computed from the elements its row needs. A CutMix
    row stores the chunks that meet its box (none where it is its own partner: it is unchanged); a
    MixUp row stores every chunk (x * lam + x * (1 - lam) can differ from x in its last bit)."""
    if BOX_B:
        store_b = in_sample & meets & pair
        need_s = store_b & (within == 0)  # b's own elements outside its box
    else:
        store_b = in_sample
        need_s = store_b
    if BOX_P:
        store_p = in_sample & pair & meets_p
        need_t = store_p & (within_p == 0)
    else:
        store_p = in_sample & pair
        need_t = store_p
    s = tl.load(x_b + offs, mask=(need_s | store_p)[:, None])  # p's output takes s inside its box or blends it
    t = tl.load(x_p + offs, mask=(need_t | store_b)[:, None])
    if BOX_B:
        out_b = tl.where((j >= b_c0[:, None]) & (j < b_c1[:, None]), t, s)
    else:
        out_b = _mixup(s, t, w1, w2)
    if BOX_P:
        out_p = tl.where((j >= p_c0[:, None]) & (j < p_c1[:, None]), s, t)
    else:
        out_p = _mixup(t, s, pw1, pw2)
    tl.store(x_b + offs, out_b, mask=store_b[:, None])
    tl.store(x_p + offs, out_p, mask=store_p[:, None])


@triton.jit
def _mix_pair_of(x_b, x_p, offs, j, in_sample, pair, meets, within, b_c0, b_c1, w1, w2,
                 box_p, meets_p, within_p, p_c0, p_c1, pw1, pw2, BOX_B: tl.constexpr):
    """_mix_pair for row b of kind BOX_B, branching on row p's kind."""
    if box_p:
        _mix_pair(x_b, x_p, offs, j, in_sample, pair, meets, within, b_c0, b_c1, w1, w2,
                  meets_p, within_p, p_c0, p_c1, pw1, pw2, BOX_B, True)
    else:
        _mix_pair(x_b, x_p, offs, j, in_sample, pair, meets, within, b_c0, b_c1, w1, w2,
                  meets_p, within_p, p_c0, p_c1, pw1, pw2, BOX_B, False)


@triton.jit(do_not_specialize=_SHAPE_ARGS + _FRAC_ARGS)
def mix_kernel(
    x_ptr,  # [B, C, H, W], NCHW or channels_last contiguous (mixed in place where INPLACE)
    out_ptr,  # same shape, dtype and layout (x_ptr itself where INPLACE)
    partner_ptr,  # int64 [B]: a permutation (an involution where INPLACE)
    boxes_ptr,  # int64 [B, 4]: y0, y1, x0, x1
    lam_ptr,  # float32/float64 [B]
    use_box_ptr,  # uint8 [B]: nonzero = CutMix row
    sample_numel,  # C * H * W
    programs_per_sample,
    L,  # elements a line: W (NCHW) or W * C (channels_last)
    H,
    C,
    # _frac constants (multiplier, shift) of pid // programs_per_sample, e // L and e // (H * W) (NCHW)
    m_program: tl.uint32, s_program: tl.int32,
    m_line: tl.uint32, s_line: tl.int32,
    m_plane: tl.uint32, s_plane: tl.int32,
    BLOCK: tl.constexpr,  # elements a program
    VEC: tl.constexpr,  # elements a chunk: divides L
    CHANNELS_LAST: tl.constexpr,
    INPLACE: tl.constexpr,
    BIG: tl.constexpr,  # sample_numel + BLOCK > 2**31: int64 indices and plain divisions
):
    FP64: tl.constexpr = x_ptr.dtype.element_ty == tl.float64
    b, in_sample, h, j0, j, offs = _chunks(sample_numel, programs_per_sample, L, H, m_program, s_program, m_line,
                                           s_line, m_plane, s_plane, BLOCK, VEC, CHANNELS_LAST, BIG)
    p = tl.load(partner_ptr + b.to(tl.int64)).to(tl.int32)  # a sample index (< B < 2**31)
    box_b, y0, y1, c0, c1, w1, w2 = _row(b, boxes_ptr, use_box_ptr, lam_ptr, C, CHANNELS_LAST, FP64, BIG)
    x_b = x_ptr + _offset(b, sample_numel, BIG)
    x_p = x_ptr + _offset(p, sample_numel, BIG)
    o_b = out_ptr + _offset(b, sample_numel, BIG)
    if VEC == 1 and not BIG:
        _mix_flat(x_b, x_p, o_b, p, b, in_sample, h, j, offs, box_b, y0, y1, c0, c1, w1, w2, boxes_ptr, use_box_ptr,
                  lam_ptr, C, CHANNELS_LAST, INPLACE, FP64)
    else:
        meets, within, b_c0, b_c1 = _box(h, j0, box_b, y0, y1, c0, c1, VEC)
        if INPLACE:
            # The pair's program is row min(b, p)'s (those of p < b do nothing). One branch for each
            # pair of row kinds, with its loads and stores: a thread issues the code of its rows'
            # kinds only (and a pair of MixUp rows converts each loaded element once, for both blends).
            if p >= b:
                box_p, py0, py1, pc0, pc1, pw1, pw2 = _row(p, boxes_ptr, use_box_ptr, lam_ptr, C, CHANNELS_LAST, FP64,
                                                           BIG)
                meets_p, within_p, p_c0, p_c1 = _box(h, j0, box_p, py0, py1, pc0, pc1, VEC)
                pair = p != b
                if box_b:
                    _mix_pair_of(x_b, x_p, offs, j, in_sample, pair, meets, within, b_c0, b_c1, w1, w2,
                                 box_p, meets_p, within_p, p_c0, p_c1, pw1, pw2, True)
                else:
                    _mix_pair_of(x_b, x_p, offs, j, in_sample, pair, meets, within, b_c0, b_c1, w1, w2,
                                 box_p, meets_p, within_p, p_c0, p_c1, pw1, pw2, False)
        else:
            s = tl.load(x_b + offs, mask=(in_sample & (within == 0))[:, None])
            t = tl.load(x_p + offs, mask=(in_sample & (meets | (box_b == 0)))[:, None])
            out = _row_out(s, t, j, b_c0, b_c1, box_b, w1, w2)
            tl.store(o_b + offs, out, mask=in_sample[:, None])


@triton.jit
def _share(g, j, c0, c1, use_box, w, INSIDE: tl.constexpr):
    """What a row passes back of its output gradient g: a CutMix row g inside its box (INSIDE, to its
    partner) or outside it (to itself) and +0 elsewhere; a MixUp row g * w (w in g's dtype)."""
    if use_box:
        inside = (j >= c0[:, None]) & (j < c1[:, None])
        if INSIDE:
            out = tl.where(inside, g, tl.zeros_like(g))
        else:
            out = tl.where(inside, tl.zeros_like(g), g)
    else:
        out = _mul(g, w)
    return out


@triton.jit(do_not_specialize=_SHAPE_ARGS + _FRAC_ARGS)
def mix_backward_kernel(
    g_ptr,  # [B, C, H, W] output gradient, NCHW or channels_last contiguous
    out_ptr,  # the input gradient: same shape, dtype and layout
    inverse_ptr,  # int64 [B]: q with q[partner[i]] == i
    boxes_ptr,
    lam_ptr,
    use_box_ptr,
    sample_numel,
    programs_per_sample,
    L,
    H,
    C,
    m_program: tl.uint32, s_program: tl.int32,
    m_line: tl.uint32, s_line: tl.int32,
    m_plane: tl.uint32, s_plane: tl.int32,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BIG: tl.constexpr,
):
    """grad_x[j] = kept(g)[j] + sent(g)[q[j]] (fastsd.reference.mix_backward): a gather, no atomics.
    g[j] is read where row j keeps some of it, g[q] where row q sends some (one source an element
    where the two boxes do not overlap); the sum is taken everywhere (so -0.0 + 0.0 is +0.0, as in
    the reference)."""
    dtype: tl.constexpr = g_ptr.dtype.element_ty
    b, in_sample, h, j0, j, offs = _chunks(sample_numel, programs_per_sample, L, H, m_program, s_program, m_line,
                                           s_line, m_plane, s_plane, BLOCK, VEC, CHANNELS_LAST, BIG)
    q = tl.load(inverse_ptr + b.to(tl.int64)).to(tl.int32)
    box_b, y0, y1, c0, c1, w1, _w2 = _row(b, boxes_ptr, use_box_ptr, lam_ptr, C, CHANNELS_LAST, dtype == tl.float64, BIG)
    box_q, qy0, qy1, qc0, qc1, _w1, w2 = _row(q, boxes_ptr, use_box_ptr, lam_ptr, C, CHANNELS_LAST, dtype == tl.float64,
                                              BIG)
    # The reference's weights: in the compute type, then in g's dtype
    w1 = _round_to(w1, dtype).to(w1.dtype)
    w2 = _round_to(w2, dtype).to(w2.dtype)
    g_b = g_ptr + _offset(b, sample_numel, BIG)
    g_q = g_ptr + _offset(q, sample_numel, BIG)
    o_b = out_ptr + _offset(b, sample_numel, BIG)
    if VEC == 1 and not BIG:  # 1-element chunks: per element, in the CutMix branch of a row only
        m = in_sample[:, None]
        if box_b:  # b keeps g outside its box (+0 inside)
            kept = tl.load(g_b + offs, mask=m & (_inside(h, j, box_b, y0, y1, c0, c1) == 0), other=0)
        else:
            kept = _mul(tl.load(g_b + offs, mask=m), w1)
        if box_q:  # q sends g inside its box
            sent = tl.load(g_q + offs, mask=m & _inside(h, j, box_q, qy0, qy1, qc0, qc1), other=0)
        else:
            sent = _mul(tl.load(g_q + offs, mask=m), w2)
        tl.store(o_b + offs, _add(kept, sent), mask=m)
    else:
        meets, within, b_c0, b_c1 = _box(h, j0, box_b, y0, y1, c0, c1, VEC)
        meets_q, within_q, q_c0, q_c1 = _box(h, j0, box_q, qy0, qy1, qc0, qc1, VEC)
        s = tl.load(g_b + offs, mask=(in_sample & (within == 0))[:, None], other=0)
        t = tl.load(g_q + offs, mask=(in_sample & (meets_q | (box_q == 0)))[:, None], other=0)
        kept = _share(s, j, b_c0, b_c1, box_b, w1, False)
        sent = _share(t, j, q_c0, q_c1, box_q, w2, True)
        tl.store(o_b + offs, _add(kept, sent), mask=in_sample[:, None])


@triton.jit
def mix_check_kernel(
    partner_ptr,  # int64 [B]
    sorted_ptr,  # int64 [B]: partner sorted (not INVOLUTION)
    boxes_ptr,  # int64 [B, 4]
    lam_ptr,  # float32/float64 [B]
    B,
    H,
    W,
    INVOLUTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The value checks of the public fastsd.mix (partner a permutation: partner sorted is range(B))
    and fastsd.mix_ (``INVOLUTION``: partner[partner[i]] == i, which makes it a permutation of
    range(B)), and of both: the boxes inside the image and lam in [0, 1] (not NaN). Asserted on the
    device (compiled in: the launch passes debug=True; an asynchronous device-side assert, like
    PyTorch's own index checks), one row an element, before the mix kernel runs on the same stream:
    one launch in place of the ATen ops' twenty, and nothing added to the mix kernel's element path."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = r < B
    p = tl.load(partner_ptr + r, mask=m, other=0)
    tl.device_assert(~m | ((p >= 0) & (p < B)), "fastsd.mix: partner must be a permutation of range(B)")
    if INVOLUTION:
        back = tl.load(partner_ptr + tl.minimum(tl.maximum(p, 0), B - 1), mask=m, other=0)
        tl.device_assert(~m | (back == r),
                         "fastsd.mix_: partner must be an involution (partner[partner[i]] == i) to mix in place")
    else:
        first = tl.load(sorted_ptr + r, mask=m, other=0)
        tl.device_assert(~m | (first == r), "fastsd.mix: partner must be a permutation of range(B)")
    y0 = tl.load(boxes_ptr + 4 * r, mask=m, other=0)
    y1 = tl.load(boxes_ptr + 4 * r + 1, mask=m, other=0)
    x0 = tl.load(boxes_ptr + 4 * r + 2, mask=m, other=0)
    x1 = tl.load(boxes_ptr + 4 * r + 3, mask=m, other=0)
    tl.device_assert(~m | ((y0 >= 0) & (y0 <= y1) & (y1 <= H) & (x0 >= 0) & (x0 <= x1) & (x1 <= W)),
                     "fastsd.mix: boxes must satisfy 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W")
    lam = tl.load(lam_ptr + r, mask=m, other=0)
    tl.device_assert(~m | ((lam >= 0) & (lam <= 1)), "fastsd.mix: lam must be in [0, 1]")


# --- launch ---------------------------------------------------------------------------------------

_CHECK_BLOCK = 256


def _geometry(B: int, C: int, H: int, W: int, channels_last: bool, block: int):
    """(programs a sample, BIG, the kernel's shape and _frac arguments): host integers only."""
    sample_numel = C * H * W
    L = W * C if channels_last else W
    programs = triton.cdiv(sample_numel, block)
    fracs = [(1, programs, B * programs), (1, L, sample_numel + block), (1, H * W, sample_numel + block)]
    constants = [_frac_constants(*f) for f in fracs]
    big = sample_numel + block > _INT32 or None in constants
    words = [v for c in constants for v in (c or (0, 0))]
    return programs, big, (programs, L, H, C, *words)


def _launch(x, out, partner, boxes, lam, use_box, inplace: bool, backward: bool = False) -> None:
    B, C, H, W = x.shape
    sample_numel = C * H * W
    if B == 0 or sample_numel == 0:
        return
    channels_last = _validate.memory_format(x) == torch.channels_last
    vec = _vec(W, 1, C if channels_last else 1, _vec_sizes(x.dtype)[-1])  # the largest that divides L
    # In place a thread holds a chunk of each of the two rows: half the elements, the same bytes.
    block = _gpu_block(x.dtype) // (2 if inplace else 1)
    if x.device.type == "cpu":  # only under TRITON_INTERPRET=1: few, large programs run fastest
        block = max(block, min(triton.next_power_of_2(sample_numel), _INTERPRETER_MAX_BLOCK))
    programs, big, args = _geometry(B, C, H, W, channels_last, block)
    if use_box.dtype == torch.bool:
        use_box = use_box.view(torch.uint8)
    if backward:
        mix_backward_kernel[(B * programs,)](
            x, out, partner, boxes, lam, use_box, sample_numel, *args,
            BLOCK=block, VEC=vec, CHANNELS_LAST=channels_last, BIG=big, num_warps=NUM_WARPS, **_MIX_OPTIONS,
        )
        return
    mix_kernel[(B * programs,)](
        x, out, partner, boxes, lam, use_box, sample_numel, *args,
        BLOCK=block, VEC=vec, CHANNELS_LAST=channels_last, INPLACE=inplace, BIG=big,
        num_warps=NUM_WARPS, **_MIX_OPTIONS,
    )


def check_values(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
                 involution: bool = False) -> None:
    """Assert on the device what the public functions promise of the values (mix_check_kernel):
    partner a permutation (one sort, then this kernel) or, with ``involution`` (in place), an
    involution; the boxes inside x's image; lam in [0, 1]. int64 ``partner``/``boxes``, contiguous."""
    B, _, H, W = x.shape
    if B == 0:
        return
    sorted_partner = partner if involution else torch.sort(partner).values
    mix_check_kernel[(triton.cdiv(B, _CHECK_BLOCK),)](
        partner, sorted_partner, boxes, lam, B, H, W, INVOLUTION=involution, BLOCK=_CHECK_BLOCK, **_MIX_OPTIONS)


def mix(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
        use_box: torch.Tensor, check: bool = False) -> torch.Tensor:
    """The mix op out of place. ``x`` contiguous (NCHW or channels_last); ``partner`` int64 ``[B]``
    permutation; ``boxes`` int64 ``[B, 4]``, ``lam`` float32/float64 ``[B]``, ``use_box`` bool ``[B]``,
    all contiguous and validated by the caller (fastsd.mix), or on the device first with ``check``
    (:func:`check_values`)."""
    if check:
        check_values(x, partner, boxes, lam)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_validate.memory_format(x))
    _launch(x, out, partner, boxes, lam, use_box, inplace=False)
    return out


def mix_(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
         use_box: torch.Tensor, check: bool = False) -> torch.Tensor:
    """The mix op in place (``partner`` an involution, checked by the caller, or on the device first
    with ``check``: :func:`check_values`); returns x."""
    if check:
        check_values(x, partner, boxes, lam, involution=True)
    _launch(x, x, partner, boxes, lam, use_box, inplace=True)
    return x


def mix_backward(grad: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
                 use_box: torch.Tensor, inverse_partner=None) -> torch.Tensor:
    """Gradient of :func:`mix` with respect to x (floating ``grad``, contiguous NCHW or channels_last):
    a gather through ``inverse_partner`` (``q[partner[i]] == i``; one argsort on the device where the
    caller has none)."""
    if inverse_partner is None:
        inverse_partner = torch.sort(partner).indices  # (argsort: the same sort kernel)
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device, memory_format=_validate.memory_format(grad))
    _launch(grad, out, inverse_partner.contiguous(), boxes, lam, use_box, inplace=False, backward=True)
    return out


# --- ahead-of-time compile specs: the variants the launcher picks, as the JIT specialises them --------

_KERNELS = {"mix_kernel": "mix", "mix_backward_kernel": "mix_backward", "mix_check_kernel": "mix_check"}
# A CIFAR and an ImageNet batch (aligned: 16-byte chunks), and an odd image (W and C odd: 1-element
# chunks, sample sizes the JIT sees no divisibility in).
_SHAPES = {"cifar": (256, 3, 32, 32), "imagenet": (128, 3, 224, 224), "odd": (5, 3, 17, 23)}


def _aot_cases():
    meta = dict(device="meta")
    cases = []
    for dtype, ty in _TL_DTYPES.items():
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            for shape_tag, shape in _SHAPES.items():
                for lam_dtype in (torch.float32, torch.float64) if dtype == torch.float32 and shape_tag == "cifar" else (torch.float32,):
                    for inplace in (False, True):
                        B = shape[0]

                        def thunk(shape=shape, dtype=dtype, fmt=fmt, lam_dtype=lam_dtype, inplace=inplace, B=B):
                            x = torch.empty(shape, dtype=dtype, **meta).contiguous(memory_format=fmt)
                            args = (torch.empty(B, dtype=torch.int64, **meta), torch.empty(B, 4, dtype=torch.int64, **meta),
                                    torch.empty(B, dtype=lam_dtype, **meta), torch.empty(B, dtype=torch.bool, **meta))
                            return (mix_ if inplace else mix)(x, *args)

                        lam_tag = "_lam64" if lam_dtype == torch.float64 else ""
                        cases.append((f"{'inplace' if inplace else 'forward'}_{ty}_{layout}_{shape_tag}{lam_tag}", thunk))
                    if dtype.is_floating_point:
                        def backward(shape=shape, dtype=dtype, fmt=fmt, lam_dtype=lam_dtype, B=shape[0]):
                            g = torch.empty(shape, dtype=dtype, **meta).contiguous(memory_format=fmt)
                            return mix_backward(g, torch.empty(B, dtype=torch.int64, **meta),
                                                torch.empty(B, 4, dtype=torch.int64, **meta),
                                                torch.empty(B, dtype=lam_dtype, **meta),
                                                torch.empty(B, dtype=torch.bool, **meta),
                                                inverse_partner=torch.empty(B, dtype=torch.int64, **meta))

                        cases.append((f"{ty}_{layout}_{shape_tag}{lam_tag}", backward))
    # The value checks of the public functions (a spec per lam dtype and mode).
    for lam_dtype, lam_tag in ((torch.float32, ""), (torch.float64, "_lam64")):
        for involution in (False, True):
            def check(lam_dtype=lam_dtype, involution=involution):
                B = 256
                check_values(torch.empty(B, 3, 32, 32, device="meta"), torch.empty(B, dtype=torch.int64, device="meta"),
                             torch.empty(B, 4, dtype=torch.int64, device="meta"),
                             torch.empty(B, dtype=lam_dtype, device="meta"), involution=involution)

            cases.append((f"{'involution' if involution else 'permutation'}{lam_tag}", check))
    # A sample of 2**31 elements or more (one huge image): int64 indices.
    cases.append(("forward_fp32_nchw_huge", lambda: mix(
        torch.empty(1, 1, 46341, 46341, device="meta"), torch.empty(1, dtype=torch.int64, device="meta"),
        torch.empty(1, 4, dtype=torch.int64, device="meta"), torch.empty(1, device="meta"),
        torch.empty(1, dtype=torch.bool, device="meta"))))
    return cases


def _moved_bytes(spec):
    """The data bytes a thread moves on the element path, for fastsd.bench.sass's issue share (its
    static sum also counts the per-row scalars every thread loads: partner, boxes, lam, use_box): a
    thread holds _BYTES_PER_THREAD of a row, and on the longest path (a MixUp row) reads both sources
    and writes the output; in place it holds half that of each of two rows, read and written."""
    if spec["name"].startswith("mix_check_"):
        return None
    return 4 * _BYTES_PER_THREAD // 2 if spec["name"].startswith("mix_inplace_") else 3 * _BYTES_PER_THREAD


__getattr__ = _aot.lazy_specs(__name__, _KERNELS, _aot_cases, _moved_bytes)  # AOT_SPECS, built on first use
