"""Intra-class pairing and swap masks (SPEC sections 1-3).

Everything here runs on the labels' / partner's device with no host synchronisation: random keys,
sorts, binary searches and comparisons only (no ``.item()``, no Python loop over classes).

Layers: the public functions validate (metadata only) and draw the random numbers with the
caller's generator (``torch.randperm``, ``torch.rand``); the ``torch.library`` custom ops
``fastsd::intra_class_pairs`` (labels, order -> partner) and ``fastsd::patch_swap_mask`` (partner,
noise -> mask), with fake kernels so ``torch.compile(fullgraph=True)`` sees them whole, turn the
draws into pairs and masks (an eager call runs their implementation directly, :mod:`fastsd._eager`);
:mod:`fastsd._backend` picks the implementation: the reference
(:mod:`fastsd.reference.pairing`, aten ops, on every device) or the Triton kernels
(``fastsd.kernels.pairing``), bit for bit the same from the same draws.

Launches on CUDA (issue 12, counted by tests/test_launches.py), Triton backend: pairs 4 (randperm,
a gather, a stable sort, the pairing kernel), masks 2 (rand, the mask kernel); the masks of a
partner from :func:`intra_class_pairs` (inside :func:`intra_class_patch_swap`) skip the permutation
check, and the swap skips it too (an involution is its own inverse).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _backend, _eager
from . import _validate as V
from .patch_swap import assert_permutation, swap_pairs
from .reference import pairing as reference
from .reference.pairing import active_pairs, pair_leader


# --- the registered ops ------------------------------------------------------------------------


def _pairs_impl(labels: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """partner (int64 [B]) from labels and a random permutation ``order`` of range(B), B >= 1."""
    return _backend.select("intra_class_pairs", labels, order)(labels, order)


_pairs_op = torch.library.custom_op("fastsd::intra_class_pairs", mutates_args=())(_pairs_impl)
_PAIRS = _eager.Path(_pairs_op, _pairs_impl)


@_pairs_op.register_fake
def _(labels, order):
    return order.new_empty(order.shape)


def _mask_impl(partner: torch.Tensor, noise: torch.Tensor, gh: int, gw: int, k: int, prob: float) -> torch.Tensor:
    """bool [B, gh, gw] from partner (int64, a permutation) and noise [B, gh * gw + 1]."""
    return _backend.select("patch_swap_mask", partner, noise, cells=gh * gw)(partner, noise, gh, gw, k, prob)


_mask_op = torch.library.custom_op("fastsd::patch_swap_mask", mutates_args=())(_mask_impl)
_MASK = _eager.Path(_mask_op, _mask_impl)


@_mask_op.register_fake
def _(partner, noise, gh, gw, k, prob):
    return partner.new_empty((partner.shape[0], gh, gw), dtype=torch.bool)


def intra_class_pairs(labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pair each sample with a random member of its class.

    Returns ``partner`` (int64 ``[B]``, on labels' device) with ``partner[partner[i]] == i`` and
    ``labels[partner[i]] == labels[i]``. Inside each class of n members, floor(n/2) disjoint pairs
    are drawn uniformly at random; when n is odd one member is its own partner (a singleton).

    How: a random permutation, a stable sort of the permuted labels (so by label, then in random
    order within a class), then positions 2k and 2k+1 of each class segment are paired
    (:func:`fastsd.reference.pairing.pair_by_label`). The same generator state gives the same
    result on every backend.
    """
    fn = "fastsd.intra_class_pairs"
    V.tensor(fn, "labels", labels, ndim=1, dtypes=V.INT_DTYPES, what="[B] of class indices")
    generator = V.generator(fn, generator, labels.device)
    return _pairs(labels, generator)


