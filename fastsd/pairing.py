"""Intra-class pairing and swap masks (SPEC sections 1-3).

Everything here runs on the labels' / partner's device with no host synchronisation: random keys,
sorts, cumulative maxima and comparisons only (no ``.item()``, no Python loop over classes).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _validate as V
from .patch_swap import check_permutation, patch_swap


def intra_class_pairs(labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pair each sample with a random member of its class.

    Returns ``partner`` (int64 ``[B]``, on labels' device) with ``partner[partner[i]] == i`` and
    ``labels[partner[i]] == labels[i]``. Inside each class of n members, floor(n/2) disjoint pairs
    are drawn uniformly at random; when n is odd one member is its own partner (a singleton).

    How: one uniform key per sample, a sort by (label, key), then positions 2k and 2k+1 of each
    class segment are paired. The same generator state gives the same result.
    """
    fn = "fastsd.intra_class_pairs"
    V.tensor(fn, "labels", labels, ndim=1, dtypes=V.INT_DTYPES, what="[B] of class indices")
    generator = V.generator(fn, generator, labels.device)
    n = labels.shape[0]
    device = labels.device
    idx = torch.arange(n, device=device)
    if n == 0:
        return idx
    keys = torch.rand(n, generator=generator, device=device)
    order = torch.argsort(keys)
    order = order[torch.argsort(labels[order], stable=True)]  # by label, then by random key
    sorted_labels = labels[order]
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    segment_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    rank = idx - segment_start  # position inside the class segment
    next_same = torch.zeros(n, dtype=torch.bool, device=device)
    next_same[:-1] = ~starts[1:]
    even = rank % 2 == 0
    partner_pos = torch.where(even, torch.where(next_same, idx + 1, idx), idx - 1)
    partner = torch.empty_like(order)
    partner[order] = order[partner_pos]
    return partner


def _pair_leader(partner: torch.Tensor) -> torch.Tensor:
    """The lower index of each pair: both members use the leader's random draws."""
    return torch.minimum(partner, torch.arange(partner.shape[0], device=partner.device))


def _check_partner(fn: str, partner) -> torch.Tensor:
    V.tensor(fn, "partner", partner, ndim=1, dtypes=V.INT_DTYPES, what="[B]")
    partner = partner.long()
    check_permutation(fn, partner)
    return partner


def _active_pairs(partner, leader, prob, generator) -> torch.Tensor:
    draw = torch.rand(partner.shape[0], generator=generator, device=partner.device)
    is_pair = partner != torch.arange(partner.shape[0], device=partner.device)
    return (draw[leader] < prob) & is_pair


