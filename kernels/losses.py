"""Triton kernels of the fused distillation losses (SPEC section 4; formulas in csrc/losses.cpp).

* ``_pair_kd_kernel``: the pair (i, partner[i]) is handled by its lower index, which reads both
  rows and writes both gradient rows, so every logit is read once. A row that fits one block
  (K <= ``MAX_SINGLE_BLOCK``) is loaded once, one program per row (``SINGLE``). Longer rows are split
  along K into ``S`` chunks so that B x S programs cover the GPU: ``_pair_stats_kernel`` writes each
  chunk's statistics (max, sums at temperature 1 and T, z[y]; one more program counts the rows),
  and program (i, s) of ``_pair_kd_kernel`` gathers its rows' S statistics in a fixed order (no
  atomics: deterministic), then writes chunk s of the gradients and its part of the loss. Both
  forms run the same per-block helpers (``_row_block_stats``, ``_pair_block_kd``). A row with an
  ignored label is not read (its gradient is 0, its partner a singleton), and terms a row does not
  have (CE of an ignored row, KD of a teacher) are selected out, never multiplied by 0, so NaN /
  Inf do not leak into them.
* ``_kd_kernel`` (and ``_kd_stats_kernel``): the same for a student row and a teacher row.
* ``_feature_elementwise_kernel`` / ``_feature_cosine_kernel``: every layer of a call in one launch.
  The layers' pointers, sizes and first program index are tuples of kernel arguments (no table to
  copy to the device): program ``pid`` belongs to the layer whose range of programs holds it
  (a static loop over the layers with one runtime branch taken). Each program writes its partial
  loss; the host sums them with torch (a fixed order: deterministic, no atomics). The cosine
  kernel reduces along the channels with the contiguous dimension across lanes: the spatial one
  for contiguous (NCHW) maps (several samples a program when one sample is smaller than a tile),
  the channel one for channels-last maps. With the gradient a program holds whole channel vectors
  (it writes the gradient once it has the norms); without it, a contiguous map's program loops
  over the channels, each thread adding up its own 16-byte vectors (``_cosine_rows``).

Memory access: sample / row / block offsets are int64 scalars added to the base pointers once per
program; the per-element offsets are int32 (within a block, a row, or one sample's ``C * S``
elements, which the launcher checks is below 2**31), so no 64-bit arithmetic runs per element and
no integer division at all runs per element. Rows start at ``i * K``: the launchers pass ``ALIGN``,
the largest power of two <= 16 bytes / itemsize dividing K, so the compiler knows each row is that
aligned and loads 16 bytes at a time where the JIT found the base pointer 16-byte aligned.

Everything is computed in float32 (loads are converted at once, which also sidesteps the
interpreter's bf16 arithmetic); losses and gradients are stored in the input's dtype. float64
inputs never reach these kernels (fastsd.losses routes them to the C++ / torch backends, which keep
float64 scalars; on a GPU the JIT would pass the Python-float temperature and weights as fp32): the
launchers refuse them.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from . import _aot

MAX_SINGLE_BLOCK = 8192  # longest row of logits kept in registers in one pass
LOOP_BLOCK = 2048  # block of the loops over the chunks of longer rows
MAX_SPLIT = 64  # chunks per row at most (each program gathers its rows' chunk statistics)
SPLIT_TARGET = 264  # programs a split aims for: two per SM of an H100 (132 SMs)
FEATURE_BLOCK = 4096  # elements per program of the elementwise feature kernel
COSINE_TILE = 4096  # positions x channels per program of the cosine kernel (16 per thread at 8 warps)
MAX_COSINE_TILE = 16384  # the largest tile (32 warps, 16 elements a thread)
MAX_COSINE_CHANNELS = 16384  # one program holds a whole channel vector
MAX_LAYERS = 8  # layers per launch (more are split into launches of 8)

KINDS = {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3}
COSINE_EPS = 1e-8
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _count_rows(labels_ptr, partner_ptr, counts_ptr, B, K, ignore_index, BLOCK: tl.constexpr, CHECK: tl.constexpr):
    """counts[0] = number of rows with a label, counts[1] = number of rows in a pair (2 x pairs).

    CHECK: assert on the device (compiled in by the launch option debug=True; an asynchronous
    device-side assert, like PyTorch's own index checks) that every label is in [0, K) or
    ignore_index and that partner is an involution of range(B): the glue's checks, without launches."""
    valid = tl.zeros([BLOCK], dtype=tl.float32)
    paired = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < B
        y = tl.load(labels_ptr + offs, mask=m, other=ignore_index)
        p = tl.load(partner_ptr + offs, mask=m, other=0)
        in_range = m & (p >= 0) & (p < B)
        yp = tl.load(labels_ptr + p, mask=in_range, other=ignore_index)
        if CHECK:
            tl.device_assert((y == ignore_index) | ((y >= 0) & (y < K)),
                             "fastsd.pair_kd_loss: labels must be in [0, K) or equal ignore_index")
            pp = tl.load(partner_ptr + p, mask=in_range, other=-1)
            tl.device_assert(~m | (pp == offs), "fastsd.pair_kd_loss: partner must pair rows: partner[partner[i]] "
                                                "== i for every i (e.g. from intra_class_pairs)")
        v = m & (y != ignore_index)
        valid += v.to(tl.float32)
        paired += (v & (yp != ignore_index) & (p != offs)).to(tl.float32)
    tl.store(counts_ptr, tl.sum(valid, 0))
    tl.store(counts_ptr + 1, tl.sum(paired, 0))


@triton.jit
def _pair_counts_kernel(labels_ptr, partner_ptr, counts_ptr, B, K, ignore_index, BLOCK: tl.constexpr,
                        CHECK: tl.constexpr):
    _count_rows(labels_ptr, partner_ptr, counts_ptr, B, K, ignore_index, BLOCK, CHECK)


@triton.jit
def _online(m, s1, st, z, inv_t, WITH_S1: tl.constexpr):
    """Fold a block z (masked entries -inf) into a running max m and sums exp(z - m) (if WITH_S1),
    exp((z - m) / T)."""
    m_new = tl.maximum(m, tl.max(z, 0))
    if WITH_S1:
        s1 = s1 * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
    st = st * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp((z - m_new) * inv_t), 0)
    return m_new, s1, st


@triton.jit
def _safe_log(s):
    # A row that was not read (masked out) has sum exactly 0; log 1 keeps its unused statistics
    # finite. Only that case: a NaN or +inf sum (NaN / inf logits) must propagate as in torch.
    return tl.log(tl.where(s == 0.0, 1.0, s))


@triton.jit
def _aligned(K, ALIGN: tl.constexpr):
    # K itself (the launcher checked K % ALIGN == 0), in a form whose divisibility the compiler sees:
    # rows i * K start ALIGN-aligned, so their loads and stores can be ALIGN elements wide.
    return K // ALIGN * ALIGN


