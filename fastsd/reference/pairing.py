"""Pure-PyTorch pairing and cell masks from given random draws (SPEC sections 1-2).

fastsd.pairing draws the random numbers (``torch.randperm``, ``torch.rand`` with the caller's
generator) and these turn them into pairs and masks; every backend turns the same draws into the
same bits (kernels/pairing.py is checked against these).
"""
from __future__ import annotations

import torch


def sorted_by_label(labels: torch.Tensor, order: torch.Tensor):
    """``sort(labels[order], stable=True)``: by label, then in random order within a class."""
    return torch.sort(labels[order], stable=True)


def pair_by_label(labels: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Pairs within each class from a random permutation ``order``: int64 ``[B]``, an involution.

    Positions 2k and 2k+1 of each class segment of the stably sorted ``labels[order]`` are paired:
    a position's rank in its segment is its distance to the segment's start, which a binary search
    of the sorted labels finds; the last member of an odd class (rank r ^ 1 past the class's end)
    is its own partner.
    """
    n = labels.shape[0]
    idx = torch.arange(n, device=labels.device)
    sorted_labels, by_label = sorted_by_label(labels, order)
    order = order[by_label]  # the sample at each sorted position
    start = torch.searchsorted(sorted_labels, sorted_labels)  # each position's class starts here
    end = torch.searchsorted(sorted_labels, sorted_labels, right=True)  # and ends before here
    partner_pos = torch.minimum(((idx - start) ^ 1) + start, end - 1)
    return torch.empty_like(order).index_put_((order,), order[partner_pos])


def pair_leader(partner: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The lower index of each pair: both members use the leader's random draws."""
    return torch.minimum(partner, idx)


def active_pairs(partner, idx, draw, prob: float) -> torch.Tensor:
    """Pairs (not singletons) whose leader's ``draw`` (uniform in [0, 1)) is below prob."""
    is_pair = partner != idx
    return is_pair if prob >= 1.0 else (draw < prob) & is_pair  # draw < 1 always holds


def cell_mask(partner: torch.Tensor, noise: torch.Tensor, gh: int, gw: int, k: int, prob: float) -> torch.Tensor:
    """bool ``[B, gh, gw]``: k cells of each active pair, from ``noise`` ``[B, gh * gw + 1]``.

    Row ``leader = min(b, partner[b])`` of noise serves both members: the stable argsort of its
    first ``gh * gw`` numbers is a uniformly random permutation of the cells (iid numbers; ties,
    which float32 numbers have at full resolution, go by cell index), so ``argsort < k`` marks k
    cells chosen uniformly; its last number activates the pair with probability ``prob``.
    """
    B, cells = partner.shape[0], gh * gw
    idx = torch.arange(B, device=partner.device)
    noise = noise[pair_leader(partner, idx)]
    chosen = torch.argsort(noise[:, :cells], dim=1, stable=True) < k
    return (chosen & active_pairs(partner, idx, noise[:, cells], prob)[:, None]).view(B, gh, gw)
