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

import torch

from .. import _validate as V
from .op import mix_unchecked


def _wrap_like(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if type(like) is torch.Tensor:
        return out
    from torchvision import tv_tensors  # only when the input is torchvision's own type

    if isinstance(like, (tv_tensors.Image, tv_tensors.Video)):
        return tv_tensors.wrap(out, like=like)
    return out


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
            V.class_indices(fn, "labels", labels, self.num_classes)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{fn}: the batch size of the images does not match the batch size of the labels: "
                             f"{images.shape[0]} != {labels.shape[0]}.")
        return images, labels

    def _mix_labels(self, label: torch.Tensor, lam: float) -> torch.Tensor:
        if label.ndim == 1:
            label = torch.nn.functional.one_hot(label, num_classes=self.num_classes)
        if not label.dtype.is_floating_point:
            label = label.float()
        return label.roll(1, 0).mul_(1.0 - lam).add_(label.mul(lam))

    def _mix(self, images, lam, use_box: bool, box=(0, 0, 0, 0)):
        B = images.shape[0]
        dev = images.device
        partner = torch.arange(-1, B - 1, device=dev) % max(B, 1)  # roll(1, 0): row i takes row i - 1
        out = mix_unchecked(images, partner, torch.tensor([box], dtype=torch.int64, device=dev).expand(B, 4),
                            torch.full((B,), lam, dtype=torch.float64, device=dev),
                            torch.full((B,), use_box, dtype=torch.bool, device=dev))
        return _wrap_like(out, images)


class MixUp(_BaseMixUpCutMix):
    """torchvision's ``MixUp``: ``out = x.roll(1, 0) * (1 - lam) + x * lam`` with one lambda drawn
    from Beta(alpha, alpha) for the batch (see the module docstring)."""

    def __call__(self, *inputs: Any):
        images, labels = self._inputs(inputs)
        if images.dtype == torch.uint8:
            raise TypeError("fastsd.mix.MixUp: images must be floating point (torchvision's MixUp fails on uint8)")
        lam = float(self._dist.sample(()))
        return self._mix(images, lam, use_box=False), self._mix_labels(labels, lam)


class CutMix(_BaseMixUpCutMix):
    """torchvision's ``CutMix``: one box for the batch, filled from ``x.roll(1, 0)``; labels mixed
    with ``lam = 1 - box_area / (H * W)`` (see the module docstring)."""

    def __call__(self, *inputs: Any):
        images, labels = self._inputs(inputs)
        lam = float(self._dist.sample(()))
        H, W = images.shape[-2:]
        r_x = torch.randint(W, size=(1,))
        r_y = torch.randint(H, size=(1,))
        r = 0.5 * math.sqrt(1.0 - lam)
        r_w_half = int(r * W)
        r_h_half = int(r * H)
        x1 = int(torch.clamp(r_x - r_w_half, min=0))
        y1 = int(torch.clamp(r_y - r_h_half, min=0))
        x2 = int(torch.clamp(r_x + r_w_half, max=W))
        y2 = int(torch.clamp(r_y + r_h_half, max=H))
        lam_adjusted = float(1.0 - (x2 - x1) * (y2 - y1) / (W * H))
        out = self._mix(images, 0.0, use_box=True, box=(y1, y2, x1, x2))
        return out, self._mix_labels(labels, lam_adjusted)
