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

Each side is loaded only where it is selected (masked loads), and the two sides are added only
where both keep and take hold, so copies are bit-exact (-0.0 and NaN included); that add runs in
fp32 for 16-bit floats. No atomics: the backward is bitwise deterministic.

Layout of the work. One program per (sample, block of BLOCK consecutive elements of the sample),
one axis; a block is [BLOCK // CHUNK, CHUNK], chunks of CHUNK consecutive elements (16 bytes where
the cells allow), each thread two of them. A sample is a sequence of lines, the runs of
consecutive elements that share one image row: ``(c, h)`` of W elements in NCHW, ``h`` of W * C in
channels_last. The cell of a chunk comes from its first element; the launcher picks CHUNK so that
either no chunk straddles two cells (CHUNK divides every cell boundary of a line, in elements;
``MIXED`` false), or every cell is at least CHUNK elements wide, so that a chunk holds at most one
cell change (``MIXED``: where the first element's cell run ends and the cell after it are computed
too, and each element takes the side of the change it is on). So the masks are read once a chunk
(bytes from L1), and the data moves in 16-byte accesses whenever the sample size and the pointers
are 16-byte aligned, whatever the grid (224 px in 3 or 6 cells: no 2-element boundary, but 75-px
cells). A MIXED chunk reads the whole chunk from each source it needs (one vector load each): more
bytes than the elements it keeps, but the same 32-byte DRAM sectors. The forward of a MIXED chunk
of 1- or 2-byte elements merges its two loads a 32-bit word at a time with byte masks; the backward
of a MIXED chunk of 16-bit floats selects a word at a time too (HALVES: each side of the change is
chosen per word, the one word the change splits takes a half of each; the sum of both sides adds
the two halves of a word separately), where a select per 16-bit element costs a register unpack
and repack each.

Cells narrower than a chunk, or whose boundaries leave only 1-element chunks (1-3 px in fp32, 4-7 px
cells of 16-bit and uint8 forward chunks of 4: ``EACH``, :func:`_each`): 16-byte chunks in which
each element finds its own cell (its cell column by a multiply-add and a shift, its mask byte from
L1), so the data still moves in 16-byte accesses; the forward of 1- and 2-byte elements selects
32-bit words with bit masks. The launcher takes it where a line holds a 16-byte chunk (so that a chunk
crosses at most one line end) and, for those words, samples start on 4-byte boundaries; ``EACH = 2``
where lines are whole chunks, so that no chunk crosses one (no per-element test of it). A
channels_last image whose cells are W // gw columns each (full-resolution box masks) runs its EACH
chunks as an NCHW image of one channel W * C wide: the same cells, one multiply-shift an element
fewer (:func:`_plan`). Where an NCHW line's cells are all one power-of-two width of at most 4 bytes
(``CELL``: 1-2 px cells of 16-bit images, 1-4 px of uint8, full-resolution masks on lines of whole
chunks; :func:`_cell_width`), an element's cell is its chunk's first one plus a constant, so the
mask is read once a cell (one vector load a chunk where no chunk crosses a line end) and no element
computes a cell column.

No integer division on the GPU: every ``a // d`` and ``a * n // d`` (the sample of a program, the
line of an element, its row and column, the row and column of its cell, the end of a cell) is
``(a * m) >> s``, one 32 x 32 -> 64-bit multiply and a shift, with m and s computed by the
launcher from the shapes (host integers; no tensor value is read) so that it is exact over the
operand's whole range (:func:`_frac`). The forward reads each chunk from one source, its pointer
chosen per chunk (one load, one store); the backward reads both rows' masks and each source where
it is needed. The sample, its partner and their mask rows are resolved once a program (scalar
loads), so the per-element loads do not chain: mask bytes, then data. The forward can also check
that partner is a permutation (``sorted_partner``: a device-side assert, no launch of its own), and
the backward takes the inverse permutation where the caller has it (``inverse_partner``).

Indices inside a sample are int32 (exact up to 2**31 - BLOCK elements a sample); sample offsets
are int64 (B*C*H*W may pass 2**31). A sample past that, or a shape whose constants need more than
32 bits (an image ~46k pixels tall or wide with 1-pixel cells), takes the ``BIG`` variant: int64
indices and plain divisions, correct and slow, never the common path.

Under TRITON_INTERPRET=1 (CPU tensors, tests only) the launcher uses larger blocks: the
interpreter's cost grows with the number of programs.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from fastsd import _validate

# The per-launch integers: the JIT must not specialise on their values (divisibility by 16, == 1),
# or every shape would compile its own variant; sample_numel keeps its divisibility (alignment).
_SHAPE_ARGS = ("check", "programs_per_sample", "L", "H", "W", "C", "gh", "gw", "col_div", "col_mod")
# The _frac constants: a multiplier (uint32) and a shift each.
_FRAC_ARGS = tuple(f"{ms}_{name}" for name in ("program", "line", "sub", "cell_row", "cell_col", "col_start")
                   for ms in "ms")


@triton.jit
def _frac(a, m, s):
    """floor(a * n / d) = (a * m) >> s for 0 <= a <= a_max (< 2**31), with the launcher's
    m = ceil(n * 2**s / d) < 2**32 and 2**s >= a_max * d (:func:`_frac_constants`): one
    32 x 32 -> 64-bit multiply and a shift. Exact: a * m / 2**s exceeds a * n / d by less than
    a_max / 2**s <= 1 / d, which is what separates a * n / d from the next integer."""
    # tl.cast, not .to: an integer argument equal to 1 arrives as a constexpr (Triton specialises
    # it), which has no .to method before Triton 3.8
    return ((tl.cast(tl.cast(a, tl.uint32), tl.uint64) * tl.cast(m, tl.uint64)) >> tl.cast(s, tl.uint64)).to(tl.int32)


@triton.jit
def _offset(sample, sample_numel, BIG: tl.constexpr):
    """sample * sample_numel as int64, one 32 x 32 -> 64-bit multiply where both fit 32 bits."""
    if BIG:
        return tl.cast(sample, tl.int64) * sample_numel
    else:  # tl.cast: see _frac
        return (tl.cast(tl.cast(sample, tl.uint32), tl.uint64)
                * tl.cast(tl.cast(sample_numel, tl.uint32), tl.uint64)).to(tl.int64)


