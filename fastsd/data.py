"""Data-side helpers: :class:`ClassPairSampler`, a batch sampler that gives every anchor a partner."""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler


class ClassPairSampler(Sampler[List[int]]):
    """Batches of ``n`` anchors followed by ``n`` same-class partners (after the CS-KD sampler).

    Each batch (of ``batch_size = 2n`` indices) is ``n`` anchors taken in order from an epoch's
    (shuffled) index list, then for each anchor one partner drawn uniformly from the *whole
    dataset's* other members of the anchor's class, so every anchor has a partner even when its
    class is rare in the batch (a class with one member pairs the sample with itself). The pairing
    of such a batch is :meth:`partner`: ``i <-> i + n``.

    Args:
        labels: the dataset's class labels (sequence or 1-D integer tensor).
        batch_size: indices per batch, even and >= 2.
        shuffle: shuffle the anchors every epoch (seeded by ``seed + epoch``; call
            :meth:`set_epoch`).
        drop_last: drop the last, smaller batch (else it has ``n' < n`` anchors and ``n'`` partners).
        seed: seed of the anchor order and of the partner draws.
        num_replicas, rank: distributed training: each rank takes every ``num_replicas``-th anchor
            of the (padded) epoch order, as ``torch.utils.data.DistributedSampler`` does; the
            default is torch.distributed's world size and rank when it is initialised, else 1 and 0.
    """

    def __init__(self, labels, batch_size: int, shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None):
        fn = "fastsd.data.ClassPairSampler"
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{fn}: labels must be a 1-D sequence of integer class labels ({exc})") from None
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{fn}: labels must be a 1-D sequence of integer class labels, got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2 or batch_size % 2:
            raise ValueError(f"{fn}: batch_size must be an even int >= 2 (n anchors + n partners), got {batch_size!r}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"{fn}: num_replicas must be an int >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"{fn}: rank must be an int in [0, num_replicas={num_replicas}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{fn}: seed must be an int, got {seed!r}")
        self.labels = labels.cpu().long()
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, int(seed)
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        # members of each class, grouped: order[start[c]:start[c] + count[c]] are class c's indices
        self._order = torch.argsort(self.labels, stable=True)
        _, inverse, counts = torch.unique(self.labels, return_inverse=True, return_counts=True)
        self._class_of = inverse
        self._count = counts
        self._start = torch.cumsum(counts, 0) - counts
        self._rank_in_class = torch.empty_like(self._order)  # each sample's slot in its class segment
        self._rank_in_class[self._order] = torch.arange(len(self._order)) - self._start[inverse[self._order]]
        self._anchors_per_rank = math.ceil(len(self.labels) / num_replicas)

    @staticmethod
    def partner(batch_len: int, device=None) -> torch.Tensor:
        """The pairing of a batch from this sampler: anchor i <-> partner i + n."""
        n = batch_len // 2
        idx = torch.arange(batch_len, device=device)
        return torch.where(idx < n, idx + n, idx - n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _anchors(self, gen: torch.Generator) -> torch.Tensor:
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        total = self._anchors_per_rank * self.num_replicas
        if total > n:  # pad by repeating the start, as DistributedSampler does
            order = torch.cat([order, order.repeat(math.ceil(total / max(n, 1)))[: total - n]])
        return order[self.rank:total:self.num_replicas]

    def _partners(self, anchors: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cls = self._class_of[anchors]
        count, start = self._count[cls], self._start[cls]
        # uniform over the class's other members: draw one of count - 1 slots, then step over the
        # anchor's own slot
        slot = (torch.rand(len(anchors), generator=gen, dtype=torch.float64) * (count - 1).clamp(min=1)).long()
        slot = slot + ((slot >= self._rank_in_class[anchors]) & (count > 1)).long()
        return torch.where(count > 1, self._order[start + slot], anchors)

    def __iter__(self) -> Iterator[List[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        anchors = self._anchors(gen)
        partners = self._partners(anchors, gen)
        n = self.batch_size // 2
        for s in range(0, len(anchors), n):
            a, p = anchors[s:s + n], partners[s:s + n]
            if len(a) < n and self.drop_last:
                return
            yield a.tolist() + p.tolist()

    def __len__(self) -> int:
        n = self.batch_size // 2
        return self._anchors_per_rank // n if self.drop_last else math.ceil(self._anchors_per_rank / n)