@triton.jit
def _load_rows(row_i, row_j, offs, K, read_i, read_j):
    """A block of two rows in float32; the entries past K, and all of a row not read, are -inf."""
    zi = tl.load(row_i + offs, mask=(offs < K) & read_i, other=float("-inf")).to(tl.float32)
    zj = tl.load(row_j + offs, mask=(offs < K) & read_j, other=float("-inf")).to(tl.float32)
    return zi, zj


@triton.jit
def _row_block_stats(row, offs, K, read, y, m, s1, st, zy, inv_t, WITH_S1: tl.constexpr):
    """Load a block of a row and fold it into its statistics (and z[y]); returns the block too."""
    z = tl.load(row + offs, mask=(offs < K) & read, other=float("-inf")).to(tl.float32)
    m, s1, st = _online(m, s1, st, z, inv_t, WITH_S1)
    zy += tl.sum(tl.where(offs == y, z, 0.0), 0)
    return z, m, s1, st, zy


@triton.jit
def _chunk_stats(row, lo, hi, read, y, inv_t, WITH_S1: tl.constexpr, BLOCK: tl.constexpr):
    """Statistics (max, sum exp(z - max), sum exp((z - max) / T), z[y]) of row[lo:hi]; hi <= K."""
    m = -1e30
    s1 = 0.0
    st = 0.0
    zy = 0.0
    for start in range(lo, tl.where(read, hi, lo), BLOCK):
        _z, m, s1, st, zy = _row_block_stats(row, start + tl.arange(0, BLOCK), hi, read, y, m, s1, st, zy, inv_t,
                                             WITH_S1)
    return m, s1, st, zy


@triton.jit
def _store_stats(stats_ptr, plane, idx, m, s1, st, zy):
    """Statistics are stored in four planes of ``plane`` floats: max, sum at T = 1, sum at T, z[y]."""
    tl.store(stats_ptr + idx, m)
    tl.store(stats_ptr + plane + idx, s1)
    tl.store(stats_ptr + 2 * plane + idx, st)
    tl.store(stats_ptr + 3 * plane + idx, zy)


@triton.jit
def _gather_stats(stats_ptr, plane, row, S, read, inv_t, WITH_S1: tl.constexpr, SP: tl.constexpr):
    """A row's statistics from its S chunks' (stored by _store_stats at row * S + s), in a fixed order."""
    idx = tl.arange(0, SP)
    ptr = stats_ptr + row * S + idx
    msk = (idx < S) & read
    mc = tl.load(ptr, mask=msk, other=-1e30)
    m = tl.max(mc, 0)
    st = tl.sum(tl.load(ptr + 2 * plane, mask=msk, other=0.0) * tl.exp((mc - m) * inv_t), 0)
    s1 = 0.0
    zy = 0.0
    if WITH_S1:
        s1 = tl.sum(tl.load(ptr + plane, mask=msk, other=0.0) * tl.exp(mc - m), 0)
        zy = tl.sum(tl.load(ptr + 3 * plane, mask=msk, other=0.0), 0)
    return m, s1, st, zy


@triton.jit
def _row_grad(z, offs, y, m, s1, ce_on, ce_scale, kd_on, kd):
    """A row's gradient: its CE part where it has a label, plus ``kd`` where it is a student. The parts
    it does not have are selected out (never multiplied by 0), so NaN / Inf in them do not leak."""
    ce = ce_scale * (tl.exp(z - m) / s1 - tl.where(offs == y, 1.0, 0.0))
    return tl.where(ce_on, ce, 0.0) + tl.where(kd_on, kd, 0.0)


@triton.jit
def _pair_block_kd(zi, zj, offs, K, pair_on, yi, yj, mi, mj, s1i, s1j, lsti, lstj, inv_t, vi, vj, kd_i, kd_j,
                   ce_scale, kd_grad_scale, grad_i, grad_j, store_i, store_j, COMPUTE_GRAD: tl.constexpr):
    """One block of pass 2: its parts of KL(p_j || p_i) and KL(p_i || p_j) at temperature T, and the
    gradients of both rows (stored where store_i / store_j)."""
    lpi = (zi - mi) * inv_t - lsti
    lpj = (zj - mj) * inv_t - lstj
    pi = tl.exp(lpi)
    pj = tl.exp(lpj)
    in_pair = (offs < K) & pair_on
    kl_i = tl.sum(tl.where(in_pair, pj * (lpj - lpi), 0.0), 0)
    kl_j = tl.sum(tl.where(in_pair, pi * (lpi - lpj), 0.0), 0)
    if COMPUTE_GRAD:
        gi = _row_grad(zi, offs, yi, mi, s1i, vi, ce_scale, kd_i, kd_grad_scale * (pi - pj))
        gj = _row_grad(zj, offs, yj, mj, s1j, vj, ce_scale, kd_j, kd_grad_scale * (pj - pi))
        tl.store(grad_i + offs, gi.to(grad_i.dtype.element_ty), mask=(offs < K) & store_i)
        tl.store(grad_j + offs, gj.to(grad_j.dtype.element_ty), mask=(offs < K) & store_j)
    return kl_i, kl_j


