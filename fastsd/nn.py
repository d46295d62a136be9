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
            from . import _validate as V

            V.tensor("fastsd.nn.IntraClassPatchSwap", "x", x, ndim=4, what="[B, C, H, W]")
            B = x.shape[0]
            partner = torch.arange(B, device=x.device)
            return x, partner, torch.zeros(B, 1, 1, dtype=torch.bool, device=x.device)
        return intra_class_patch_swap(x, labels, self.patch_size, self.ratio, self.prob, self.generator)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, ratio={self.ratio}, prob={self.prob}"


class PairKDLoss(nn.Module):
    """:func:`fastsd.pair_kd_loss` as a module: ``loss = m(logits, labels, partner)``."""

    def __init__(self, temperature: float = 4.0, kd_weight: float = 1.0, ce_weight: float = 1.0,
                 teacher: str = "confident", ignore_index: int = -100):
        super().__init__()
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.teacher, self.ignore_index = teacher, ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        from .losses import pair_kd_loss

        return pair_kd_loss(logits, labels, partner, self.temperature, self.kd_weight, self.ce_weight,
                            self.teacher, self.ignore_index)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"teacher={self.teacher!r}, ignore_index={self.ignore_index}")


class KDLoss(nn.Module):
    """:func:`fastsd.kd_loss` as a module: ``loss = m(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean"):
        super().__init__()
        self.temperature, self.reduction = temperature, reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        from .losses import kd_loss

        return kd_loss(student_logits, teacher_logits, self.temperature, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class FeatureAlignmentLoss(nn.Module):
    """:func:`fastsd.feature_alignment_loss` as a module: ``loss = m(student_features, target_features)``."""

    def __init__(self, kind: str = "mse", weights=None, reduction: str = "mean"):
        super().__init__()
        self.kind, self.weights, self.reduction = kind, weights, reduction

    def forward(self, student, target) -> torch.Tensor:
        from .losses import feature_alignment_loss

        return feature_alignment_loss(student, target, self.kind, self.weights, self.reduction)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, weights={self.weights!r}, reduction={self.reduction!r}"
