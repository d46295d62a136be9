"""Triton kernels of intra-class pairing and cell masks (SPEC sections 1-2; issue 12).

Both reproduce fastsd/reference/pairing.py bit for bit from the same random draws (the caller's
``torch.randperm`` and ``torch.rand``), in one launch each: the pairing after the reference's gather
and stable sort, in place of its 11 other ops; the masks in place of its 7 (9 when prob < 1).

**Pairing** (:func:`pair_by_label`), given ``sorted_labels, by_label = sort(labels[order],
stable=True)``: the sorted position i holds sample ``order[by_label[i]]``; its rank in its class
segment is ``r = i - start``, with start the segment's first position (a lower-bound binary search
of the sorted labels, what ``searchsorted`` gives). Rank r pairs with rank ``r ^ 1``: position i - 1
for odd r, i + 1 for even r where that position holds the same label, else i itself (the last
member of an odd class, a singleton). Each sample's partner slot is written once, by its own
position: no atomics, deterministic.

**Masks** (:func:`cell_mask`): the reference's ``argsort(noise[leader, :cells], stable=True) < k``
is a permutation test: with ``r_i`` the rank of cell i in its row (ties by index, as the stable
sort), the mask is ``(i < k)`` at position ``r_i``. The rank is an all-pairs count,
``r_i = #{j : n_j < n_i or (n_j == n_i and j < i)}``, tiled [TI, TJ] in registers: O(cells^2)
compares, which the launcher takes up to :data:`MAX_CELLS` cells (a 32 x 32 grid; the default grids
have 16-64 cells); the caller falls back to the reference past that. Each row reads its pair
leader's noise (the lower index) and writes its own row once (any permutation, as the reference;
singletons and inactive pairs compare nothing and write zeros).

Indices: partner, order and the labels are [B] (int32 offsets); noise and mask rows are at
``b * row`` in int64 (B * cells may pass 2**31 at full resolution).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _aot

# The per-launch integers: never specialised (no variant per batch size or grid).
_PAIR_ARGS = ("n", "steps")
_MASK_ARGS = ("cells", "k")

MAX_CELLS = 1024  # all-pairs ranks up to here: ~1M compares a leader row
NUM_WARPS = 4
_PAIR_BLOCK = 256
_TI, _TJ = 128, 32  # a [TI, TJ] tile of compares: 32 a thread at 4 warps


@triton.jit(do_not_specialize=_PAIR_ARGS)
def _pair_kernel(
    sorted_ptr,  # [n] labels[order] sorted (stable), any integer dtype
    by_label_ptr,  # int64 [n]: the sort's indices
    order_ptr,  # int64 [n]: the random permutation
    partner_ptr,  # int64 [n] out
    n,
    steps,  # n.bit_length(): iterations of the binary search over [0, i]
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    label = tl.load(sorted_ptr + i, mask=valid)
    # lower bound of label in sorted[0 : i + 1] (label is at i): the class segment's start
    lo = tl.zeros_like(i)
    hi = i
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) >> 1
        below = tl.load(sorted_ptr + mid, mask=valid & active) < label
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & (below == 0), mid, hi)
    nxt = i + 1
    same_next = tl.load(sorted_ptr + nxt, mask=valid & (nxt < n)) == label
    odd = ((i - lo) & 1) != 0
    pos = tl.where(odd, i - 1, tl.where(same_next & (nxt < n), nxt, i))
    me = tl.load(order_ptr + tl.load(by_label_ptr + i, mask=valid), mask=valid)
    other = tl.load(order_ptr + tl.load(by_label_ptr + pos, mask=valid), mask=valid)
    tl.store(partner_ptr + me, other, mask=valid)


@triton.jit(do_not_specialize=_MASK_ARGS)
def _mask_kernel(
    partner_ptr,  # int64 [B]: a permutation
    noise_ptr,  # float32/64 [B, cells + 1]: cell keys, then the activation draw (row of the pair's leader)
    mask_ptr,  # bool [B, cells] out
    cells,
    k,  # cells to swap in an active pair
    prob: tl.float64,  # exact (a Python float); compared in noise's dtype, below
    TI: tl.constexpr,
    TJ: tl.constexpr,
):
    b = tl.program_id(0)
    partner = tl.load(partner_ptr + b)
    leader = tl.minimum(partner, tl.cast(b, tl.int64))
    noise_row = noise_ptr + leader * (tl.cast(cells, tl.int64) + 1)
    draw = tl.load(noise_row + cells)
    # torch compares a tensor with a Python float in the tensor's dtype: prob rounded to it (0.7 rounds
    # down in float32, so a float32 draw equal to it is not below it)
    active = (partner != b) & (draw < tl.cast(prob, draw.dtype))
    i = tl.program_id(1) * TI + tl.arange(0, TI)
    in_row = i < cells
    key = tl.load(noise_row + i, mask=in_row & active, other=0.0)
    rank = tl.zeros([TI], dtype=tl.int32)
    for j0 in range(0, tl.where(active, cells, 0), TJ):  # no compares for singletons and inactive pairs
        j = j0 + tl.arange(0, TJ)
        other = tl.load(noise_row + j, mask=j < cells, other=2.0)  # past the row: after every key
        before = (other[None, :] < key[:, None]) | ((other[None, :] == key[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
    # an inactive row is all false: written unpermuted
    pos = tl.where(active, rank, i)
    tl.store(mask_ptr + tl.cast(b, tl.int64) * cells + pos, (i < k) & active, mask=in_row)


def pair_by_label(sorted_labels: torch.Tensor, by_label: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """partner (int64 [n]) of each sample, from ``sorted_labels, by_label = sort(labels[order], stable=True)``."""
    n = order.shape[0]
    partner = torch.empty_like(order)
    if n:
        _pair_kernel[(triton.cdiv(n, _PAIR_BLOCK),)](sorted_labels, by_label, order, partner, n, n.bit_length(),
                                                     BLOCK=_PAIR_BLOCK, num_warps=NUM_WARPS)
    return partner


MASK_DTYPES = (torch.float32, torch.float64)


def cell_mask(partner: torch.Tensor, noise: torch.Tensor, gh: int, gw: int, k: int, prob: float) -> torch.Tensor:
    """bool [B, gh, gw] masks from ``noise`` (float32/float64 [B, gh * gw + 1], at most MAX_CELLS cells)."""
    B, cells = partner.shape[0], gh * gw
    mask = torch.empty(B, gh, gw, dtype=torch.bool, device=partner.device)
    if B:
        ti = min(_TI, triton.next_power_of_2(cells))
        tj = min(_TJ, triton.next_power_of_2(cells))
        _mask_kernel[(B, triton.cdiv(cells, ti))](partner, noise, mask, cells, k, float(prob),
                                                  TI=ti, TJ=tj, num_warps=NUM_WARPS)
    return mask


# --- ahead-of-time compile specs: the variants the launchers pick, as the JIT specialises them ----------

_KERNELS = {"_pair_kernel": "pairing", "_mask_kernel": "pair_mask"}


def _aot_cases():
    """(tag, thunk) per launcher call: meta tensors (16-byte aligned) at the benchmark's batch and the
    grids the defaults give (CIFAR 8 x 8, ImageNet 7 x 7), 1 x 1, and the largest the kernel takes."""
    meta = dict(device="meta")
    out = []
    for dtype, tag in ((torch.int64, "i64"), (torch.int32, "i32")):
        n = 256
        out.append((f"{tag}_{n}", lambda d=dtype, n=n: pair_by_label(
            torch.empty(n, dtype=d, **meta), torch.empty(n, dtype=torch.int64, **meta),
            torch.empty(n, dtype=torch.int64, **meta))))
    for noise_dtype, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        for gh, gw in ((8, 8), (7, 7), (1, 1), (32, 32)):
            B, cells = 256, gh * gw
            out.append((f"{tag}_{gh}x{gw}", lambda B=B, gh=gh, gw=gw, c=cells, d=noise_dtype: cell_mask(
                torch.empty(B, dtype=torch.int64, **meta), torch.empty(B, c + 1, dtype=d, **meta), gh, gw, c // 2, 0.5)))
    return out


__getattr__ = _aot.lazy_specs(__name__, _KERNELS, _aot_cases)  # AOT_SPECS, built on first use