@triton.jit
def _pair_stats_kernel(logits_ptr, labels_ptr, partner_ptr, counts_ptr, stats_ptr, B, K, chunk, temperature,
                       ignore_index, BLOCK: tl.constexpr, ALIGN: tl.constexpr, COUNT_BLOCK: tl.constexpr,
                       CHECK: tl.constexpr):
    """Program (r, s): the statistics of chunk s of row r (if r has a label); program (B, 0) counts the rows."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    if r == B:
        if s == 0:
            _count_rows(labels_ptr, partner_ptr, counts_ptr, B, K, ignore_index, COUNT_BLOCK, CHECK)
    else:
        # a new name: K is a constexpr where it is 1 (Triton specialises on it), and one branch
        # may not rebind it to a tensor
        Ka = _aligned(K, ALIGN)
        y = tl.load(labels_ptr + r)
        valid = y != ignore_index
        lo = s * chunk
        m, s1, st, zy = _chunk_stats(logits_ptr + r.to(tl.int64) * Ka, lo, tl.minimum(lo + chunk, Ka),
                                     valid, tl.where(valid, y, -1).to(tl.int32), 1.0 / temperature, True, BLOCK)
        _store_stats(stats_ptr, B * S, r * S + s, m, s1, st, zy)


@triton.jit
def _pair_kd_kernel(logits_ptr, labels_ptr, partner_ptr, counts_ptr, stats_ptr, loss_ptr, grad_ptr,
                    K, chunk, temperature, kd_weight, ce_weight, ignore_index,
                    SYMMETRIC: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                    SINGLE: tl.constexpr, ALIGN: tl.constexpr, SP: tl.constexpr):
    """Program (i, s): chunk s of the pair led by row i (SINGLE: the whole rows, s = 0); writes
    loss[i * S + s], its part of the loss."""
    i = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    K = _aligned(K, ALIGN)
    j = tl.load(partner_ptr + i)
    lead = j >= i  # the pair belongs to its lower index
    has_j = lead & (j != i)
    yi = tl.load(labels_ptr + i)
    yj = tl.load(labels_ptr + j)
    # A row with an ignored label has no term: it is not read and its gradient is 0 (its partner is
    # then a singleton).
    vi = lead & (yi != ignore_index)
    vj = has_j & (yj != ignore_index)
    pair_on = vi & vj
    # column indices are int32 (K < 2**31); -1 for a row not read, whatever its ignore_index
    yi = tl.where(vi, yi, -1).to(tl.int32)
    yj = tl.where(vj, yj, -1).to(tl.int32)
    ce_scale = ce_weight / tl.maximum(tl.load(counts_ptr), 1.0)
    n_pairs = tl.maximum(tl.load(counts_ptr + 1) * 0.5, 1.0)
    inv_t = 1.0 / temperature
    row_i = logits_ptr + i.to(tl.int64) * K
    row_j = logits_ptr + j * K  # j is int64 (partner is)
    grad_i = grad_ptr + i.to(tl.int64) * K
    grad_j = grad_ptr + j * K

    # Pass 1: max, sums at temperature 1 and T, and z[y] of both rows.
    if SINGLE:
        offs = tl.arange(0, BLOCK)
        zi, mi, s1i, sti, zyi = _row_block_stats(row_i, offs, K, vi, yi, -1e30, 0.0, 0.0, 0.0, inv_t, True)
        zj, mj, s1j, stj, zyj = _row_block_stats(row_j, offs, K, vj, yj, -1e30, 0.0, 0.0, 0.0, inv_t, True)
    else:
        plane = tl.num_programs(0) * S
        mi, s1i, sti, zyi = _gather_stats(stats_ptr, plane, i, S, vi, inv_t, True, SP)
        mj, s1j, stj, zyj = _gather_stats(stats_ptr, plane, j, S, vj, inv_t, True, SP)
    lse1i = mi + _safe_log(s1i)
    lse1j = mj + _safe_log(s1j)
    lsti = _safe_log(sti)
    lstj = _safe_log(stj)
    ce_loss = tl.where(vi, lse1i - zyi, 0.0) + tl.where(vj, lse1j - zyj, 0.0)
    # The teacher is the member more confident in its own label; ties (NaN too): the lower index, i.
    j_teaches = zyj - lse1j > zyi - lse1i
    if SYMMETRIC:
        kd_i = pair_on
        kd_j = pair_on
        w = 0.5
    else:
        kd_i = pair_on & j_teaches
        kd_j = pair_on & ~j_teaches
        w = 1.0
    kd_grad_scale = kd_weight * temperature / n_pairs * w

    # Pass 2: KL(p_j || p_i), KL(p_i || p_j) at temperature T, and the gradients.
    if SINGLE:
        kl_i, kl_j = _pair_block_kd(zi, zj, offs, K, pair_on, yi, yj, mi, mj, s1i, s1j, lsti, lstj, inv_t, vi, vj,
                                    kd_i, kd_j, ce_scale, kd_grad_scale, grad_i, grad_j, lead, has_j, COMPUTE_GRAD)
    else:
        kl_i = 0.0
        kl_j = 0.0
        lo = s * chunk
        hi = tl.minimum(lo + chunk, K)
        for start in range(lo, tl.where(lead & (pair_on | COMPUTE_GRAD), hi, lo), BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zi, zj = _load_rows(row_i, row_j, offs, hi, vi, vj)
            dkl_i, dkl_j = _pair_block_kd(zi, zj, offs, hi, pair_on, yi, yj, mi, mj, s1i, s1j, lsti, lstj, inv_t,
                                          vi, vj, kd_i, kd_j, ce_scale, kd_grad_scale, grad_i, grad_j, lead, has_j,
                                          COMPUTE_GRAD)
            kl_i += dkl_i
            kl_j += dkl_j
    kd = tl.where(kd_i, w * kl_i, 0.0) + tl.where(kd_j, w * kl_j, 0.0)
    ce = tl.where(s == 0, ce_scale * ce_loss, 0.0)  # the CE term once per row, by chunk 0
    tl.store(loss_ptr + i * S + s, ce + kd_weight * temperature * temperature / n_pairs * kd)


@triton.jit
def _kd_block(zs, zt, offs, K, ms, mt, lsts, lstt, inv_t, grad_scale, row_g, COMPUTE_GRAD: tl.constexpr):
    """One block of a KD row: its part of KL(p || q) at temperature T, and its gradient (stored)."""
    m = offs < K
    lq = (zs - ms) * inv_t - lsts
    lp = (zt - mt) * inv_t - lstt
    q = tl.exp(lq)
    p = tl.exp(lp)
    if COMPUTE_GRAD:
        tl.store(row_g + offs, (grad_scale * (q - p)).to(row_g.dtype.element_ty), mask=m)
    return tl.sum(tl.where(m, p * (lp - lq), 0.0), 0)


@triton.jit
def _kd_stats_kernel(student_ptr, teacher_ptr, stats_ptr, K, chunk, temperature, BLOCK: tl.constexpr,
                     ALIGN: tl.constexpr):
    """Program (r, s): max and sum exp((z - max) / T) of chunk s of student row r (planes 0, 2) and of
    teacher row r (planes 1, 3)."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    K = _aligned(K, ALIGN)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, K)
    inv_t = 1.0 / temperature
    ms, _a, sts, _b = _chunk_stats(student_ptr + r.to(tl.int64) * K, lo, hi, True, -1, inv_t, False, BLOCK)
    mt, _c, stt, _d = _chunk_stats(teacher_ptr + r.to(tl.int64) * K, lo, hi, True, -1, inv_t, False, BLOCK)
    _store_stats(stats_ptr, tl.num_programs(0) * S, r * S + s, ms, mt, sts, stt)