# The interpreter converts float32 to bfloat16 by truncating; the GPU's conversion (cvt.rn.bf16.f32)
# rounds to nearest even, as PyTorch does. Under the interpreter the kernel rounds in integers.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _to_bf16(v):
    """float32 v rounded to the nearest bfloat16, ties to even (NaN: PyTorch's CPU 0x7FC0 under the
    interpreter, the GPU's canonical NaN on it)."""
    if _INTERPRETED:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return tl.where(v != v, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(tl.bfloat16)


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """float32 v rounded to a 16-bit float dtype (nearest, ties to even); else v as it is."""
    if dtype == tl.float16:
        return v.to(tl.float16)
    elif dtype == tl.bfloat16:
        return _to_bf16(v)
    else:
        return v


@triton.jit
def _add(s, t):
    """s + t rounded to their dtype, as PyTorch adds: fp16/bf16 in fp32, rounded once (the same as a
    native fp16/bf16 add: fp32 carries more than twice their precision, so the double rounding is
    exact), to nearest even under the interpreter too (:func:`_round_to`)."""
    if s.dtype.primitive_bitwidth < 32:
        return _round_to(s.to(tl.float32) + t.to(tl.float32), s.dtype)
    else:
        return s + t


@triton.jit
def _add_halves(s, t, dtype):
    """_add of the two 16-bit floats of each 32-bit word of s and t (int32, low half first)."""
    lo = _add(s.to(tl.int16).to(dtype, bitcast=True), t.to(tl.int16).to(dtype, bitcast=True))
    hi = _add((s >> 16).to(tl.int16).to(dtype, bitcast=True), (t >> 16).to(tl.int16).to(dtype, bitcast=True))
    return (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16) | (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)


@triton.jit
def _select(keep, take, s, t, both):
    """Per chunk flags [GROUPS] -> a bit-exact copy where one side is selected, the sum where both
    are, 0 where neither (the unselected side's load gave 0 where its mask was off)."""
    return tl.where(keep, tl.where(take, both, s), tl.where(take, t, tl.zeros_like(t)))


@triton.jit
def _program(programs_per_sample, m_program, s_program, BLOCK: tl.constexpr, BIG: tl.constexpr):
    """(sample, its first element) of this program, one of programs_per_sample a sample."""
    pid = tl.program_id(0)
    if BIG:
        b = pid // programs_per_sample
        first = (pid - b * programs_per_sample).to(tl.int64) * BLOCK
    else:
        b = _frac(pid, m_program, s_program)
        first = (pid - b * programs_per_sample) * BLOCK
    return b, first


@triton.jit
def _line(e, L, H, m_line, s_line, m_plane, s_plane, CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr):
    """(line, h) of the in-sample element index e >= 0: its line e // L and image row (the line
    itself in channels_last; line % H in NCHW, from the plane e // (H * W) of e itself, which
    m_plane, s_plane give; unused in channels_last)."""
    if BIG:
        line = e // L
        if CHANNELS_LAST:
            h = line
        else:
            h = line % H
    else:
        line = _frac(e, m_line, s_line)
        if CHANNELS_LAST:
            h = line
        else:
            h = line - _frac(e, m_plane, s_plane) * H
    return line, h


@triton.jit
def _cell(e, L, H, W, C, gh, gw, m_line, s_line, m_sub, s_sub, m_cell_row, s_cell_row,
          m_cell_col, s_cell_col, CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr):
    """(line, h, cell row, cell column) of the in-sample element index e >= 0."""
    line, h = _line(e, L, H, m_line, s_line, m_sub, s_sub, CHANNELS_LAST, BIG)
    if BIG:
        if CHANNELS_LAST:
            w = (e - line * L) // C
        else:
            w = e - line * L
        cell_row = h * gh // H
        cell_col = w * gw // W
    else:
        if CHANNELS_LAST:
            w = _frac(e - line * L, m_sub, s_sub)  # // C
        else:
            w = e - line * L
        cell_row = _frac(h, m_cell_row, s_cell_row)
        cell_col = _frac(w, m_cell_col, s_cell_col)
    return line, h, cell_row, cell_col


@triton.jit
def _words_of(n, ITEMSIZE: tl.constexpr):
    """n elements of ITEMSIZE (1 or 2) bytes in 32-bit words, n * ITEMSIZE // 4 where that is exact
    (the word paths' samples and chunks start on 4-byte boundaries), as a shift: the product would
    overflow int32 from 2**30 2-byte elements, which the int32 variant takes up to 2**31."""
    if ITEMSIZE == 1:
        return n >> 2
    else:
        return n >> 1


@triton.jit
def _frac_at(a0, k, m, s):
    """_frac(a0 + k, m, s) for a0 + k in _frac's range, as a0 * m + k * m: where k is a constant
    offset (the element's place in its chunk) the product a0 * m is shared by the chunk's elements,
    and each element's is one multiply-add (32 x 32 + 64 -> 64 bits) and the shift."""
    base = tl.cast(tl.cast(a0, tl.uint32), tl.uint64) * tl.cast(m, tl.uint64)
    return ((base + tl.cast(k, tl.uint64) * tl.cast(m, tl.uint64)) >> tl.cast(s, tl.uint64)).to(tl.int32)


@triton.jit
def _each_cell(j0, k, row0, row1, gw, m_sub, s_sub, m_cell_col, s_cell_col, CHANNELS_LAST: tl.constexpr,
               CROSSES: tl.constexpr):
    """The mask cell of the elements at ``j0 + k`` from the start of their chunk's first line
    (j0 + k < L + 16; k the element's constant place in its chunk), given that line's first cell
    (row0) and the next line's first cell less gw (row1): past L an element is in the next line, and
    its cell column comes out exactly gw more than there (w * gw // W is gw more for w + W; the
    launcher's constants are exact up to W + 16 and L + 16). Where no chunk crosses a line end
    (``CROSSES`` false: lines of whole chunks), j0 + k < L and row0 is every element's."""
    if CHANNELS_LAST:
        col = _frac(_frac_at(j0, k, m_sub, s_sub), m_cell_col, s_cell_col)  # (j // C) * gw // W
    else:
        col = _frac_at(j0, k, m_cell_col, s_cell_col)
    if CROSSES:
        return col + tl.where(col >= gw, row1, row0)
    else:
        return col + row0


@triton.jit
def _chunk_cells(mask_ptr, row_offset, row0, first, NCELLS: tl.constexpr):
    """The NCELLS mask bytes of a chunk's cells (the CELL variant on lines of whole chunks), in one
    load: they are consecutive in the mask row, and the launcher's shapes make their offset a
    multiple of NCELLS (gw = L // CELL and a chunk's first cell column are), which lets the load be
    one vector access wherever the mask's pointer is aligned."""
    offset = tl.multiple_of(row_offset + (row0 + first).to(tl.int64), (NCELLS, NCELLS))
    return tl.load(mask_ptr + offset + tl.arange(0, NCELLS)[None, :])


@triton.jit
def _cell_byte(mask_ptr, row_offset, chunk_bytes, n: tl.constexpr, first, row0, row1, gw,
               NCELLS: tl.constexpr, CROSSES: tl.constexpr):
    """The mask byte of the n-th cell of chunks whose first cell column is ``first`` (CELL variant),
    [GROUPS, 1]: its own load where a chunk may cross a line end (cell columns past gw are the
    next line's, as in :func:`_each_cell`), else taken from the chunk's bytes (:func:`_chunk_cells`;
    an in-thread pick, a register move)."""
    if CROSSES:
        c = first + n
        # (a cell index is >= 0: as uint32 its 64-bit address takes no sign extension; fp16 backward
        # 317 -> 309 instructions)
        return tl.load(mask_ptr + row_offset + (c + tl.where(c >= gw, row1, row0)).to(tl.uint32))
    else:
        kn = tl.arange(0, NCELLS)[None, :]
        return tl.sum(tl.where(kn == n, chunk_bytes, 0), axis=1)[:, None]


@triton.jit
def _each(x_b, x_s, out_b, mask_ptr, mask_b, mask_s, e, sample_numel, L, H, gw, m_line, s_line, m_sub, s_sub,
          m_cell_row, s_cell_row, m_cell_col, s_cell_col, CHUNK: tl.constexpr, CHANNELS_LAST: tl.constexpr,
          BACKWARD: tl.constexpr, CROSSES: tl.constexpr, CELL: tl.constexpr):
    """The EACH variant of :func:`cell_select_kernel`: chunks of CHUNK elements (16 bytes) at ``e``
    whose elements each find their own cell, for cells narrower than a chunk or whose boundaries
    are off its alignment. The cell rows of a chunk's line and of the next (the launcher checks
    L >= CHUNK, so a chunk crosses at most one line end; none where ``CROSSES`` is false, L a multiple
    of CHUNK) are computed once a chunk; per element: its cell column (a multiply-add and a shift,
    :func:`_frac_at`; one more multiply-shift in channels_last), its mask byte (an L1 hit) and its
    side.
    A source is read, a whole chunk in one vector load, only where some element of the chunk takes
    it (an in-thread reduction), so a chunk within one cell moves what the other variants move.
    The forward of 1- and 2-byte elements selects 32-bit words with bit masks (built from the
    elements' mask bytes, which the launcher makes 0 or 1), where a select an element costs an
    unpack and a repack (the launcher checks that samples start on 4-byte boundaries).

    ``CELL`` (NCHW lines of gw cells of CELL elements each, CELL a power of two below CHUNK: 1-2 px
    cells of 16-bit images, 1-4 px of uint8, full-resolution masks among them): a chunk holds
    CHUNK // CELL whole cells, which element k's is a constant (k // CELL), so the mask is read once a
    cell instead of once an element (one vector load a chunk on lines of whole chunks) and no
    element computes a cell column."""
    ITEMSIZE: tl.constexpr = x_b.dtype.element_ty.primitive_bitwidth // 8
    row_b = mask_ptr + mask_b
    row_s = mask_ptr + mask_s
    line, h = _line(e, L, H, m_line, s_line, m_sub, s_sub, CHANNELS_LAST, False)
    # Every element's cell is inside the mask row, past the sample's end too (its data accesses
    # are masked off): so the mask bytes load unmasked (no predicate, no default value a byte).
    if CHANNELS_LAST:
        h = tl.minimum(h, H - 1)  # rows past the sample's last one
    row0 = (_frac(h, m_cell_row, s_cell_row) * gw)[:, None]
    if CROSSES:  # the next line's first cell, less gw
        if CHANNELS_LAST:
            h1 = tl.minimum(h + 1, H - 1)
        else:
            h1 = tl.where(h + 1 == H, 0, h + 1)  # the next channel's first row
        row1 = (_frac(h1, m_cell_row, s_cell_row) * gw - gw)[:, None]
    else:
        row1 = row0  # no chunk reaches the next line (_each_cell does not read it)
    j0 = (e - line * L)[:, None]
    if CELL:
        NCELLS: tl.constexpr = CHUNK // CELL
        # the chunk's first cell column: j0 is a multiple of CELL, as L and e are, and not negative (an
        # unsigned division by a power of two is a shift; a signed one corrects negative values first)
        first = (j0.to(tl.uint32) // CELL).to(tl.int32)
        cells_b = first  # (read only on lines of whole chunks)
        cells_s = first
        if not CROSSES:
            cells_b = _chunk_cells(mask_ptr, mask_b, row0, first, NCELLS)
            if BACKWARD:
                cells_s = _chunk_cells(mask_ptr, mask_s, row0, first, NCELLS)
    if ITEMSIZE < 4 and not BACKWARD:
        PER: tl.constexpr = 4 // ITEMSIZE  # elements a word
        kw = tl.arange(0, CHUNK // PER)[None, :]
        words = _words_of(e, ITEMSIZE)[:, None] + kw
        valid = words < _words_of(sample_numel, ITEMSIZE)
        # The bits of each word that come from the partner: a mask byte is 0 or 1 (a bool mask; the
        # launcher converts a uint8 one), so each element's bits are its byte times its field, one
        # multiply-add a byte (a compare and a select, which is what LLVM makes of min(byte, 1) *
        # field, cost one more).
        take_bits = tl.zeros(words.shape, tl.uint32)
        if CELL:
            for n in tl.static_range(NCELLS):  # a cell's byte times the bits of its elements in each word
                field = tl.zeros(words.shape, tl.uint32)
                for i in tl.static_range(PER):
                    field += tl.where((kw * PER + i) // CELL == n, ((1 << (8 * ITEMSIZE)) - 1) << (8 * ITEMSIZE * i), 0).to(tl.uint32)
                byte = _cell_byte(mask_ptr, mask_b, cells_b, n, first, row0, row1, gw, NCELLS, CROSSES)
                take_bits += byte.to(tl.uint32) * field
        else:
            for i in tl.static_range(PER):
                cell = _each_cell(j0, kw * PER + i, row0, row1, gw, m_sub, s_sub, m_cell_col, s_cell_col,
                                  CHANNELS_LAST, CROSSES)
                field = ((1 << (8 * ITEMSIZE)) - 1) << (8 * ITEMSIZE * i)
                take_bits += tl.load(row_b + cell).to(tl.uint32) * field
        any_take = tl.max(take_bits, axis=1) != 0
        any_keep = tl.min(take_bits, axis=1) != 0xFFFFFFFF
        s = tl.load(x_b.to(tl.pointer_type(tl.uint32)) + words, mask=valid & any_keep[:, None])
        t = tl.load(x_s.to(tl.pointer_type(tl.uint32)) + words, mask=valid & any_take[:, None])
        tl.store(out_b.to(tl.pointer_type(tl.uint32)) + words, (t & take_bits) | (s & (take_bits ^ 0xFFFFFFFF)), mask=valid)
    else:
        k = tl.arange(0, CHUNK)[None, :]
        offs = e[:, None] + k
        valid = offs < sample_numel
        if CELL:  # each element's flags from its cell's (k // CELL is a constant a register)
            keep = tl.zeros(offs.shape, tl.int1)
            take = tl.zeros(offs.shape, tl.int1)
            for n in tl.static_range(NCELLS):
                byte = _cell_byte(mask_ptr, mask_b, cells_b, n, first, row0, row1, gw, NCELLS, CROSSES)
                keep = tl.where(k // CELL == n, byte == 0, keep)
                if BACKWARD:
                    byte = _cell_byte(mask_ptr, mask_s, cells_s, n, first, row0, row1, gw, NCELLS, CROSSES)
                    take = tl.where(k // CELL == n, byte != 0, take)
        else:
            cell = _each_cell(j0, k, row0, row1, gw, m_sub, s_sub, m_cell_col, s_cell_col, CHANNELS_LAST, CROSSES)
            keep = tl.load(row_b + cell) == 0
            if BACKWARD:
                take = tl.load(row_s + cell) != 0
        if not BACKWARD:  # the sample's own mask row: keep where its cell is off, else take the partner's
            take = ~keep
        any_keep = tl.max(keep.to(tl.int32), axis=1) != 0
        any_take = tl.max(take.to(tl.int32), axis=1) != 0
        s = tl.load(x_b + offs, mask=valid & any_keep[:, None])
        t = tl.load(x_s + offs, mask=valid & any_take[:, None])
        if BACKWARD:
            out = _select(keep, take, s, t, _add(s, t))
        else:
            out = tl.where(keep, s, t)
        tl.store(out_b + offs, out, mask=valid)


@triton.jit(do_not_specialize=_SHAPE_ARGS + _FRAC_ARGS)
def cell_select_kernel(
    x_ptr,  # [B, C, H, W] input (x forward, grad backward), NCHW or channels_last contiguous
    out_ptr,  # same shape, dtype and layout as x
    src_ptr,  # int64 [B]: the sample whose `take` cells are read (partner forward, q backward)
    mask_ptr,  # uint8 [B, gh, gw], nonzero = swap (0 or 1 where the EACH forward of 1- and 2-byte elements reads it)
    sorted_ptr,  # int64 [B]: partner sorted, asserted to be range(B) where check > 0 (forward only)
    sample_numel,  # C * H * W
    check,  # B where the forward asserts that partner is a permutation (sorted_ptr), else -B
    programs_per_sample,
    L,  # elements a line: W (NCHW) or W * C (channels_last)
    H,
    W,
    C,
    gh,
    gw,
    col_div,  # W // gw and W % gw: cell column k starts at column k * col_div + ceil(k * col_mod / gw)
    col_mod,
    # _frac constants (multiplier, shift) of pid // programs_per_sample, e // L, e // (H * W) (NCHW)
    # or j // C (channels_last), h * gh // H, w * gw // W and a // gw.
    m_program: tl.uint32, s_program: tl.int32,
    m_line: tl.uint32, s_line: tl.int32,
    m_sub: tl.uint32, s_sub: tl.int32,
    m_cell_row: tl.uint32, s_cell_row: tl.int32,
    m_cell_col: tl.uint32, s_cell_col: tl.int32,
    m_col_start: tl.uint32, s_col_start: tl.int32,
    BLOCK: tl.constexpr,  # elements a program
    CHUNK: tl.constexpr,  # elements a chunk; no chunk straddles two cells unless MIXED
    MIXED: tl.constexpr,  # chunks may hold one cell change (every cell is >= CHUNK elements wide)
    EACH: tl.constexpr,  # chunks may hold any number of cell changes: each element its own cell (1: a
    # chunk may cross a line end, 2: lines are whole chunks)
    CELL: tl.constexpr,  # EACH on NCHW lines of gw cells of CELL elements each (a power of two < CHUNK), else 0
    CHANNELS_LAST: tl.constexpr,
    BACKWARD: tl.constexpr,
    BIG: tl.constexpr,  # sample_numel + BLOCK > 2**31: int64 indices and plain divisions
):
    GROUPS: tl.constexpr = BLOCK // CHUNK
    ITEMSIZE: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth // 8
    # A chunk wider than 16 bytes (MIXED, 32 bytes) is handled as 16-byte vectors that share its
    # cell math; each is its own [GROUPS, VEC] tensor, so one thread holds the whole chunk.
    VEC: tl.constexpr = CHUNK if CHUNK * ITEMSIZE <= 16 else 16 // ITEMSIZE
    # The forward of a MIXED chunk of 1- or 2-byte elements merges its two sources a 32-bit word
    # at a time (bit masks) instead of an element at a time (the launcher checks the alignment).
    WORDS: tl.constexpr = MIXED and not BACKWARD and ITEMSIZE < 4 and CHUNK * ITEMSIZE >= 4
    # The backward of a MIXED chunk of 16-bit floats selects a 32-bit word (two elements) at a time
    # with bit masks, and adds the halves where both sides are selected (_add_halves).
    HALVES: tl.constexpr = MIXED and BACKWARD and ITEMSIZE == 2
    b, first = _program(programs_per_sample, m_program, s_program, BLOCK, BIG)
    src = tl.load(src_ptr + b.to(tl.int64)).to(tl.int32)  # a sample index (< B < 2**31)
    if not BACKWARD:
        # partner is a permutation iff its sorted values are range(B): an asynchronous device-side
        # assert, like PyTorch's own index checks (compiled in: the launcher passes debug=True).
        sorted_b = tl.load(sorted_ptr + b.to(tl.int64), mask=check > 0, other=0)
        tl.device_assert((check < 0) | (sorted_b == b), "fastsd.patch_swap: partner must be a permutation of range(B)")
        # A partner outside range(B) fails that assert, but it may fire in another program after
        # this one has loaded: clamp its low 32 bits (as unsigned) to B - 1, so that every program
        # reads inside x (an illegal address would hide the assert's message behind a CUDA error).
        # B rides on `check`, as its magnitude: an argument of its own changed the backward's
        # register allocation.
        samples = tl.abs(tl.cast(check, tl.int32))
        src = tl.minimum(src.to(tl.uint32), (samples - 1).to(tl.uint32)).to(tl.int32)
    cells = gh * gw
    mask_b = b.to(tl.int64) * cells
    mask_s = src.to(tl.int64) * cells
    row_b = mask_ptr + mask_b
    row_s = mask_ptr + mask_s
    b_offset = _offset(b, sample_numel, BIG)

    e = first + tl.arange(0, GROUPS) * CHUNK  # first element of each chunk
    if EACH:
        _each(x_ptr + b_offset, x_ptr + _offset(src, sample_numel, BIG), out_ptr + b_offset, mask_ptr, mask_b,
              mask_s, e, sample_numel, L, H, gw, m_line, s_line, m_sub, s_sub, m_cell_row, s_cell_row, m_cell_col,
              s_cell_col, CHUNK, CHANNELS_LAST, BACKWARD, EACH == 1, CELL)
    else:
        in_sample = e < sample_numel
        line, h, cell_row, cell_col = _cell(e, L, H, W, C, gh, gw, m_line, s_line, m_sub, s_sub,
                                            m_cell_row, s_cell_row, m_cell_col, s_cell_col,
                                            CHANNELS_LAST, BIG)
        cell = cell_row * gw + cell_col
        k = tl.arange(0, VEC)
        if MIXED:
            # Where the first element's cell run ends (its cell column's end, the line's end at the last
            # column) and the cell after it: elements from `change` on belong to that one.
            nxt = cell_col + 1
            if BIG:
                col_end = nxt * col_div + (nxt * col_mod + gw - 1) // gw
            else:
                col_end = nxt * col_div + _frac(nxt * col_mod + gw - 1, m_col_start, s_col_start)
            line_end = nxt == gw
            if CHANNELS_LAST:
                h1 = h + 1  # inside the sample wherever the change is
                change = line * L + col_end * C - e
            else:
                h1 = tl.where(h + 1 == H, 0, h + 1)  # the next channel's first row
                change = line * L + col_end - e
            if BIG:
                row1 = h1 * gh // H
            else:
                row1 = _frac(h1, m_cell_row, s_cell_row)
            cell1 = tl.where(line_end, row1, cell_row) * gw + tl.where(line_end, 0, nxt)
            has_change = in_sample & (change < tl.minimum(sample_numel - e, CHUNK))

        if HALVES:
            keep = tl.load(row_b + cell, mask=in_sample, other=1) == 0
            take = tl.load(row_s + cell, mask=in_sample, other=0) != 0
            keep1 = tl.load(row_b + cell1, mask=has_change, other=1) == 0
            take1 = tl.load(row_s + cell1, mask=has_change, other=0) != 0
            WORDS_A_VEC: tl.constexpr = VEC // 2
            sample_words = _words_of(sample_numel, ITEMSIZE)
            # The samples as 32-bit words (the launcher checks that they start on 4-byte boundaries).
            x_b = (x_ptr + b_offset).to(tl.pointer_type(tl.int32))
            x_s = (x_ptr + _offset(src, sample_numel, BIG)).to(tl.pointer_type(tl.int32))
            out_b = (out_ptr + b_offset).to(tl.pointer_type(tl.int32))
            kw = tl.arange(0, WORDS_A_VEC)
            for v in tl.static_range(CHUNK // VEC):
                j = v * WORDS_A_VEC + kw  # the word in the chunk: elements 2j (low half) and 2j + 1
                words = _words_of(e, ITEMSIZE)[:, None] + j[None, :]
                wvalid = words < sample_words
                s = tl.load(x_b + words, mask=wvalid & (keep | keep1)[:, None], other=0)
                t = tl.load(x_s + words, mask=wvalid & (take | take1)[:, None], other=0)
                # The halves of each word before the change (no change in the chunk: change >= CHUNK).
                c = change[:, None]
                sums = _add_halves(s, t, x_ptr.dtype.element_ty)
                side0 = _select(keep[:, None], take[:, None], s, t, sums)
                side1 = _select(keep1[:, None], take1[:, None], s, t, sums)
                # Each half takes its side of the change: the whole word, or the low half before it.
                out = tl.where(c > 2 * j[None, :] + 1, side0,
                               tl.where(c > 2 * j[None, :], (side0 & 0xFFFF) | (side1 & -65536), side1))
                tl.store(out_b + words, out, mask=wvalid)
        elif BACKWARD:
            keep = tl.load(row_b + cell, mask=in_sample, other=1) == 0
            take = tl.load(row_s + cell, mask=in_sample, other=0) != 0
            x_s = x_ptr + _offset(src, sample_numel, BIG)
            if MIXED:
                keep1 = tl.load(row_b + cell1, mask=has_change, other=1) == 0
                take1 = tl.load(row_s + cell1, mask=has_change, other=0) != 0
                any_keep, any_take = keep | keep1, take | take1
            else:
                any_keep, any_take = keep, take
            for v in tl.static_range(CHUNK // VEC):
                offs = e[:, None] + (v * VEC + k)[None, :]
                valid = offs < sample_numel
                if MIXED:
                    keep_v, take_v, any_keep_v, any_take_v = keep[:, None], take[:, None], any_keep[:, None], any_take[:, None]
                else:
                    # Both flags in one integer: where the data's layout differs from the cell math's
                    # (VEC 1), one layout conversion instead of one a flag.
                    flags = (tl.where(keep, 1, 0) | tl.where(take, 2, 0))[:, None]
                    keep_v, take_v = (flags & 1) != 0, (flags & 2) != 0
                    any_keep_v, any_take_v = keep_v, take_v
                s = tl.load(x_ptr + b_offset + offs, mask=valid & any_keep_v, other=0)
                t = tl.load(x_s + offs, mask=valid & any_take_v, other=0)
                both = _add(s, t)
                out = _select(keep_v, take_v, s, t, both)
                if MIXED:
                    # Each side of the change selects by its cell's flags, then each element its side.
                    in_last = (v * VEC + k)[None, :] >= change[:, None]
                    out = tl.where(in_last, _select(keep1[:, None], take1[:, None], s, t, both), out)
                tl.store(out_ptr + b_offset + offs, out, mask=valid)
        else:
            take = tl.load(row_b + cell, mask=in_sample, other=0) != 0
            # One source a chunk: its sample is chosen, then loaded (one load, no select of values).
            if VEC == 1 and ITEMSIZE > 1:
                # A select of the two samples' offsets (computed once) is cheaper than a multiply a chunk,
                # but hides their alignment from the vector loads wider chunks need (and costs uint8,
                # 16 chunks a thread, more registers than it saves: fastsd.bench.sass).
                first_source = x_ptr + tl.where(take, _offset(src, sample_numel, BIG), b_offset)
            else:
                first_source = x_ptr + _offset(tl.where(take, src, b), sample_numel, BIG)
            if MIXED:
                switch = has_change & ((tl.load(row_b + cell1, mask=has_change, other=0) != 0) != take)
                other_source = x_ptr + _offset(tl.where(take, b, src), sample_numel, BIG)
            if WORDS:
                WORDS_A_VEC: tl.constexpr = VEC * ITEMSIZE // 4
                sample_words = _words_of(sample_numel, ITEMSIZE)
                # The samples as 32-bit words (the launcher checks that they start on 4-byte boundaries).
                first_words = first_source.to(tl.pointer_type(tl.int32))
                other_words = other_source.to(tl.pointer_type(tl.int32))
                # Bits of the chunk before the change, which come from the first source.
                kept = 8 * tl.where(switch, change * ITEMSIZE, CHUNK * ITEMSIZE)
                kw = tl.arange(0, WORDS_A_VEC)
                for v in tl.static_range(CHUNK // VEC):
                    words = _words_of(e, ITEMSIZE)[:, None] + (v * WORDS_A_VEC + kw)[None, :]
                    wvalid = words < sample_words
                    a = tl.load(first_words[:, None] + words, mask=wvalid)
                    z = tl.load(other_words[:, None] + words, mask=wvalid & switch[:, None], other=0)
                    # The low `kept` bits as a mask, built per pair of words as a 64-bit value (both
                    # words of a pair compute the same expression, kw being a constant in every
                    # register) of which each takes its half.
                    bits = kept[:, None] - 64 * ((v * WORDS_A_VEC + kw[None, :]) // 2)
                    one = tl.full(bits.shape, 1, tl.int64)
                    pair = tl.where(bits >= 64, -1, tl.where(bits <= 0, 0, (one << tl.minimum(tl.maximum(bits, 0), 63)) - 1))
                    low = tl.where(kw[None, :] % 2 == 0, pair, pair >> 32).to(tl.int32)
                    tl.store((out_ptr + b_offset).to(tl.pointer_type(tl.int32)) + words, (a & low) | (z & ~low), mask=wvalid)
            else:
                for v in tl.static_range(CHUNK // VEC):
                    offs = e[:, None] + (v * VEC + k)[None, :]
                    valid = offs < sample_numel
                    out = tl.load(first_source[:, None] + offs, mask=valid)
                    if MIXED:
                        z = tl.load(other_source[:, None] + offs, mask=valid & switch[:, None])
                        in_last = (v * VEC + k)[None, :] >= change[:, None]
                        out = tl.where(switch[:, None] & in_last, z, out)
                    tl.store(out_ptr + b_offset + offs, out, mask=valid)


# --- launch configuration ------------------------------------------------------------------------

NUM_WARPS = 4
# 32 bytes per thread on the GPU: 1024 fp32, 2048 fp16/bf16, 4096 uint8, 512 fp64 elements a program.
_BYTES_PER_THREAD = 32
# Widest global access: 16 bytes (ld.global.v4.b32).
_VECTOR_BYTES = 16
# Under the interpreter, cost grows with the number of programs, not with the block size.
_INTERPRETER_MAX_BLOCK = 1 << 16
_INT32 = 1 << 31
# Device asserts compiled in (debug), without the integer overflow checks debug would add.
_OPTIONS = {"debug": True, "sanitize_overflow": False}
# The smallest CHUNK / VEC for which the launcher picks MIXED chunks, by the widest CHUNK.
_MIXED_MIN = {2: 2, 4: 4, 8: 4, 16: 4}

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
    """The CHUNK values that never straddle a cell: powers of two up to 16 bytes (a MIXED chunk may
    be twice the last)."""
    return [1 << i for i in range((_VECTOR_BYTES // dtype.itemsize).bit_length())]


def _frac_constants(n: int, d: int, a_max: int):
    """(m, s) with floor(a * n / d) == (a * m) >> s for every 0 <= a <= a_max (see :func:`_frac`):
    the smallest s with 2**s >= a_max * d, m = ceil(n * 2**s / d); None where m needs more than 32
    bits (n * a_max >= 2**31, only for images ~46k pixels tall or wide with 1-pixel cells)."""
    s = max(a_max * d - 1, 0).bit_length()
    m = -(-(n << s) // d)
    return (m, s) if m < 1 << 32 and a_max < _INT32 else None


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


@functools.lru_cache(maxsize=1024)
def _chunk(W: int, gw: int, unit: int, widest: int):
    """(CHUNK, MIXED): chunks that never straddle two cells when the boundaries allow the widest
    (:func:`_vec`); else chunks of up to twice ``widest`` elements no wider than the narrowest cell,
    so that each holds at most one cell change (a change at a row start, where the cell row or column
    changes, is at least one cell width away from the changes before and after it)."""
    vec = _vec(W, gw, unit, widest)
    if vec == widest:
        return vec, False
    starts = [-(-cw * W // gw) for cw in range(gw + 1)]
    narrowest = min(b - a for a, b in zip(starts, starts[1:])) * unit
    # Up to 32 bytes (two vectors, one chunk a thread): the cell math once for both.
    chunk = min(2 * widest, 1 << (narrowest.bit_length() - 1))
    # A MIXED chunk costs about twice the instructions of a plain one (fastsd.bench.sass): worth it
    # where it replaces four or more of them (two for float64, the widest of which is 2 elements).
    if chunk >= _MIXED_MIN[widest] * vec:
        return chunk, True
    return vec, False


def _cell_width(L: int, gw: int, itemsize: int, each: int) -> int:
    """CELL for EACH on NCHW lines of L elements in gw cells (0: each element finds its cell): the
    cells' width where they are all one power of two of at most 4 bytes in a 1- or 2-byte dtype
    (fastsd.bench.sass, the EACH variant against the one the cells' alignment gives otherwise, issue
    share: uint8 forward 1 px 61 % -> 38 %, 2 px vec2 88 % -> 28-44 %, 4 px vec4 48 % -> 29-37 %;
    fp16/bf16 backward 1 px 64-67 % -> 45-47 %, 2 px vec2 66 % -> 38-48 %; fp32, fp64 and wider cells
    were within the budget already). Not for 1-element cells where a chunk may cross a line end (the
    cell bytes then load one by one: 84 % -> 73 % for uint8)."""
    if itemsize > 2 or L % gw:
        return 0
    width = L // gw
    if width & (width - 1) or width * itemsize > 4 or (width == 1 and each != 2):
        return 0
    return width


def _config(x: torch.Tensor, gw: int, channels_last: bool, backward: bool, big: bool = False, cells: bool = True):
    """The launcher's (CHUNK, MIXED, EACH, CELL) for x (see :func:`_chunk`, :func:`_each` and
    :func:`_cell_width`; EACH is 0, 1 or 2); no EACH in the ``big`` variant (int64 indices and plain
    divisions)."""
    W, itemsize = x.shape[3], x.element_size()
    unit = x.shape[1] if channels_last else 1
    widest = _vec_sizes(x.dtype)[-1]
    chunk, mixed = _chunk(W, gw, unit, widest)
    # Words of 1- and 2-byte elements (the forward's WORDS and EACH, the backward's HALVES) need
    # every sample to start on a 4-byte boundary (the output is a fresh allocation). From the shape
    # and the pointer: no tensor is made on the launch path.
    aligned = itemsize >= 4 or not (x.shape[1] * x.shape[2] * W * itemsize % 4 or x.data_ptr() % 4)
    # EACH (16-byte chunks, a cell per element) where the others would take 1-element chunks, and
    # for the forward's 4-element MIXED chunks of 1- and 2-byte elements: fewer instructions for
    # the bytes (fastsd.bench.sass: e.g. fp32 backward 64-65 % -> 45-48 % of the issue budget,
    # fp16 forward 85-89 % and 66-67 % -> 53-60 %, uint8 forward 170 % and 115-117 % -> 93-106 %),
    # where a chunk crosses at most one line end (L >= 16 bytes) and words can be aligned.
    # EACH is 2 where a line is a whole number of 16-byte chunks (L a multiple of the chunk: 224 and
    # 32 px in every dtype), so that no chunk crosses a line end (chunks start at multiples of the
    # chunk in a sample) and no element tests for one: fp16 forward 53 % -> 46 %, uint8 93 % -> 69 %,
    # fp32 backward 45 % -> 39 %; else 1.
    each = (not mixed and chunk == 1) or (mixed and not backward and chunk == 4 and itemsize < 4)
    lines = 2 if W * unit % widest == 0 else 1
    # (channels_last: the cells of the NCHW lines of W * C that _plan runs it as, where gw divides W)
    cell = _cell_width(W * unit, gw, itemsize, lines) if cells and W % gw == 0 else 0
    if (each or cell) and not big and W * unit >= widest and (aligned or backward):
        return widest, False, lines, cell
    words = mixed and itemsize < 4 and chunk * itemsize >= 4
    if words and not aligned:
        return _vec(W, gw, unit, widest), False, 0, 0
    return chunk, mixed, 0, 0


@functools.lru_cache(maxsize=1024)
def _geometry(B: int, C: int, H: int, W: int, gh: int, gw: int, channels_last: bool, block: int):
    """(programs a sample, BIG, the kernel's shape and _frac arguments): host integers only."""
    sample_numel = C * H * W
    L = W * C if channels_last else W
    programs = triton.cdiv(sample_numel, block)
    # (n, d, largest a) of pid // programs, e // L, e // (H * W) or j // C, h * gh // H, w * gw // W
    # and (k * col_mod + gw - 1) // gw.
    # (j // C and w * gw // W up to 16 past a line's end: the EACH variant's element in the next line)
    fracs = [(1, programs, B * programs), (1, L, sample_numel + block),
             (1, C, L + _VECTOR_BYTES) if channels_last else (1, H * W, sample_numel + block),
             (gh, H, H), (gw, W, W + _VECTOR_BYTES), (1, gw, gw * (gw + 1))]
    constants = [_frac_constants(*f) for f in fracs]
    big = sample_numel + block > _INT32 or None in constants
    words = [v for c in constants for v in (c or (0, 0))]
    return programs, big, (programs, L, H, W, C, gh, gw, W // gw, W % gw, *words)


def _plan(x: torch.Tensor, gh: int, gw: int, backward: bool):
    """What the launcher runs for x (non-empty) and a (gh, gw) grid: (CHANNELS_LAST, BLOCK, programs
    a sample, BIG, the kernel's shape and _frac arguments, CHUNK, MIXED, EACH). Host integers only."""
    B, C, H, W = x.shape
    channels_last = _validate.memory_format(x) == torch.channels_last
    block = _gpu_block(x.dtype)
    if x.device.type == "cpu":  # only under TRITON_INTERPRET=1: few, large programs run fastest
        block = max(block, min(triton.next_power_of_2(C * H * W), _INTERPRETER_MAX_BLOCK))
    programs, big, args = _geometry(B, C, H, W, gh, gw, channels_last, block)
    config = _config(x, gw, channels_last, backward, big)
    if channels_last and config[2] and W % gw == 0:
        # EACH on cells of equal whole column counts (full-resolution box masks, gw = W): the
        # channels_last image is, byte for byte, an NCHW image [B, 1, H, W * C] with the same grid
        # (element w * C + c is in cell column (w * C + c) * gw // (W * C) = w // (W // gw)), whose
        # EACH variant finds an element's cell column with one multiply-shift instead of two
        # (fastsd.bench.sass: fp16 forward 54 % -> 47 % of the issue budget, backward 82 % -> 74 %,
        # uint8 98 % -> 84 %). The same cell boundaries in a line of the same length: the same
        # CHUNK, MIXED and EACH. The kernel reads x and writes out through its shape arguments only,
        # so the tensors stay as they are. Not where the longer line would need the int64 variant.
        # (The other variants cost the same in either layout.)
        as_nchw = _geometry(B, 1, H, W * C, gh, gw, False, block)
        if not as_nchw[1]:
            (programs, big, args), channels_last = as_nchw, False
        else:
            # CELL runs NCHW lines only: the choice without it (EACH, or the vectors it replaced)
            config = _config(x, gw, channels_last, backward, big, cells=False)
    return (channels_last, block, programs, big, args, *config)


def launch_config(x: torch.Tensor, gh: int, gw: int, backward: bool):
    """(CHANNELS_LAST, CHUNK, MIXED, EACH, CELL) of the variant the launcher runs for x (non-empty)
    and a (gh, gw) grid (tests: which variant a shape takes)."""
    channels_last, *_, chunk, mixed, each, cell = _plan(x, gh, gw, backward)
    return channels_last, chunk, mixed, each, cell


def _launch(x: torch.Tensor, src: torch.Tensor, mask: torch.Tensor, backward: bool, sorted_partner=None) -> torch.Tensor:
    fmt = _validate.memory_format(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    B, C, H, W = x.shape
    sample_numel = C * H * W
    if B == 0 or sample_numel == 0:
        return out
    gh, gw = mask.shape[1], mask.shape[2]
    src, mask = src.contiguous(), mask.contiguous()  # no-ops for the validated inputs
    channels_last, block, programs, big, args, chunk, mixed, each, cell = _plan(x, gh, gw, backward)
    if mask.dtype != torch.bool and each and not backward and x.element_size() < 4:
        # The EACH words of 1- and 2-byte elements multiply a mask byte by its bit field: a uint8
        # mask's nonzero bytes as 1 (one op, for these launches only; a bool mask's bytes are 0 or 1,
        # as every PyTorch bool tensor's must be). Every other path compares the byte with 0.
        mask = mask != 0
    mask = mask.view(torch.uint8)
    check = sorted_partner is not None
    cell_select_kernel[(B * programs,)](
        x, out, src, mask, sorted_partner if check else src, sample_numel, B if check else -B, *args,
        BLOCK=block, CHUNK=chunk, MIXED=mixed, EACH=each, CELL=cell, CHANNELS_LAST=channels_last, BACKWARD=backward,
        BIG=big,
        num_warps=NUM_WARPS, **_OPTIONS,
    )
    return out


def patch_swap(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor, sorted_partner=None) -> torch.Tensor:
    """Forward patch swap. ``x`` contiguous (NCHW or channels_last), ``partner`` int64 ``[B]``
    permutation, ``mask`` bool/uint8 ``[B, gh, gw]`` contiguous (validated by the caller).

    ``sorted_partner``: partner sorted (int64 ``[B]``), where the caller has it; the kernel then
    asserts on the device that it is ``range(B)``, i.e. that partner is a permutation (no launch
    of its own). The interpreter does not run device asserts: on CPU tensors the caller checks."""
    if sorted_partner is not None:
        sorted_partner = sorted_partner.contiguous()
    return _launch(x, partner, mask, backward=False, sorted_partner=sorted_partner)


def patch_swap_backward(grad: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor,
                        inverse_partner=None) -> torch.Tensor:
    """Gradient of :func:`patch_swap` with respect to x: a gather with q = argsort(partner).

    ``inverse_partner``: q (``q[partner[i]] == i``) where the caller has it (the forward's sort);
    else it is computed here (one argsort on the device: no host sync, deterministic)."""
    if inverse_partner is None:
        inverse_partner = torch.argsort(partner)
    return _launch(grad, inverse_partner, mask, backward=True)


# --- ahead-of-time compilation specs (tests/test_aot.py, fastsd.bench.sass) ----------------------------


def _spec(dtype: torch.dtype, backward: bool, channels_last: bool, chunk: int, mixed: bool, big: bool = False,
          each: int = 0, cell: int = 0):
    ty = _TL_DTYPES[dtype]
    direction = "backward" if backward else "forward"
    layout = "channels_last" if channels_last else "nchw"
    signature = {"x_ptr": f"*{ty}", "out_ptr": f"*{ty}", "src_ptr": "*i64", "mask_ptr": "*u8", "sorted_ptr": "*i64",
                 "sample_numel": "i64" if big else "i32"}
    signature.update({a: "i32" for a in _SHAPE_ARGS})
    signature.update({a: "u32" if a.startswith("m_") else "i32" for a in _FRAC_ARGS})
    signature.update({a: "constexpr" for a in ("BLOCK", "CHUNK", "MIXED", "EACH", "CELL", "CHANNELS_LAST", "BACKWARD",
                                               "BIG")})
    # What the JIT specialises on for typical images: 16-byte aligned tensors and C*H*W % 16 == 0
    # (e.g. 3 x 32 x 32, 3 x 224 x 224); the other integers are never specialised (_SHAPE_ARGS, _FRAC_ARGS).
    aligned = ("x_ptr", "out_ptr", "src_ptr", "mask_ptr", "sorted_ptr", "sample_numel")
    block = _gpu_block(dtype)
    return {
        "name": f"patch_swap_{direction}_{ty}_{layout}_{'each' if each else 'mixed' if mixed else 'vec'}{chunk}"
                f"{'_lines' if each == 2 else ''}{f'_cell{cell}' if cell else ''}{'_big' if big else ''}",
        "fn": cell_select_kernel,
        "signature": signature,
        "constexprs": {"BLOCK": block, "CHUNK": chunk, "MIXED": mixed, "EACH": each, "CELL": cell,
                       "CHANNELS_LAST": channels_last, "BACKWARD": backward, "BIG": big},
        "attrs": {(list(signature).index(a),): [["tt.divisibility", 16]] for a in aligned},
        "options": {"num_warps": NUM_WARPS, **_OPTIONS},
        # A thread reads and writes _BYTES_PER_THREAD each (one source an element; fastsd.bench.sass,
        # checked by the traffic tests).
        "moved_bytes": 2 * _BYTES_PER_THREAD,
    }


def _aot_specs():
    specs = []
    for dtype in _TL_DTYPES:
        for backward in (False, True):
            if backward and not dtype.is_floating_point:
                continue  # uint8 has no gradient
            for channels_last in (False, True):
                for chunk in _vec_sizes(dtype):
                    # channels_last (C >= 2) has cells of >= 2 elements: CHUNK 1 only where a
                    # 2-element chunk is not MIXED (all but float64).
                    if not (channels_last and chunk == 1 and _MIXED_MIN[_vec_sizes(dtype)[-1]] <= 2):
                        specs.append(_spec(dtype, backward, channels_last, chunk, mixed=False))
                    if chunk >= _MIXED_MIN[_vec_sizes(dtype)[-1]]:
                        specs.append(_spec(dtype, backward, channels_last, chunk, mixed=True))
                specs.append(_spec(dtype, backward, channels_last, 2 * _vec_sizes(dtype)[-1], mixed=True))
                # EACH where 1-element chunks would be (none in channels_last float64: see above)
                if not (channels_last and _MIXED_MIN[_vec_sizes(dtype)[-1]] <= 2):
                    for each in (1, 2):  # chunks that may cross a line end, and lines of whole chunks
                        widest = _vec_sizes(dtype)[-1]
                        specs.append(_spec(dtype, backward, channels_last, widest, mixed=False, each=each))
                        # and on NCHW lines of power-of-two cells (_cell_width)
                        for cell in () if channels_last else sorted({_cell_width(w, 1, dtype.itemsize, each) for w in (1, 2, 4)} - {0}):
                            specs.append(_spec(dtype, backward, False, widest, mixed=False, each=each, cell=cell))
    # A sample of 2**31 elements or more (one huge image): int64 indices.
    for backward in (False, True):
        specs.append(_spec(torch.float32, backward, False, 4, mixed=True, big=True))
    return specs


# Every (dtype, layout, direction, CHUNK, MIXED) the launchers use on the GPU, for triton.compile without a GPU.
AOT_SPECS = _aot_specs()
