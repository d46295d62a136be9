"""torchvision's ``transforms.v2.CutMix`` / ``MixUp`` (torchvision 0.29.1, v2/_augment.py) on fastsd's
fused mix op.

The draws are torchvision's, from torch's global generator in its order: lambda from
``torch.distributions.Beta([alpha], [alpha]).sample(())``, then for CutMix the box centre
``torch.randint(W)``, ``torch.randint(H)``. One lambda and one box for the batch, partner
``roll(1, 0)`` (row i mixed with row i - 1). Labels as torchvision returns them: class indices
one-hot encoded to float32 ``[B, num_classes]`` (2-D labels kept), mixed as
``label.roll(1, 0) * (1 - lam) + label * lam``.

Calls take ``(images, labels)`` (two arguments or one tuple); torchvision's ``labels_getter`` and
other input structures are not supported. Images are ``[B, C, H, W]`` tensors (tv_tensors.Image
stays an Image). torchvision's MixUp fails on uint8 images (an in-place float result); this one
raises TypeError for them.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np
import torch

from .. import _validate as V
from . import _rows
from .op import MIX_DTYPES


def _wrap_like(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if type(like) is torch.Tensor:
        return out
    from torchvision import tv_tensors  # only when the input is torchvision's own type

    if isinstance(like, (tv_tensors.Image, tv_tensors.Video)):
        return tv_tensors.wrap(out, like=like)
    return out


def _beta_sample(dist: "torch.distributions.Beta") -> float:
    """``float(dist.sample(()))`` of a one-element Beta: the op its sample runs,
    ``torch._sample_dirichlet`` of the Beta's Dirichlet concentration, then element 0, the same draw
    from the same generator without the distributions' Python layers (an autograd Function, the shape
    checks, an expand): about 15 us a call instead of 47 on the CPU. torch's own path for a subclass
    of Beta (which may sample otherwise) or where that structure is not there."""
    concentration = getattr(getattr(dist, "_dirichlet", None), "concentration", None)
    sample = getattr(torch, "_sample_dirichlet", None)
    if (type(dist) is not torch.distributions.Beta or sample is None or not isinstance(concentration, torch.Tensor)
            or concentration.shape != (1, 2)):
        return float(dist.sample(()))
    with torch.no_grad():
        return sample(concentration)[0, 0].item()


class _BaseMixUpCutMix:
    def __init__(self, *, alpha: float = 1.0, num_classes=None, labels_getter="default") -> None:
        fn = f"fastsd.mix.{type(self).__name__}"
        if labels_getter != "default":
            raise ValueError(f"{fn}: only labels_getter='default' (labels as the second input) is supported")
        self.alpha = V.positive_float(fn, "alpha", alpha)
        self._dist = torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha]))
        self.num_classes = num_classes

    def _inputs(self, inputs) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = f"fastsd.mix.{type(self).__name__}"
        inputs = inputs if len(inputs) > 1 else inputs[0]
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
            raise TypeError(f"{fn}: call it with (images, labels)")
        images, labels = inputs
        V.tensor(fn, "images", images, ndim=4, dtypes=(torch.float32, torch.float16, torch.bfloat16,
                                                       torch.float64, torch.uint8), what="[B, C, H, W]")
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"The labels must be a tensor, but got {type(labels)} instead.")
        if labels.ndim not in (1, 2):
            raise ValueError(f"{fn}: labels must be class indices [B] or probabilities [B, num_classes], "
                             f"got shape {tuple(labels.shape)}")
        if labels.ndim == 2 and self.num_classes is not None and labels.shape[-1] != self.num_classes:
            raise ValueError(f"{fn}: 2-D labels must have num_classes={self.num_classes} columns, "
                             f"got {labels.shape[-1]}")
        if labels.ndim == 1 and self.num_classes is None:
            raise ValueError(f"{fn}: num_classes must be passed if the labels are index-based (1D)")
        if labels.ndim == 1:
            if labels.dtype != torch.int64:  # torchvision's one_hot takes int64 alone
                raise TypeError(f"{fn}: 1-D labels must be int64 class indices, got {labels.dtype}")
            V.class_indices(fn, "labels", labels, self.num_classes)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{fn}: the batch size of the images does not match the batch size of the labels: "
                             f"{images.shape[0]} != {labels.shape[0]}.")
        return images, labels

    def _mix(self, images, labels, lam: float, label_lam: float, use_box: bool, box=(0, 0, 0, 0)):
        """Images and labels of one call: the images' pass and the labels' (torchvision's
        ``label.roll(1, 0).mul_(1 - lam).add_(label.mul(lam))``; where the op's C++ kernels run, on
        the CPU and on CUDA's cuda backend, the same sum by the fused op with every row a MixUp row,
        :func:`fastsd.mix._rows.mix_rows`)."""
        B = images.shape[0]
        r = _rows.rows(images.device, "roll", np.full((B, 4), box, dtype=np.int64), np.full(B, lam),
                       np.full(B, use_box), np.full(B, label_lam))
        out = _wrap_like(_rows.mix_images(images, r, inplace=False), images)
        if labels.ndim == 1:  # one_hot(labels).float(), without the int64 one-hot
            y = torch.zeros(B, self.num_classes, device=labels.device, dtype=torch.float32).scatter_(
                1, labels.view(-1, 1), 1.0)
        else:
            y = labels if labels.dtype.is_floating_point else labels.float()
        if not _rows.fuses(r, y) or y.dtype not in MIX_DTYPES:  # (y is floating: never uint8)
            return out, self._mix_labels_aten(y, label_lam)
        if y is labels:  # the caller's: never mixed in place
            r = r._replace(involution=False)
        return out, _rows.mix_rows(y, r)

    @staticmethod
    def _mix_labels_aten(label: torch.Tensor, lam: float) -> torch.Tensor:
        return label.roll(1, 0).mul_(1.0 - lam).add_(label.mul(lam))


class MixUp(_BaseMixUpCutMix):
    """torchvision's ``MixUp``: ``out = x.roll(1, 0) * (1 - lam) + x * lam`` with one lambda drawn
    from Beta(alpha, alpha) for the batch (see the module docstring)."""

    def __call__(self, *inputs: Any):
        images, labels = self._inputs(inputs)
        if images.dtype == torch.uint8:
            raise TypeError("fastsd.mix.MixUp: images must be floating point (torchvision's MixUp fails on uint8)")
        lam = _beta_sample(self._dist)
        return self._mix(images, labels, lam, lam, use_box=False)


class CutMix(_BaseMixUpCutMix):
    """torchvision's ``CutMix``: one box for the batch, filled from ``x.roll(1, 0)``; labels mixed
    with ``lam = 1 - box_area / (H * W)`` (see the module docstring)."""

    def __call__(self, *inputs: Any):
        images, labels = self._inputs(inputs)
        lam = _beta_sample(self._dist)
        H, W = images.shape[-2:]
        r_x = int(torch.randint(W, size=(1,)))
        r_y = int(torch.randint(H, size=(1,)))
        r = 0.5 * math.sqrt(1.0 - lam)
        r_w_half = int(r * W)
        r_h_half = int(r * H)
        # torchvision clamps one-element int64 tensors: the same integers, without eight CPU ops
        x1 = max(r_x - r_w_half, 0)
        y1 = max(r_y - r_h_half, 0)
        x2 = min(r_x + r_w_half, W)
        y2 = min(r_y + r_h_half, H)
        lam_adjusted = float(1.0 - (x2 - x1) * (y2 - y1) / (W * H))
        return self._mix(images, labels, 0.0, lam_adjusted, use_box=True, box=(y1, y2, x1, x2))