@triton.jit
def _kd_kernel(student_ptr, teacher_ptr, stats_ptr, loss_ptr, grad_ptr, K, chunk, temperature, loss_scale,
               grad_scale, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr, ALIGN: tl.constexpr,
               SP: tl.constexpr):
    """loss[i * S + s] = loss_scale * chunk s's part of KL(softmax(t_i / T) || softmax(s_i / T)) (scaled
    here: no multiply after the sum); its gradient grad_scale * (q_i - p_i). SINGLE: the whole row, s = 0."""
    i = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    K = _aligned(K, ALIGN)
    row_s = student_ptr + i.to(tl.int64) * K
    row_t = teacher_ptr + i.to(tl.int64) * K
    row_g = grad_ptr + i.to(tl.int64) * K
    inv_t = 1.0 / temperature
    if SINGLE:
        offs = tl.arange(0, BLOCK)
        zs, ms, _s1s, sts, _zys = _row_block_stats(row_s, offs, K, True, -1, -1e30, 0.0, 0.0, 0.0, inv_t, False)
        zt, mt, _s1t, stt, _zyt = _row_block_stats(row_t, offs, K, True, -1, -1e30, 0.0, 0.0, 0.0, inv_t, False)
        kl = _kd_block(zs, zt, offs, K, ms, mt, _safe_log(sts), _safe_log(stt), inv_t, grad_scale, row_g,
                       COMPUTE_GRAD)
    else:
        # planes: 0 student max, 1 teacher max, 2 student sum, 3 teacher sum (see _kd_stats_kernel)
        plane = tl.num_programs(0) * S
        ms, _a, sts, _b = _gather_stats(stats_ptr, plane, i, S, True, inv_t, False, SP)
        mt, _c, stt, _d = _gather_stats(stats_ptr + plane, plane, i, S, True, inv_t, False, SP)
        lsts = _safe_log(sts)
        lstt = _safe_log(stt)
        lo = s * chunk
        hi = tl.minimum(lo + chunk, K)
        kl = 0.0
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zs, zt = _load_rows(row_s, row_t, offs, hi, True, True)
            kl += _kd_block(zs, zt, offs, hi, ms, mt, lsts, lstt, inv_t, grad_scale, row_g, COMPUTE_GRAD)
    tl.store(loss_ptr + i * S + s, loss_scale * kl)


@triton.jit
def _feature_elementwise_kernel(students, targets, grads, numels, starts, scales, partial_ptr,
                                NUM_LAYERS: tl.constexpr, KIND: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                                BLOCK: tl.constexpr):
    """mse / l1 / smooth_l1 (beta 1) over the memory of every layer; scales[l] = w_l / n_l or w_l."""
    pid = tl.program_id(0)
    for l in tl.static_range(NUM_LAYERS):
        start = starts[l]
        n = numels[l]
        if (pid >= start) & (pid < start + tl.cdiv(n, BLOCK)):
            first = (pid - start).to(tl.int64) * BLOCK
            offs = tl.arange(0, BLOCK)
            m = offs < tl.minimum(n - first, BLOCK).to(tl.int32)
            s = tl.load(students[l] + first + offs, mask=m, other=0.0).to(tl.float32)
            t = tl.load(targets[l] + first + offs, mask=m, other=0.0).to(tl.float32)
            d = s - t
            if KIND == 0:
                e = d * d
                g = 2.0 * d
            elif KIND == 1:
                e = tl.abs(d)
                g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            else:
                small = tl.abs(d) < 1.0
                e = tl.where(small, 0.5 * d * d, tl.abs(d) - 0.5)
                # clamp(d, -1, 1), which keeps a NaN d (as torch's smooth_l1 backward does)
                g = tl.where(d > 1.0, 1.0, tl.where(d < -1.0, -1.0, d))
            tl.store(partial_ptr + pid, scales[l] * tl.sum(e, 0))
            if COMPUTE_GRAD:
                tl.store(grads[l] + first + offs, (scales[l] * g).to(grads[l].dtype.element_ty), mask=m)


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _cosine_terms(dot, xx, yy):
    """(cos, 1 / (max(|x|, eps) max(|y|, eps))) of a position from its three sums over the channels,
    with reciprocal square roots: a square root and a ``div.full.f32`` division cost ~10
    instructions a position, and every thread that holds some of a position's channels computes
    them. 1 / max(|x|, eps) = rsqrt(max(xx, eps^2)), with a max that keeps a NaN sum (tl.maximum
    would drop it)."""
    inv = tl.math.rsqrt(tl.where(xx < 1e-16, 1e-16, xx)) * tl.math.rsqrt(tl.where(yy < 1e-16, 1e-16, yy))
    return dot * inv, inv


@triton.jit
def _cosine_tile(s_ptr, t_ptr, g_ptr, offs, m, in_q, scale, AXIS: tl.constexpr, COMPUTE_GRAD: tl.constexpr):
    """1 - cos along AXIS (the channels) of a tile of positions; stores the gradient; returns
    scale * the sum over the positions in_q."""
    x = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dot, xx, yy = tl.reduce((x * y, x * x, y * y), AXIS, _add3)  # one reduction for the three sums
    cos, inv = _cosine_terms(dot, xx, yy)
    part = scale * tl.sum(tl.where(in_q, 1.0 - cos, 0.0))
    if COMPUTE_GRAD:
        # d(1 - cos)/dx = -y / (|x| |y|) + [|x| > eps] cos x / |x|^2  (eps-clamped norms; a
        # division by |x|^2 = xx, not by the square of the square root)
        ky = -scale * inv
        kx = tl.where(xx > 1e-16, scale * cos / xx, 0.0)
        g = tl.expand_dims(ky, AXIS) * y + tl.expand_dims(kx, AXIS) * x
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=m)
    return part