def patch_swap_mask(
    partner: torch.Tensor,
    grid: Sequence[int],
    ratio: float = 0.5,
    prob: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Cell masks for :func:`patch_swap`: bool ``[B, gh, gw]``.

    Each pair (i, partner[i]) is active with probability ``prob``; an active pair swaps exactly
    ``k = round(ratio * gh * gw)`` cells (Python's ``round``: halves go to the even integer)
    chosen uniformly at random. Both members get the same mask; singletons get an all-false mask.
    """
    fn = "fastsd.patch_swap_mask"
    partner = _check_partner(fn, partner)
    gh, gw = V.positive_int_pair(fn, "grid", grid)
    ratio = V.unit_interval(fn, "ratio", ratio)
    prob = V.unit_interval(fn, "prob", prob)
    generator = V.generator(fn, generator, partner.device)
    B, cells = partner.shape[0], gh * gw
    k = round(ratio * cells)
    leader = _pair_leader(partner)
    noise = torch.rand(B, cells, generator=generator, device=partner.device)[leader]
    # rank of each cell's noise within its row; the k lowest ranks are swapped (exactly k cells)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    active = _active_pairs(partner, leader, prob, generator)
    return ((rank < k) & active[:, None]).view(B, gh, gw)


def box_mask(
    partner: torch.Tensor,
    size: Sequence[int],
    area: Tuple[float, float] = (0.25, 0.5),
    prob: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One random rectangle per active pair: bool ``[B, H, W]`` (a full-resolution cell mask).

    The rectangle covers a fraction ``a ~ U(area)`` of the image with the image's aspect ratio:
    ``h = round(H * sqrt(a))``, ``w = round(W * sqrt(a))`` (each at least 1), its top-left corner
    uniform over the positions where it fits whole (never clipped). Both members of a pair share
    it; singletons and inactive pairs get an all-false mask.
    """
    fn = "fastsd.box_mask"
    partner = _check_partner(fn, partner)
    H, W = V.positive_int_pair(fn, "size", size)
    if (
        not isinstance(area, (tuple, list))
        or len(area) != 2
        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in area)
    ):
        raise TypeError(f"{fn}: area must be a pair (lo, hi) of numbers in [0, 1], got {area!r}")
    lo, hi = (V.unit_interval(fn, "area", a) for a in area)
    if lo > hi:
        raise ValueError(f"{fn}: area must satisfy lo <= hi, got {tuple(area)}")
    prob = V.unit_interval(fn, "prob", prob)
    generator = V.generator(fn, generator, partner.device)
    B, device = partner.shape[0], partner.device
    leader = _pair_leader(partner)
    u = torch.rand(B, 3, generator=generator, device=device, dtype=torch.float64)[leader]
    side = torch.sqrt(lo + (hi - lo) * u[:, 0])
    h = torch.round(H * side).long().clamp(1, H)
    w = torch.round(W * side).long().clamp(1, W)
    top = torch.floor(u[:, 1] * (H - h + 1)).long().clamp(max=H - 1)
    left = torch.floor(u[:, 2] * (W - w + 1)).long().clamp(max=W - 1)
    active = _active_pairs(partner, leader, prob, generator)
    rows = torch.arange(H, device=device)[None, :]
    cols = torch.arange(W, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :] & active[:, None, None]


def default_patch_size(height: int, width: int) -> Tuple[int, int]:
    """Default cell size: about 1/8 of each side (SPEC: 4 px at 32 x 32, 32 px at 224 x 224).

    ``side // 8``, rounded to a multiple of 8 px for sides of 64 px or more (224 -> 28 -> 32, so
    7 cells a side); at least 1 px.
    """
    def one(side):
        p = max(1, side // 8)
        if side >= 64:
            p = max(4, int(round(p / 8.0)) * 8)
        return p

    return one(height), one(width)


def intra_class_patch_swap(
    x: torch.Tensor,
    labels: torch.Tensor,
    patch_size=None,
    ratio: float = 0.5,
    prob: float = 1.0,
    generator: Optional[torch.Generator] = None,
):
    """Pair, mask and swap in one call: returns ``(x_swapped, partner, mask)``.

    ``patch_size`` (int or (ph, pw), default :func:`default_patch_size`) sets the cell size; the
    grid is ``(ceil(H / ph), ceil(W / pw))``.
    """
    fn = "fastsd.intra_class_patch_swap"
    V.tensor(fn, "x", x, ndim=4, what="[B, C, H, W]")
    V.tensor(fn, "labels", labels, ndim=1, dtypes=V.INT_DTYPES, what="[B]")
    V.same_device(fn, "x", x, labels=labels)
    B, _, H, W = x.shape
    if labels.shape[0] != B:
        raise ValueError(f"{fn}: labels must have length B={B} (x.shape[0]), got {labels.shape[0]}")
    ph, pw = default_patch_size(H, W) if patch_size is None else V.positive_int_pair(fn, "patch_size", patch_size)
    if ph > H or pw > W:
        raise ValueError(f"{fn}: patch_size ({ph}, {pw}) must not exceed the image size ({H}, {W})")
    grid = (-(-H // ph), -(-W // pw))
    partner = intra_class_pairs(labels, generator=generator)
    mask = patch_swap_mask(partner, grid, ratio=ratio, prob=prob, generator=generator)
    return patch_swap(x, partner, mask), partner, mask
