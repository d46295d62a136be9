"""Triton kernels of the fused distillation losses (SPEC section 4; formulas in csrc/losses.cpp).

* ``_pair_kd_kernel``: one program per row i; the pair (i, partner[i]) is handled by its lower
  index, which reads both rows and writes both gradient rows, so every logit is read once. A row
  that fits one block (K <= ``MAX_SINGLE_BLOCK``) is loaded once; longer rows take two passes (online
  max/sum, then loss and gradient), reading the logits twice. Both forms run the same per-block
  helpers (``_pair_block_stats``, ``_pair_block_kd``). A row with an ignored label is not read (its
  gradient is 0, its partner a singleton), and terms a row does not have (CE of an ignored row, KD
  of a teacher) are selected out, never multiplied by 0, so NaN / Inf do not leak into them.
* ``_kd_kernel``: the same for a student row and a teacher row (per-block helper ``_kd_block``).
* ``_feature_elementwise_kernel`` / ``_feature_cosine_kernel``: every layer of a call in one launch.
  The layers' pointers, sizes and first program index are tuples of kernel arguments (no table to
  copy to the device): program ``pid`` belongs to the layer whose range of programs holds it
  (a static loop over the layers with one runtime branch taken). Each program writes its partial
  loss; the host sums them with torch (a fixed order: deterministic, no atomics).

Everything is computed in float32 (loads are converted at once, which also sidesteps the
interpreter's bf16 arithmetic); losses and gradients are stored in the input's dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_SINGLE_BLOCK = 8192  # longest row of logits kept in registers in one pass
LOOP_BLOCK = 4096  # block of the two-pass loop over longer rows
FEATURE_BLOCK = 4096  # elements per program of the elementwise feature kernel
COSINE_TILE = 4096  # positions x channels per program of the cosine kernel
MAX_COSINE_CHANNELS = 16384  # one program holds a whole channel vector
MAX_LAYERS = 8  # layers per launch (more are split into launches of 8)

KINDS = {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3}
COSINE_EPS = 1e-8


@triton.jit
def _pair_counts_kernel(labels_ptr, partner_ptr, counts_ptr, B, ignore_index, BLOCK: tl.constexpr):
    """counts[0] = number of rows with a label, counts[1] = number of rows in a pair (2 x pairs)."""
    valid = tl.zeros([BLOCK], dtype=tl.float32)
    paired = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < B
        y = tl.load(labels_ptr + offs, mask=m, other=ignore_index)
        p = tl.load(partner_ptr + offs, mask=m, other=0)
        yp = tl.load(labels_ptr + p, mask=m, other=ignore_index)
        v = m & (y != ignore_index)
        valid += v.to(tl.float32)
        paired += (v & (yp != ignore_index) & (p != offs)).to(tl.float32)
    tl.store(counts_ptr, tl.sum(valid, 0))
    tl.store(counts_ptr + 1, tl.sum(paired, 0))


@triton.jit
def _online(m, s1, st, z, inv_t):
    """Fold a block z (masked entries -inf) into a running max m and sums exp(z - m), exp((z - m) / T)."""
    m_new = tl.maximum(m, tl.max(z, 0))
    s1 = s1 * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
    st = st * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp((z - m_new) * inv_t), 0)
    return m_new, s1, st


@triton.jit
def _safe_log(s):
    # A row that was not read (masked out) has sum exactly 0; log 1 keeps its unused statistics
    # finite. Only that case: a NaN or +inf sum (NaN / inf logits) must propagate as in torch.
    return tl.log(tl.where(s == 0.0, 1.0, s))


@triton.jit
def _load_rows(row_i, row_j, offs, K, read_i, read_j):
    """A block of two rows in float32; the entries past K, and all of a row not read, are -inf."""
    zi = tl.load(row_i + offs, mask=(offs < K) & read_i, other=float("-inf")).to(tl.float32)
    zj = tl.load(row_j + offs, mask=(offs < K) & read_j, other=float("-inf")).to(tl.float32)
    return zi, zj


@triton.jit
def _pair_block_stats(row_i, row_j, offs, K, read_i, read_j, yi, yj, mi, s1i, sti, mj, s1j, stj, zyi, zyj, inv_t):
    """Load a block of both rows and fold it into their statistics and z[y]."""
    zi, zj = _load_rows(row_i, row_j, offs, K, read_i, read_j)
    mi, s1i, sti = _online(mi, s1i, sti, zi, inv_t)
    mj, s1j, stj = _online(mj, s1j, stj, zj, inv_t)
    zyi += tl.sum(tl.where(offs == yi, zi, 0.0), 0)
    zyj += tl.sum(tl.where(offs == yj, zj, 0.0), 0)
    return zi, zj, mi, s1i, sti, mj, s1j, stj, zyi, zyj


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
def _pair_kd_kernel(logits_ptr, labels_ptr, partner_ptr, counts_ptr, loss_ptr, grad_ptr,
                    K, stride_row, temperature, kd_weight, ce_weight, ignore_index,
                    SYMMETRIC: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                    SINGLE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    j = tl.load(partner_ptr + i).to(tl.int64)
    lead = j >= i  # the pair belongs to its lower index
    has_j = lead & (j != i)
    yi = tl.load(labels_ptr + i).to(tl.int64)
    yj = tl.load(labels_ptr + j).to(tl.int64)
    # A row with an ignored label has no term: it is not read and its gradient is 0 (its partner is
    # then a singleton).
    vi = lead & (yi != ignore_index)
    vj = has_j & (yj != ignore_index)
    pair_on = vi & vj
    ce_scale = ce_weight / tl.maximum(tl.load(counts_ptr), 1.0)
    n_pairs = tl.maximum(tl.load(counts_ptr + 1) * 0.5, 1.0)
    inv_t = 1.0 / temperature
    row_i = logits_ptr + i * stride_row
    row_j = logits_ptr + j * stride_row
    grad_i = grad_ptr + i * K
    grad_j = grad_ptr + j * K

    # Pass 1: max, sums at temperature 1 and T, and z[y] of both rows.
    if SINGLE:
        offs = tl.arange(0, BLOCK)
        zi, zj, mi, s1i, sti, mj, s1j, stj, zyi, zyj = _pair_block_stats(
            row_i, row_j, offs, K, vi, vj, yi, yj, -1e30, 0.0, 0.0, -1e30, 0.0, 0.0, 0.0, 0.0, inv_t)
    else:
        mi = -1e30
        s1i = 0.0
        sti = 0.0
        mj = -1e30
        s1j = 0.0
        stj = 0.0
        zyi = 0.0
        zyj = 0.0
        for start in range(0, tl.where(vi | vj, K, 0), BLOCK):
            _zi, _zj, mi, s1i, sti, mj, s1j, stj, zyi, zyj = _pair_block_stats(
                row_i, row_j, start + tl.arange(0, BLOCK), K, vi, vj, yi, yj, mi, s1i, sti, mj, s1j, stj, zyi, zyj,
                inv_t)
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
        for start in range(0, tl.where(lead & (pair_on | COMPUTE_GRAD), K, 0), BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zi, zj = _load_rows(row_i, row_j, offs, K, vi, vj)
            dkl_i, dkl_j = _pair_block_kd(zi, zj, offs, K, pair_on, yi, yj, mi, mj, s1i, s1j, lsti, lstj, inv_t,
                                          vi, vj, kd_i, kd_j, ce_scale, kd_grad_scale, grad_i, grad_j, lead, has_j,
                                          COMPUTE_GRAD)
            kl_i += dkl_i
            kl_j += dkl_j
    kd = tl.where(kd_i, w * kl_i, 0.0) + tl.where(kd_j, w * kl_j, 0.0)
    tl.store(loss_ptr + i, ce_scale * ce_loss + kd_weight * temperature * temperature / n_pairs * kd)


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
def _kd_kernel(student_ptr, teacher_ptr, loss_ptr, grad_ptr, K, stride_s, stride_t, temperature,
               grad_scale, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """loss[i] = KL(softmax(t_i / T) || softmax(s_i / T)); grad[i] = grad_scale * (q_i - p_i)."""
    i = tl.program_id(0).to(tl.int64)
    row_s = student_ptr + i * stride_s
    row_t = teacher_ptr + i * stride_t
    row_g = grad_ptr + i * K
    inv_t = 1.0 / temperature
    if SINGLE:
        offs = tl.arange(0, BLOCK)
        zs, zt = _load_rows(row_s, row_t, offs, K, True, True)
        ms, _s1s, sts = _online(-1e30, 0.0, 0.0, zs, inv_t)
        mt, _s1t, stt = _online(-1e30, 0.0, 0.0, zt, inv_t)
        kl = _kd_block(zs, zt, offs, K, ms, mt, _safe_log(sts), _safe_log(stt), inv_t, grad_scale, row_g,
                       COMPUTE_GRAD)
    else:
        ms = -1e30
        s1s = 0.0
        sts = 0.0
        mt = -1e30
        s1t = 0.0
        stt = 0.0
        for start in range(0, K, BLOCK):
            zs, zt = _load_rows(row_s, row_t, start + tl.arange(0, BLOCK), K, True, True)
            ms, s1s, sts = _online(ms, s1s, sts, zs, inv_t)
            mt, s1t, stt = _online(mt, s1t, stt, zt, inv_t)
        lsts = _safe_log(sts)
        lstt = _safe_log(stt)
        kl = 0.0
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            zs, zt = _load_rows(row_s, row_t, offs, K, True, True)
            kl += _kd_block(zs, zt, offs, K, ms, mt, lsts, lstt, inv_t, grad_scale, row_g, COMPUTE_GRAD)
    tl.store(loss_ptr + i, kl)


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
            offs = (pid - start).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            s = tl.load(students[l] + offs, mask=m, other=0.0).to(tl.float32)
            t = tl.load(targets[l] + offs, mask=m, other=0.0).to(tl.float32)
            d = s - t
            sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            if KIND == 0:
                e = d * d
                g = 2.0 * d
            elif KIND == 1:
                e = tl.abs(d)
                g = sign
            else:
                small = tl.abs(d) < 1.0
                e = tl.where(small, 0.5 * d * d, tl.abs(d) - 0.5)
                # clamp(d, -1, 1), which keeps a NaN d (as torch's smooth_l1 backward does)
                g = tl.where(d > 1.0, 1.0, tl.where(d < -1.0, -1.0, d))
            tl.store(partial_ptr + pid, scales[l] * tl.sum(e, 0))
            if COMPUTE_GRAD:
                tl.store(grads[l] + offs, (scales[l] * g).to(grads[l].dtype.element_ty), mask=m)


@triton.jit
def _feature_cosine_kernel(students, targets, grads, positions, channels, spatial, stride_c, stride_s,
                           starts, scales, partial_ptr, NUM_LAYERS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """1 - cos(student, target) along dim 1 at every position (n, *spatial), every layer in one launch.

    Element (n, c, s) of layer l lies at ``n * C * S + c * stride_c + s * stride_s``: (S, 1) for
    contiguous maps, (1, C) for channels-last ones. A program holds BLOCK_P[l] whole channel vectors.
    """
    pid = tl.program_id(0)
    for l in tl.static_range(NUM_LAYERS):
        start = starts[l]
        P = positions[l]
        if (pid >= start) & (pid < start + tl.cdiv(P, BLOCK_P[l])):
            C = channels[l]
            S = spatial[l]
            q = (pid - start).to(tl.int64) * BLOCK_P[l] + tl.arange(0, BLOCK_P[l])
            c = tl.arange(0, BLOCK_C[l]).to(tl.int64)
            n = q // S
            base = n * C * S + (q - n * S) * stride_s[l]
            offs = base[:, None] + c[None, :] * stride_c[l]
            in_q = q < P
            m = in_q[:, None] & (c < C)[None, :]
            x = tl.load(students[l] + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.load(targets[l] + offs, mask=m, other=0.0).to(tl.float32)
            dot = tl.sum(x * y, 1)
            nx = tl.sqrt(tl.sum(x * x, 1))
            ny = tl.sqrt(tl.sum(y * y, 1))
            # max(n, eps) that keeps NaN (tl.maximum would drop it)
            axy = tl.where(nx < 1e-8, 1e-8, nx) * tl.where(ny < 1e-8, 1e-8, ny)
            cos = dot / axy
            tl.store(partial_ptr + pid, scales[l] * tl.sum(tl.where(in_q, 1.0 - cos, 0.0), 0))
            if COMPUTE_GRAD:
                # d(1 - cos)/dx = -y / (|x| |y|) + [|x| > eps] cos x / |x|^2  (eps-clamped norms)
                ky = -scales[l] / axy
                kx = tl.where(nx > 1e-8, scales[l] * cos / (nx * nx), 0.0)
                g = ky[:, None] * y + kx[:, None] * x
                tl.store(grads[l] + offs, g.to(grads[l].dtype.element_ty), mask=m)


# --- launchers --------------------------------------------------------------------------------


def _row_block(K: int):
    """(BLOCK, SINGLE, num_warps) for rows of K logits."""
    if K <= MAX_SINGLE_BLOCK:
        block = max(16, triton.next_power_of_2(K))
        return block, True, 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return LOOP_BLOCK, False, 8


def pair_kd_loss(logits, labels, partner, temperature, kd_weight, ce_weight, symmetric, ignore_index, compute_grad):
    """(loss, grad) of fastsd.pair_kd_loss; logits contiguous rows, labels/partner int64 [B]."""
    import torch

    B, K = logits.shape
    counts = torch.empty(2, dtype=torch.float32, device=logits.device)
    _pair_counts_kernel[(1,)](labels, partner, counts, B, ignore_index,
                              BLOCK=min(1024, max(16, triton.next_power_of_2(B))))
    rows = torch.empty(B, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    block, single, warps = _row_block(K)
    _pair_kd_kernel[(B,)](logits, labels, partner, counts, rows, grad if compute_grad else logits,
                          K, logits.stride(0), float(temperature), float(kd_weight), float(ce_weight),
                          int(ignore_index), SYMMETRIC=bool(symmetric), COMPUTE_GRAD=bool(compute_grad),
                          BLOCK=block, SINGLE=single, num_warps=warps)
    return rows.sum().to(logits.dtype), grad


def kd_loss(student, teacher, temperature, loss_scale, grad_scale, per_row, compute_grad):
    """(loss, grad) of fastsd.kd_loss: loss = loss_scale * KL rows (summed unless per_row)."""
    import torch

    B, K = student.shape
    rows = torch.empty(B, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    block, single, warps = _row_block(K)
    _kd_kernel[(B,)](student, teacher, rows, grad if compute_grad else student, K, student.stride(0),
                     teacher.stride(0), float(temperature), float(grad_scale), COMPUTE_GRAD=bool(compute_grad),
                     BLOCK=block, SINGLE=single, num_warps=warps)
    loss = rows * loss_scale if per_row else rows.sum() * loss_scale
    return loss.to(student.dtype), grad


def cosine_blocks(C: int):
    """(BLOCK_C, BLOCK_P) of the cosine kernel for C channels."""
    block_c = max(16, triton.next_power_of_2(C))
    return block_c, max(1, COSINE_TILE // block_c)


def feature_alignment_loss(student, target, channels_last, kind, scales, per_layer, compute_grad):
    """(loss, flat grad) of fastsd.feature_alignment_loss over already-normalised layers.

    Layer l of the flat gradient holds student[l]'s gradient in its memory order.
    """
    import torch

    L = len(student)
    dtype, device = student[0].dtype, student[0].device
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
        starts, blocks = [], []
        if kind == "cosine":
            shape = [cosine_blocks(student[l].shape[1]) for l in layers]
            for l, (_bc, bp) in zip(layers, shape):
                pos = numels[l] // max(student[l].shape[1], 1)
                starts.append(sum(blocks))
                blocks.append(triton.cdiv(pos, bp))
        else:
            for l in layers:
                starts.append(sum(blocks))
                blocks.append(triton.cdiv(numels[l], FEATURE_BLOCK))
        partial = torch.empty(sum(blocks), dtype=torch.float32, device=device)  # every program writes its own
        if sum(blocks):
            common = dict(NUM_LAYERS=len(layers), COMPUTE_GRAD=bool(compute_grad))
            s_t = tuple(student[l] for l in layers)
            t_t = tuple(target[l] for l in layers)
            sc = tuple(float(scales[l]) for l in layers)
            if kind == "cosine":
                C = tuple(student[l].shape[1] for l in layers)
                S = tuple(numels[l] // max(C[k] * student[l].shape[0], 1) for k, l in enumerate(layers))
                P = tuple(numels[l] // max(C[k], 1) for k, l in enumerate(layers))
                cl = [bool(channels_last[l]) for l in layers]
                _feature_cosine_kernel[(sum(blocks),)](
                    s_t, t_t, tuple(g), P, C, S, tuple(1 if x else s for x, s in zip(cl, S)),
                    tuple(c if x else 1 for x, c in zip(cl, C)), tuple(starts), sc, partial,
                    BLOCK_C=tuple(b for b, _ in shape), BLOCK_P=tuple(p for _, p in shape), num_warps=8, **common)
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


# --- ahead-of-time compile specs (every kernel and dtype variant the launchers use) -------------

def _aot_specs():
    """Per dtype: both row-kernel forms (one block / two passes) with and without the gradient
    (the symmetric flag alternating), every feature kind with the gradient and one without;
    plus the largest one-block row (register pressure) and the counts kernel."""
    pair_sig = {"logits_ptr": "*{dt}", "labels_ptr": "*i64", "partner_ptr": "*i64", "counts_ptr": "*fp32",
                "loss_ptr": "*fp32", "grad_ptr": "*{dt}", "K": "i32", "stride_row": "i32", "temperature": "fp32",
                "kd_weight": "fp32", "ce_weight": "fp32", "ignore_index": "i32", "SYMMETRIC": "constexpr",
                "COMPUTE_GRAD": "constexpr", "BLOCK": "constexpr", "SINGLE": "constexpr"}
    kd_sig = {"student_ptr": "*{dt}", "teacher_ptr": "*{dt}", "loss_ptr": "*fp32", "grad_ptr": "*{dt}", "K": "i32",
              "stride_s": "i32", "stride_t": "i32", "temperature": "fp32", "grad_scale": "fp32",
              "COMPUTE_GRAD": "constexpr", "BLOCK": "constexpr", "SINGLE": "constexpr"}

    def sig(template, dt):
        return {k: v.format(dt=dt) for k, v in template.items()}

    specs = [{"name": "pair_counts", "fn": _pair_counts_kernel,
              "signature": {"labels_ptr": "*i64", "partner_ptr": "*i64", "counts_ptr": "*fp32", "B": "i32",
                            "ignore_index": "i32", "BLOCK": "constexpr"},
              "constexprs": {"BLOCK": 1024}}]
    rows = [(dt, block, single, grad) for dt in ("fp32", "fp16", "bf16")
            for block, single in ((1024, True), (LOOP_BLOCK, False)) for grad in (False, True)]
    rows.append(("fp32", MAX_SINGLE_BLOCK, True, True))
    for dt, block, single, grad in rows:
        warps = _row_block(block if single else MAX_SINGLE_BLOCK + 1)[2]
        tag = f"{dt}_b{block}{'' if single else '_loop'}{'_grad' if grad else ''}"
        specs.append({"name": f"pair_kd_{tag}", "fn": _pair_kd_kernel, "signature": sig(pair_sig, dt),
                      "constexprs": {"SYMMETRIC": not grad, "COMPUTE_GRAD": grad, "BLOCK": block, "SINGLE": single},
                      "options": {"num_warps": warps}})
        specs.append({"name": f"kd_{tag}", "fn": _kd_kernel, "signature": sig(kd_sig, dt),
                      "constexprs": {"COMPUTE_GRAD": grad, "BLOCK": block, "SINGLE": single},
                      "options": {"num_warps": warps}})
    for dt in ("fp32", "fp16", "bf16"):
        # Four layers (a ResNet's); other layer counts differ only in the unrolled loop.
        ptrs, ints, floats = (f"*{dt}",) * 4, ("i32",) * 4, ("fp32",) * 4
        for kind, code in KINDS.items():
            for grad in ((False, True) if kind in ("mse", "cosine") else (True,)):
                name = f"feature_{kind}_{dt}{'_grad' if grad else ''}"
                if kind == "cosine":
                    specs.append({
                        "name": name, "fn": _feature_cosine_kernel,
                        "signature": {"students": ptrs, "targets": ptrs, "grads": ptrs, "positions": ints,
                                      "channels": ints, "spatial": ints, "stride_c": ints, "stride_s": ints,
                                      "starts": ints, "scales": floats, "partial_ptr": "*fp32",
                                      "NUM_LAYERS": "constexpr", "COMPUTE_GRAD": "constexpr",
                                      "BLOCK_C": "constexpr", "BLOCK_P": "constexpr"},
                        "constexprs": {"NUM_LAYERS": 4, "COMPUTE_GRAD": grad,
                                       "BLOCK_C": tuple(cosine_blocks(c)[0] for c in (64, 128, 256, 2048)),
                                       "BLOCK_P": tuple(cosine_blocks(c)[1] for c in (64, 128, 256, 2048))},
                        "options": {"num_warps": 8}})
                else:
                    specs.append({
                        "name": name, "fn": _feature_elementwise_kernel,
                        "signature": {"students": ptrs, "targets": ptrs, "grads": ptrs, "numels": ints,
                                      "starts": ints, "scales": floats, "partial_ptr": "*fp32",
                                      "NUM_LAYERS": "constexpr", "KIND": "constexpr", "COMPUTE_GRAD": "constexpr",
                                      "BLOCK": "constexpr"},
                        "constexprs": {"NUM_LAYERS": 4, "KIND": code, "COMPUTE_GRAD": grad, "BLOCK": FEATURE_BLOCK},
                        "options": {"num_warps": 8}})
    return specs


AOT_SPECS = _aot_specs()