@triton.jit
def _cosine_rows(s_ptr, t_ptr, t, C, S, N, scale, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_S: tl.constexpr, GROUP: tl.constexpr, ALIGN: tl.constexpr, FULL: tl.constexpr,
                 VEC: tl.constexpr):
    """scale * sum of 1 - cos over program t's positions of a contiguous (NCHW) layer, no gradient.

    A sample is C / GROUP rows of R = GROUP * S elements (GROUP consecutive channels: 1 where VEC
    divides S, else the fewest channels whose row VEC divides). Program t takes BLOCK_N samples x
    BLOCK_S columns of the rows and loops over the rows, BLOCK_C a step: each thread adds the
    products of its own elements (VEC consecutive columns, one 16-byte access per row and tensor),
    so the loop has no cross-thread work; the sums over the rows' columns are reduced once at the
    end, and with GROUP > 1 column k * S + s of a row adds to position s (a gather)."""
    R = _aligned(S * GROUP, ALIGN)
    rows = C // GROUP
    per_block = tl.cdiv(R, BLOCK_S)
    nb = t // per_block  # one scalar division per program
    first = nb * BLOCK_N
    r = tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    col = (t - nb * per_block) * BLOCK_S + tl.max_contiguous(tl.arange(0, BLOCK_S), VEC)
    in_q = (n < N - first)[:, None] & (col < R)[None, :]
    CS = rows * R
    base = first.to(tl.int64) * CS
    offs = r[:, None, None] * R + n[None, :, None] * CS + col[None, None, :]
    ps = s_ptr + base + offs
    pt = t_ptr + base + offs
    dot = tl.zeros([BLOCK_C, BLOCK_N, BLOCK_S], tl.float32)
    xx = tl.zeros([BLOCK_C, BLOCK_N, BLOCK_S], tl.float32)
    yy = tl.zeros([BLOCK_C, BLOCK_N, BLOCK_S], tl.float32)
    for r0 in range(0, rows, BLOCK_C):
        if FULL:  # BLOCK_C divides the rows: no row mask
            m = in_q[None, :, :]
        else:
            m = (r < rows - r0)[:, None, None] & in_q[None, :, :]
        x = tl.load(ps, mask=m, other=0.0).to(tl.float32)
        y = tl.load(pt, mask=m, other=0.0).to(tl.float32)
        dot += x * y
        xx += x * x
        yy += y * y
        ps += BLOCK_C * R
        pt += BLOCK_C * R
    dot, xx, yy = tl.reduce((dot, xx, yy), 0, _add3)
    if GROUP > 1:  # position s of a row: its columns s, s + S, ..., s + (GROUP - 1) S
        BLOCK_P: tl.constexpr = BLOCK_S // GROUP
        p = tl.arange(0, BLOCK_P)
        at = tl.minimum(p[:, None] + tl.arange(0, GROUP)[None, :] * S, BLOCK_S - 1)  # [position, k]
        at = tl.broadcast_to(tl.reshape(at, [BLOCK_S])[None, :, None, None], [BLOCK_N, BLOCK_S, 2, 2])
        v = tl.join(tl.join(dot, xx), tl.join(yy, yy))  # [BLOCK_N, BLOCK_S, 2, 2]: one gather
        v = tl.sum(tl.reshape(tl.gather(v, at, 1), [BLOCK_N, BLOCK_P, GROUP, 2, 2]), 2)
        a, b = tl.split(v)
        dot, xx = tl.split(a)
        yy, _yy = tl.split(b)
        in_q = (n < N - first)[:, None] & (p < S)[None, :]
    cos, _inv = _cosine_terms(dot, xx, yy)
    return scale * tl.sum(tl.where(in_q, 1.0 - cos, 0.0))


@triton.jit
def _feature_cosine_kernel(students, targets, grads, channels, spatial, rows, starts, ends, scales, partial_ptr,
                           NUM_LAYERS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, VEC: tl.constexpr,
                           CHANNELS_LAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, C_FULL: tl.constexpr,
                           GROUP: tl.constexpr):
    """1 - cos(student, target) along dim 1 at every position (n, *spatial), every layer in one launch.

    Layer l has C = channels[l] channels and S = spatial[l] positions a sample. Channels-last layers
    (also used when S == 1): element (q, c) of position q = n * S + s at ``q * C + c``; rows[l] = N * S
    positions, a program takes BLOCK_S[l] of them x BLOCK_C[l] channels, reduced along the channels
    (contiguous). Contiguous layers: element (n, c, s) at ``n * C * S + c * S + s``; rows[l] = N
    samples, a program takes BLOCK_N[l] samples x BLOCK_C[l] channels x BLOCK_S[l] positions (the
    contiguous dimension, across lanes, VEC a thread) and reduces along the channels. ALIGN[l] is the
    power of two dividing the stride (C, or S), C_FULL[l] says C == BLOCK_C[l]. Without the gradient,
    contiguous layers run ``_cosine_rows`` instead (BLOCK_C[l] rows a step of GROUP[l] channels each,
    ALIGN[l] dividing the row, C_FULL[l]: BLOCK_C[l] divides the rows).
    """
    pid = tl.program_id(0)
    for l in tl.static_range(NUM_LAYERS):
        start = starts[l]
        if (pid >= start) & (pid < ends[l]):
            c = tl.arange(0, BLOCK_C[l])
            C = channels[l]
            if CHANNELS_LAST[l]:
                C = _aligned(C, ALIGN[l])  # (before the mask, so that the mask is seen ALIGN-constant)
            if C_FULL[l]:  # no channel mask to compute per element
                in_c = tl.full([BLOCK_C[l]], 1, tl.int1)
            else:
                in_c = c < C
            if CHANNELS_LAST[l]:
                first = (pid - start).to(tl.int64) * BLOCK_S[l]
                q = tl.arange(0, BLOCK_S[l])
                in_q = q < tl.minimum(rows[l] - first, BLOCK_S[l]).to(tl.int32)
                base = first * C
                part = _cosine_tile(students[l] + base, targets[l] + base, grads[l] + base, q[:, None] * C + c[None, :],
                                    in_q[:, None] & in_c[None, :], in_q, scales[l], 1, COMPUTE_GRAD)
            elif not COMPUTE_GRAD:
                part = _cosine_rows(students[l], targets[l], pid - start, channels[l], spatial[l], rows[l], scales[l],
                                    BLOCK_N[l], BLOCK_C[l], BLOCK_S[l], GROUP[l], ALIGN[l], C_FULL[l], VEC)
            else:
                S = _aligned(spatial[l], ALIGN[l])
                t = pid - start
                per_block = tl.cdiv(S, BLOCK_S[l])
                nb = t // per_block  # one scalar division per program
                first = nb * BLOCK_N[l]
                n = tl.arange(0, BLOCK_N[l])
                sp = (t - nb * per_block) * BLOCK_S[l] + tl.max_contiguous(tl.arange(0, BLOCK_S[l]), VEC)
                in_q = (n < rows[l] - first)[:, None] & (sp < S)[None, :]
                base = first.to(tl.int64) * (C * S)
                # A [channels, samples, positions] tile, offsets within BLOCK_N samples (BLOCK_N * C * S <
                # 2**31: the launcher checks). Channels first: lanes and warps go to the positions
                # before the channels, so a thread holds many channels of few positions (a short
                # reduction per position).
                offs = c[:, None, None] * S + n[None, :, None] * (C * S) + sp[None, None, :]
                part = _cosine_tile(students[l] + base, targets[l] + base, grads[l] + base, offs,
                                    in_c[:, None, None] & in_q[None, :, :], in_q, scales[l], 0, COMPUTE_GRAD)
            tl.store(partial_ptr + pid, part)


# --- launchers --------------------------------------------------------------------------------


def _check_inputs(fn: str, *tensors, rows: bool = True) -> None:
    """float32/16/bf16 only (never float64: see the module docstring); rows contiguous."""
    import torch

    for t in tensors:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"fastsd.kernels.losses.{fn}: the Triton loss kernels take float32/float16/bfloat16, "
                            f"got {t.dtype} (float64 runs on the C++ and torch backends, in float64 throughout)")
        if rows and not t.is_contiguous():
            raise ValueError(f"fastsd.kernels.losses.{fn}: rows must be contiguous, got strides {t.stride()}")


