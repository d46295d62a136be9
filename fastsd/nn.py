"""``nn.Module`` wrappers of the functional ops, usable as a line of a training step."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .pairing import intra_class_patch_swap


class IntraClassPatchSwap(nn.Module):
    """Pair same-class images and swap random patches: ``(x_swapped, partner, mask) = m(x, labels)``.

    Active only in training mode (``model.train()``); in eval mode it returns x unchanged with
    ``partner = arange(B)`` and an all-false mask, so it can stay in a model's forward.
    Arguments as :func:`fastsd.intra_class_patch_swap`.
    """

    def __init__(self, patch_size=None, ratio: float = 0.5, prob: float = 1.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.patch_size, self.ratio, self.prob, self.generator = patch_size, ratio, prob, generator

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        if not self.training:
            B = x.shape[0]
            partner = torch.arange(B, device=x.device)
            return x, partner, torch.zeros(B, 1, 1, dtype=torch.bool, device=x.device)
        return intra_class_patch_swap(x, labels, self.patch_size, self.ratio, self.prob, self.generator)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, ratio={self.ratio}, prob={self.prob}"
