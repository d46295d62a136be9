"""Statistical and structural tests of pairing, masks and the class-pair sampler."""
import math
from collections import Counter

import pytest
import torch

import fastsd
from fastsd.data import ClassPairSampler


def _check_pairs(labels, partner):
    B = labels.shape[0]
    assert partner.dtype == torch.int64 and partner.shape == (B,)
    assert torch.equal(partner[partner], torch.arange(B)), "not an involution"
    assert torch.equal(labels[partner], labels), "paired across classes"
    singles = (partner == torch.arange(B)).nonzero().flatten()
    counts = Counter(labels.tolist())
    # exactly one singleton in each odd class, none in even classes
    assert Counter(labels[singles].tolist()) == Counter({c: 1 for c, n in counts.items() if n % 2})


@pytest.mark.parametrize("labels", [
    torch.zeros(7, dtype=torch.long),                       # one class, odd
    torch.arange(9),                                        # all distinct: all singletons
    torch.tensor([3, 1, 3, 3, 1, 2, 2, 2, 2, 0, 3]),        # mixed
    torch.randint(0, 5, (257,)),                            # large, prime
    torch.cat([torch.zeros(100), torch.ones(3)]).long(),    # heavily skewed
    torch.tensor([5]), torch.empty(0, dtype=torch.long),
    torch.tensor([-3, 7, -3, 7], dtype=torch.int32),        # negative labels, int32
])
def test_pairs_structure(labels):
    for seed in range(5):
        _check_pairs(labels.long(), fastsd.intra_class_pairs(labels, generator=torch.Generator().manual_seed(seed)))


def test_pairs_uniform_and_reproducible():
    labels = torch.zeros(4, dtype=torch.long)  # 3 perfect matchings of 4 items, each 1/3
    counts = Counter()
    trials = 3000
    for seed in range(trials):
        p = fastsd.intra_class_pairs(labels, generator=torch.Generator().manual_seed(seed))
        counts[int(p[0])] += 1
    for j in (1, 2, 3):
        assert abs(counts[j] / trials - 1 / 3) < 4 * math.sqrt(2 / 9 / trials)  # 4 sigma
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(fastsd.intra_class_pairs(torch.randint(0, 3, (50,), generator=g1), generator=g1),
                       fastsd.intra_class_pairs(torch.randint(0, 3, (50,), generator=g2), generator=g2))


@pytest.mark.parametrize("grid,ratio", [((8, 8), 0.5), ((7, 6), 0.3), ((1, 1), 1.0), ((3, 5), 0.0), ((2, 3), 0.25)])
def test_mask_exact_k_symmetric(grid, ratio):
    labels = torch.randint(0, 4, (41,))
    partner = fastsd.intra_class_pairs(labels, generator=torch.Generator().manual_seed(0))
    mask = fastsd.patch_swap_mask(partner, grid, ratio=ratio, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (41, *grid)
    k = round(ratio * grid[0] * grid[1])
    paired = partner != torch.arange(41)
    assert torch.equal(mask.flatten(1).sum(1), torch.where(paired, k, 0))
    assert torch.equal(mask, mask[partner])  # both members share the mask


def test_mask_activation_rate_and_cell_uniformity():
    B, grid, prob, ratio = 4000, (4, 4), 0.6, 0.25
    partner = torch.arange(B).view(-1, 2).flip(1).flatten()  # (0,1), (2,3), ...
    mask = fastsd.patch_swap_mask(partner, grid, ratio=ratio, prob=prob, generator=torch.Generator().manual_seed(3))
    pairs = mask[::2].flatten(1)
    active = pairs.any(1).double()
    n = active.numel()
    assert abs(active.mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
    # among active pairs each of the 16 cells is chosen with probability k / 16 = 1/4
    freq = pairs[active.bool()].double().mean(0)
    na = int(active.sum())
    assert (freq - 0.25).abs().max() < 4.5 * math.sqrt(0.25 * 0.75 / na)
    # chi-square over the cells, 15 degrees of freedom: p < 1e-4 beyond 45
    counts = pairs[active.bool()].sum(0).double()
    expected = counts.sum() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 45


def test_box_mask():
    partner = torch.tensor([1, 0, 2, 4, 3])
    H, W = 24, 40
    mask = fastsd.box_mask(partner, (H, W), area=(0.2, 0.4), generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, H, W) and not mask[2].any()
    assert torch.equal(mask, mask[partner])
    for i in (0, 3):
        rows, cols = mask[i].any(1), mask[i].any(0)
        h, w = int(rows.sum()), int(cols.sum())
        assert int(mask[i].sum()) == h * w  # one rectangle
        assert 0.2 * H * W * 0.8 <= h * w <= 0.4 * H * W * 1.25
    # usable as a full-resolution patch_swap mask
    x = torch.randn(5, 3, H, W)
    y = fastsd.patch_swap(x, partner, mask)
    assert torch.equal(y[0][:, mask[0]], x[1][:, mask[0]]) and torch.equal(y[2], x[2])
    off = fastsd.box_mask(partner, (H, W), prob=0.0)
    assert not off.any()


def test_class_pair_sampler():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    s = ClassPairSampler(labels, batch_size=8, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == math.ceil(18 / 4)
    seen = []
    for b in batches:
        n = len(b) // 2
        anchors, partners = b[:n], b[n:]
        seen += anchors
        for a, p in zip(anchors, partners):
            assert labels[a] == labels[p]
            assert a != p or labels[a] == 2  # the one-member class pairs with itself
    assert sorted(seen) == list(range(18))
    assert [b for b in ClassPairSampler(labels, 8, seed=3)] == batches  # reproducible
    s.set_epoch(1)
    assert list(s) != batches
    assert torch.equal(ClassPairSampler.partner(6), torch.tensor([3, 4, 5, 0, 1, 2]))


def test_class_pair_sampler_distributed_and_drop_last():
    labels = torch.randint(0, 3, (23,))
    shards = [list(ClassPairSampler(labels, 4, num_replicas=3, rank=r, drop_last=False)) for r in range(3)]
    anchors = [a for sh in shards for b in sh for a in b[: len(b) // 2]]
    assert set(anchors) == set(range(23)) and len(anchors) == 24  # padded to a multiple of 3
    assert len({len(sh) for sh in shards}) == 1
    dl = ClassPairSampler(labels, 4, num_replicas=3, rank=0, drop_last=True)
    assert len(list(dl)) == len(dl) == 8 // 2
    # partners are uniform over the other members of the class
    labels = torch.zeros(4, dtype=torch.long)
    picks = Counter()
    for seed in range(600):
        b = next(iter(ClassPairSampler(labels, 2, shuffle=False, seed=seed)))
        picks[b[1]] += 1
    assert picks[0] == 0 and all(abs(picks[j] - 200) < 60 for j in (1, 2, 3))


@pytest.mark.parametrize("kwargs,word", [
    (dict(labels=[0.5, 1.0], batch_size=2), "labels"),
    (dict(labels=[0, 1], batch_size=3), "batch_size"),
    (dict(labels=[0, 1], batch_size=0), "batch_size"),
    (dict(labels=[0, 1], batch_size=2, num_replicas=0, rank=0), "num_replicas"),
    (dict(labels=[0, 1], batch_size=2, num_replicas=2, rank=2), "rank"),
])
def test_sampler_bad_input(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ClassPairSampler(**kwargs)