def _pairs(labels: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """intra_class_pairs of validated labels."""
    n = labels.shape[0]
    if n == 0:
        return labels.new_empty(0, dtype=torch.int64)
    order = torch.randperm(n, generator=generator, device=labels.device)
    return _PAIRS((labels, order), False, labels, order)


def _check_partner(fn: str, partner) -> Tuple[torch.Tensor, torch.Tensor]:
    """partner as int64, asserted to be a permutation, and ``arange(B)`` (the assert's, reused)."""
    V.tensor(fn, "partner", partner, ndim=1, dtypes=V.INT_DTYPES, what="[B]")
    partner = partner.long()
    return partner, assert_permutation(fn, torch.sort(partner).values)


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

    How: ``gh * gw + 1`` uniform numbers per pair (its leader's row). The stable argsort of the
    first ``gh * gw`` is a uniformly random permutation of the cells (the numbers are iid; ties go
    by cell index, so every backend gives the same bits), so
    ``argsort < k`` marks k cells chosen uniformly; the last number decides whether the pair is active.
    """
    fn = "fastsd.patch_swap_mask"
    partner, _ = _check_partner(fn, partner)
    gh, gw = V.positive_int_pair(fn, "grid", grid)
    ratio = V.unit_interval(fn, "ratio", ratio)
    prob = V.unit_interval(fn, "prob", prob)
    generator = V.generator(fn, generator, partner.device)
    return _cell_mask(partner, (gh, gw), ratio, prob, generator)


def _cell_mask(partner, grid, ratio: float, prob: float, generator) -> torch.Tensor:
    """patch_swap_mask of validated arguments (partner int64)."""
    (gh, gw), B = grid, partner.shape[0]
    cells = gh * gw
    noise = torch.rand(B, cells + 1, generator=generator, device=partner.device)
    return _MASK((partner, noise), False, partner, noise, gh, gw, round(ratio * cells), prob)


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
    partner, idx = _check_partner(fn, partner)
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
    u = torch.rand(B, 4, generator=generator, device=device, dtype=torch.float64)[pair_leader(partner, idx)]
    side = torch.sqrt(lo + (hi - lo) * u[:, 0])
    h = torch.round(H * side).long().clamp(1, H)
    w = torch.round(W * side).long().clamp(1, W)
    top = torch.floor(u[:, 1] * (H - h + 1)).long().clamp(max=H - 1)
    left = torch.floor(u[:, 2] * (W - w + 1)).long().clamp(max=W - 1)
    active = active_pairs(partner, idx, u[:, 3], prob)
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
    grid is ``(ceil(H / ph), ceil(W / pw))``. The pairs are :func:`intra_class_pairs`', the masks
    :func:`patch_swap_mask`'s (same distributions; the random draws differ from calling the two in
    turn with one generator). The partner is an involution by construction: the masks and the
    swap neither check nor invert it.
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
    ratio = V.unit_interval(fn, "ratio", ratio)
    prob = V.unit_interval(fn, "prob", prob)
    generator = V.generator(fn, generator, labels.device)
    grid = (-(-H // ph), -(-W // pw))
    partner = _pairs(labels, generator)
    mask = _cell_mask(partner, grid, ratio, prob, generator)
    return swap_pairs(x, partner, mask), partner, mask


# --- backends ----------------------------------------------------------------------------------
# The reference is aten ops: it runs on every device, and where a backend is forced for a whole
# recipe (FASTSD_BACKEND=cpp or cuda: these ops have no C++ or CUDA kernel) it stands in.

_backend.register("intra_class_pairs", "torch", stand_in=True)(reference.pair_by_label)
_backend.register("patch_swap_mask", "torch", stand_in=True)(reference.cell_mask)


@_backend.register("intra_class_pairs", "triton")
def _pairs_triton(labels, order):
    from .kernels import pairing as k

    return k.pair_by_label(*reference.sorted_by_label(labels, order), order)


def _mask_triton_reasons(partner, noise=None, cells: int = 0):  # fastsd.info probes with one tensor
    from .kernels import pairing as kernels

    why = []
    if cells > kernels.MAX_CELLS:
        # all-pairs ranks cost cells**2: past MAX_CELLS (finer than a 32 x 32 grid) the reference's sort is faster
        why.append(f"{cells} cells: the kernel ranks at most {kernels.MAX_CELLS} (a 32 x 32 grid)")
    if noise is not None and noise.dtype not in kernels.MASK_DTYPES:
        why.append(f"noise is {noise.dtype}; the kernel takes {', '.join(map(str, kernels.MASK_DTYPES))}")
    return why


@_backend.register("patch_swap_mask", "triton", reasons=_mask_triton_reasons)
def _mask_triton(partner, noise, gh, gw, k, prob):
    from .kernels import pairing as kernels

    return kernels.cell_mask(partner, noise, gh, gw, k, prob)