def _align(n: int, itemsize: int) -> int:
    """The largest power of two <= 16 bytes / itemsize that divides n: rows of n elements start that aligned."""
    a = max(1, 16 // itemsize)
    while n % a:
        a //= 2
    return a


def _row_block(K: int):
    """(BLOCK, SINGLE, num_warps) for rows of K logits."""
    if K <= MAX_SINGLE_BLOCK:
        block = max(16, triton.next_power_of_2(K))
        return block, True, min(32, max(1, block // 256))  # 8 logits a thread and row
    return LOOP_BLOCK, False, 8


def _split(K: int, rows: int):
    """(chunk, S): rows longer than MAX_SINGLE_BLOCK in S chunks of ``chunk`` (a multiple of LOOP_BLOCK),
    enough that ``rows`` working programs per chunk make SPLIT_TARGET programs, at most MAX_SPLIT."""
    blocks = triton.cdiv(K, LOOP_BLOCK)
    want = min(blocks, MAX_SPLIT, max(1, triton.cdiv(SPLIT_TARGET, max(rows, 1))))
    per = max(1, blocks // want)
    if triton.cdiv(blocks, per) > MAX_SPLIT:
        per = triton.cdiv(blocks, MAX_SPLIT)
    return LOOP_BLOCK * per, triton.cdiv(blocks, per)


# Launch options that compile tl.device_assert in (without the integer overflow checks debug adds).
_CHECKED = {"debug": True, "sanitize_overflow": False}


def pair_kd_loss(logits, labels, partner, temperature, kd_weight, ce_weight, symmetric, ignore_index, compute_grad,
                 check_indices=False):
    """(loss, grad) of fastsd.pair_kd_loss; logits contiguous rows, labels/partner int64 [B].

    Rows up to MAX_SINGLE_BLOCK: the counts kernel and B programs (one per row; a pair's lower index
    does the pair). Longer rows: the statistics kernel (which also counts) and B x S programs.
    ``check_indices``: the counting asserts labels and partner on the device (see _count_rows); the
    interpreter ignores device asserts."""
    import torch

    _check_inputs("pair_kd_loss", logits)
    B, K = logits.shape
    dev = logits.device
    counts = torch.empty(2, dtype=torch.float32, device=dev)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    block, single, warps = _row_block(K)
    align = _align(K, logits.element_size())
    count_block = min(1024, max(16, triton.next_power_of_2(B)))
    checked = _CHECKED if check_indices else {}
    if single:
        chunk, S, stats = K, 1, counts
        _pair_counts_kernel[(1,)](labels, partner, counts, B, K, ignore_index, BLOCK=count_block,
                                  CHECK=bool(check_indices), **checked)
    else:
        chunk, S = _split(K, B // 2)  # about half the programs lead a pair
        stats = torch.empty(4 * B * S, dtype=torch.float32, device=dev)
        _pair_stats_kernel[(B + 1, S)](logits, labels, partner, counts, stats, B, K, chunk, float(temperature),
                                       int(ignore_index), BLOCK=block, ALIGN=align, COUNT_BLOCK=count_block,
                                       CHECK=bool(check_indices), num_warps=warps, **checked)
    rows = torch.empty(B * S, dtype=torch.float32, device=dev)
    _pair_kd_kernel[(B, S)](logits, labels, partner, counts, stats, rows, grad if compute_grad else logits,
                            K, chunk, float(temperature), float(kd_weight), float(ce_weight), int(ignore_index),
                            SYMMETRIC=bool(symmetric), COMPUTE_GRAD=bool(compute_grad), BLOCK=block, SINGLE=single,
                            ALIGN=align, SP=MAX_SPLIT, num_warps=warps)
    return rows.sum().to(logits.dtype), grad


def kd_loss(student, teacher, temperature, loss_scale, grad_scale, per_row, compute_grad):
    """(loss, grad) of fastsd.kd_loss: loss = loss_scale * KL rows (summed unless per_row).

    Rows up to MAX_SINGLE_BLOCK: B programs; longer rows: the statistics kernel and B x S programs.
    The kernel stores loss_scale * KL: a per-row loss is its output as it is, a sum one reduction."""
    import torch

    _check_inputs("kd_loss", student, teacher)
    B, K = student.shape
    dev = student.device
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    block, single, warps = _row_block(K)
    align = _align(K, student.element_size())
    if single:
        chunk, S, stats = K, 1, student
    else:
        chunk, S = _split(K, B)
        stats = torch.empty(4 * B * S, dtype=torch.float32, device=dev)
        _kd_stats_kernel[(B, S)](student, teacher, stats, K, chunk, float(temperature), BLOCK=block, ALIGN=align,
                                 num_warps=warps)
    rows = torch.empty(B * S, dtype=torch.float32, device=dev)
    _kd_kernel[(B, S)](student, teacher, stats, rows, grad if compute_grad else student, K, chunk,
                       float(temperature), float(loss_scale), float(grad_scale), COMPUTE_GRAD=bool(compute_grad),
                       BLOCK=block, SINGLE=single, ALIGN=align, SP=MAX_SPLIT, num_warps=warps)
    if per_row:
        loss = rows if S == 1 else rows.view(B, S).sum(1)
    else:
        loss = rows.sum()
    return loss.to(student.dtype), grad


def cosine_blocks(C: int, S: int, N: int, channels_last: bool, itemsize: int, tile: int = COSINE_TILE):
    """(BLOCK_N, BLOCK_C, BLOCK_S) of the cosine kernel for a layer of N samples of C channels and S
    positions: whole channel vectors, about ``tile`` elements. Channels-last: BLOCK_S positions
    (BLOCK_N = 1). Contiguous: at least 4 consecutive positions per channel (a 128-bit float32
    access) where MAX_COSINE_TILE allows it; BLOCK_N samples when one sample's C x S is smaller than
    the tile."""
    block_c = triton.next_power_of_2(C)
    if channels_last or S == 1:
        return 1, block_c, min(triton.next_power_of_2(N * S), max(1, tile // block_c))
    block_s = min(triton.next_power_of_2(S), max(1, tile // block_c, min(4, MAX_COSINE_TILE // block_c)))
    return min(triton.next_power_of_2(N), max(1, tile // (block_c * block_s))), block_c, block_s


def _cosine_vec(itemsize: int) -> int:
    """Consecutive positions a thread holds on a contiguous map: 16 bytes (4 in float32, 8 in 16-bit
    dtypes). Every thread holding some of a position's channels does that position's share of the
    reduction (shuffles, shared memory) and its norms, so it needs enough channels a position: with
    2 (16 elements a thread) 8 16-bit positions cost 76-87 % of the issue budget on sm_90, with 4
    (32 elements, :func:`_cosine_layout`) and reciprocal square roots 43-47 %."""
    return 16 // itemsize


def _cosine_layout(layers, itemsize: int, compute_grad: bool, min_warps: int = 1, wide: bool = False):
    """(num_warps, per_thread, [(BLOCK_N, BLOCK_C, BLOCK_S)]) of a cosine launch over layers (C, S, N,
    channels_last) whose programs hold whole channel vectors: ``per_thread`` elements a thread at
    the largest tile (min_warps to 32 warps), the other layers' tiles grown to match. 32 without the
    gradient (whose registers it does not hold); with it, 16, and 32 in 16-bit dtypes where some
    contiguous layer gets 16-byte accesses (``wide``): 8 positions a thread then need 4 channels a
    position for the per-position work of the reduction to stay within the issue budget; unless
    that takes more than 8 warps (ptxas then spills at the 128 registers a thread that 25 %
    occupancy allows)."""
    for per_thread in ((32, 16) if compute_grad and wide and itemsize == 2 else (16,) if compute_grad
                       else (32,)):
        largest = max(math.prod(cosine_blocks(*layer, itemsize, tile=per_thread * 256)) for layer in layers)
        warps = min(32, max(min_warps, largest // (per_thread * 32)))
        if warps <= 8:
            break
    return warps, per_thread, [cosine_blocks(*layer, itemsize, tile=per_thread * 32 * warps) for layer in layers]


ROW_WARPS = 8  # warps of a cosine launch whose layers are all contiguous, without the gradient
ROW_WASTE = 1.07  # a program's columns may overshoot a row by 7 % (masked lanes) for a wider block


def cosine_row_blocks(C: int, S: int, N: int, itemsize: int, tile: int):
    """(BLOCK_N, BLOCK_C, BLOCK_S, GROUP, ALIGN, programs) of ``_cosine_rows`` (contiguous layer, no
    gradient) with ``tile`` elements a loop step: 16-byte accesses (VEC elements) where GROUP
    consecutive channels make a row VEC divides (and C is a multiple of GROUP, and a whole row fits
    the tile), else rows of one channel at the alignment S allows. BLOCK_S columns (the widest that
    wastes at most 7 % of a row), then BLOCK_C rows and BLOCK_N samples to fill the tile."""
    vec = 16 // itemsize
    group = vec // _align(S, itemsize)
    if C % group or triton.next_power_of_2(group * S) > tile:
        group = 1
    R = group * S
    if group > 1:
        block_s = triton.next_power_of_2(R)
    else:
        block_s = min(triton.next_power_of_2(S), tile)
        while block_s > vec and triton.cdiv(S, block_s) * block_s > ROW_WASTE * S:
            block_s //= 2
    rows = C // group
    block_c = min(triton.next_power_of_2(rows), max(1, tile // block_s))
    block_n = min(triton.next_power_of_2(N), max(1, tile // (block_s * block_c)))
    return block_n, block_c, block_s, group, _align(R, itemsize), triton.cdiv(N, block_n) * triton.cdiv(R, block_s)


def _cosine_config(C, S, N, cl, itemsize: int, compute_grad: bool, aligned: bool = True):
    """(num_warps, maxnreg, VEC, per layer (BLOCK_N, BLOCK_C, BLOCK_S, GROUP, ALIGN, C_FULL, programs))
    of a cosine launch. With the gradient, and for channels-last layers, a program holds whole channel
    vectors (:func:`cosine_blocks`); without it, contiguous layers loop over their channels
    (:func:`cosine_row_blocks`, one 16-byte access a thread and tensor a step). ``aligned``: every
    pointer of the launch is 16-byte aligned."""
    layers = list(zip(C, S, N, cl))
    held = [k for k in range(len(C)) if cl[k] or compute_grad]
    warps, per_thread, shapes = ROW_WARPS, 0, []
    if held:
        wide = aligned and any(not cl[k] and _align(S[k], itemsize) == 16 // itemsize for k in held)
        warps, per_thread, shapes = _cosine_layout([layers[k] for k in held], itemsize, compute_grad,
                                       min_warps=ROW_WARPS if len(held) < len(C) else 1, wide=wide)
    held_shape = dict(zip(held, shapes))
    out = []
    for k in range(len(C)):
        if k in held_shape:
            bn, bc, bs = held_shape[k]
            programs = triton.cdiv(N[k] * S[k], bs) if cl[k] else triton.cdiv(N[k], bn) * triton.cdiv(S[k], bs)
            out.append((bn, bc, bs, 1, _align(C[k] if cl[k] else S[k], itemsize), C[k] == bc, programs))
        else:
            bn, bc, bs, group, align, programs = cosine_row_blocks(C[k], S[k], N[k], itemsize,
                                                                   (16 // itemsize) * 32 * warps)
            out.append((bn, bc, bs, group, align, (C[k] // group) % bc == 0, programs))
    # 16 warps: let ptxas use up to 128 registers (by itself it stops at 64 and spills); 8 warps of 32
    # elements a thread: at most 128 (25 % occupancy; by itself it takes 130)
    maxnreg = 128 if warps == 16 or (warps == 8 and per_thread == 32 and compute_grad) else None
    # (the gradient of misaligned maps: 2 16-bit positions a thread, as many as its 32-bit accesses hold)
    return warps, maxnreg, (16 // itemsize if not compute_grad or aligned else 4 if itemsize >= 4 else 2), out


def feature_alignment_loss(student, target, channels_last, kind, scales, per_layer, compute_grad):
    """(loss, flat grad) of fastsd.feature_alignment_loss over already-normalised layers.

    Layer l of the flat gradient holds student[l]'s gradient in its memory order.
    """
    import torch

    _check_inputs("feature_alignment_loss", *student[:1], rows=False)
    L = len(student)
    dtype, device = student[0].dtype, student[0].device
    itemsize = student[0].element_size()
    numels = [s.numel() for s in student]
    grad = torch.empty(sum(numels) if compute_grad else 0, dtype=dtype, device=device)
    layer_sums, partials = [], []
    offset = 0
    for first in range(0, L, MAX_LAYERS):
        layers = range(first, min(L, first + MAX_LAYERS))
        g = []
        for l in layers:
            g.append(grad[offset:offset + numels[l]] if compute_grad else student[l])
            offset += numels[l]
        s_t = tuple(student[l] for l in layers)
        t_t = tuple(target[l] for l in layers)
        sc = tuple(float(scales[l]) for l in layers)
        starts, blocks = [], []
        if kind == "cosine":
            C = tuple(student[l].shape[1] for l in layers)
            N = tuple(student[l].shape[0] for l in layers)
            S = tuple(numels[l] // (C[k] * N[k]) for k, l in enumerate(layers))
            cl = tuple(bool(channels_last[l]) or S[k] == 1 for k, l in enumerate(layers))
            for k, l in enumerate(layers):
                if not cl[k] and C[k] * S[k] > _INT32_MAX:
                    raise ValueError(f"fastsd.kernels.losses.feature_alignment_loss: layer {l} has {C[k] * S[k]} "
                                     f"elements per sample; the cosine kernel indexes a sample with int32")
            aligned = all(t.data_ptr() % 16 == 0 for t in s_t + t_t + tuple(g))  # (meta tensors: 0)
            warps, maxnreg, vec, config = _cosine_config(C, S, N, cl, itemsize, compute_grad, aligned)
            rows = tuple(N[k] * S[k] if cl[k] else N[k] for k in range(len(C)))
            for k in range(len(C)):
                starts.append(sum(blocks))
                blocks.append(config[k][-1])
        else:
            for l in layers:
                starts.append(sum(blocks))
                blocks.append(triton.cdiv(numels[l], FEATURE_BLOCK))
        partial = torch.empty(sum(blocks), dtype=torch.float32, device=device)  # every program writes its own
        if sum(blocks):
            common = dict(NUM_LAYERS=len(layers), COMPUTE_GRAD=bool(compute_grad))
            if kind == "cosine":
                _feature_cosine_kernel[(sum(blocks),)](
                    s_t, t_t, tuple(g), C, S, rows, tuple(starts), tuple(a + b for a, b in zip(starts, blocks)), sc,
                    partial, VEC=vec, CHANNELS_LAST=cl, BLOCK_N=tuple(x[0] for x in config),
                    BLOCK_C=tuple(x[1] for x in config), BLOCK_S=tuple(x[2] for x in config),
                    GROUP=tuple(x[3] for x in config), ALIGN=tuple(x[4] for x in config),
                    C_FULL=tuple(x[5] for x in config),
                    maxnreg=maxnreg, num_warps=warps, **common)
            else:
                _feature_elementwise_kernel[(sum(blocks),)](
                    s_t, t_t, tuple(g), tuple(numels[l] for l in layers), tuple(starts), sc, partial,
                    KIND=KINDS[kind], BLOCK=FEATURE_BLOCK, num_warps=8, **common)
        partials.append(partial)
        for k in range(len(layers)):
            layer_sums.append((partial, starts[k], blocks[k]))
    if per_layer:
        loss = torch.stack([p[s:s + b].sum() for p, s, b in layer_sums])
    else:
        loss = partials[0].sum() if len(partials) == 1 else torch.stack([p.sum() for p in partials]).sum()
    return loss.to(dtype), grad


# --- ahead-of-time compile specs: the variants the launchers pick, as the JIT specialises them ----------

# kernel -> the prefix of its specs' names (the feature kernels' tags start with the kind)
_KERNELS = {"_pair_counts_kernel": "pair_counts", "_pair_stats_kernel": "pair_kd_stats", "_pair_kd_kernel": "pair_kd",
            "_kd_stats_kernel": "kd_stats", "_kd_kernel": "kd", "_feature_elementwise_kernel": "feature",
            "_feature_cosine_kernel": "feature"}
# (B, K): the benchmark's rows (1 and 4 warps), one-block rows at 16 and 32 warps, split rows with few and
# with many rows
AOT_ROWS = ((256, 100), (256, 1000), (256, 3000), (64, MAX_SINGLE_BLOCK), (64, 32768), (512, 32768))
CIFAR_MAPS = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4)]  # the benchmark's
IMAGENET_MAPS = [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
# sizes no vector width divides, ranks 2 (channels contiguous), 3, 4 and 5, large enough to be bandwidth-bound
AWKWARD_MAPS = [(16, 7, 45, 45), (4000, 100), (64, 3, 37 * 5), (8, 6, 9, 10, 10)]
WIDEST_MAPS = [(8, MAX_COSINE_CHANNELS, 7, 7), (64, MAX_COSINE_CHANNELS)]  # the cosine kernel's largest tiles


def _aot_cases():
    """(tag, thunk) per launcher call of the AOT specs: meta tensors (16-byte aligned) at the benchmark's
    shapes for every dtype, gradient on and off, and small CPU tensors one element off alignment."""
    import torch

    out = []
    for dt, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        meta = dict(dtype=dtype, device="meta")
        labels = {B: torch.empty(B, dtype=torch.int64, device="meta") for B, _K in AOT_ROWS}
        for B, K in AOT_ROWS:
            z = torch.empty(B, K, **meta)
            for grad in (False, True):
                tag = f"{dt}_{B}x{K}{'_grad' if grad else ''}"
                y = labels[B]
                out.append((tag, lambda z=z, y=y, g=grad: pair_kd_loss(z, y, y, 4.0, 1.0, 1.0, not g, -100, g)))
                out.append((tag, lambda z=z, g=grad: kd_loss(z, z, 4.0, 1.0, 1.0, False, g)))
        # rows of 37 logits starting one element past a 16-byte boundary
        z = torch.empty(5 * 37 + 1, dtype=dtype)[1:].view(5, 37)
        y = torch.zeros(5, dtype=torch.int64)
        out.append((f"{dt}_unaligned", lambda z=z, y=y: pair_kd_loss(z, y, y, 4.0, 1.0, 1.0, False, -100, True)))
        for B, K in ((256, 1000), (64, 32768)):  # the index checks compiled in (CUDA tensors)
            z, y = torch.empty(B, K, **meta), labels[B]
            out.append((f"{dt}_{B}x{K}_checked", lambda z=z, y=y: pair_kd_loss(z, y, y, 4.0, 1.0, 1.0, False, -100,
                                                                                True, check_indices=True)))
        out.append((f"{dt}_unaligned", lambda z=z: kd_loss(z, z, 4.0, 1.0, 1.0, False, True)))
        for name, maps in (("cifar", CIFAR_MAPS), ("imagenet", IMAGENET_MAPS)):
            for kind in KINDS:
                for cl in ((False, True) if kind == "cosine" else (False,)):
                    x = [torch.empty(shape, **meta) for shape in maps]
                    if cl:
                        x = [t.contiguous(memory_format=torch.channels_last) for t in x]
                    for grad in ((False, True) if kind in ("mse", "cosine") else (True,)):
                        tag = f"{kind}_{'cl_' if cl else ''}{dt}_{name}{'_grad' if grad else ''}"
                        out.append((tag, lambda x=x, k=kind, c=cl, g=grad: feature_alignment_loss(
                            x, x, [c] * len(x), k, [1.0] * len(x), False, g)))
        x = [torch.empty(math.prod(shape) + 1, dtype=dtype, device="meta")[1:].view(shape) for shape in AWKWARD_MAPS]
        for kind in ("mse", "cosine"):
            out.append((f"{kind}_{dt}_unaligned_grad", lambda x=x, k=kind: feature_alignment_loss(
                x, x, [False] * len(x), k, [1.0] * len(x), False, True)))
        for shape in WIDEST_MAPS:
            x = [torch.empty(shape, **meta)]
            out.append((f"cosine_{dt}_{shape[1]}_channels_rank{len(shape)}_grad", lambda x=x: feature_alignment_loss(
                x, x, [False], "cosine", [1.0], False, True)))
    return out


__getattr__ = _aot.lazy_specs(__name__, _KERNELS, _aot_cases)  # AOT_SPECS, built on first use
