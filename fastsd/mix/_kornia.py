"""kornia's ``augmentation.RandomCutMixV2`` (kornia 0.9.0, augmentation/_2d/mix/cutmix.py) with its
pixel work done by fastsd's fused mix op.

Everything that decides the result stays kornia's own code: the class is a subclass, built when it
is first used (kornia is imported then, never by ``import fastsd.mix``), so the parameter generator
(torch's global generator, in kornia's order), ``p`` (a batch-wide gate), ``same_on_batch``,
``keepdim``, ``data_keys`` and the ``(num_mix, B, 3)`` class output are kornia's. Two methods are
replaced, for ``num_mix == 1``:

* ``apply_transform``: kornia clones the batch, builds a ``[B, C, H, W]`` bool mask from the box
  vertices and copies ``input[pair][mask]`` into the clone; here one fused pass reads each pixel from
  the row or its partner. kornia's box covers ``x_min <= x <= x_max`` and ``y_min <= y <= y_max``
  (inclusive, integer vertices after its ``floor``), i.e. the half-open box
  ``(y_min, y_max + 1, x_min, x_max + 1)``; a zero-sized cut (``x_max = x_min - 1``) is empty;
* ``transform_input``: kornia selects between the mixed and the unmixed batch with a full-size
  ``torch.where`` even when the gate applies to every row (it is all or nothing); here the mixed
  batch is returned as it is then (the same values).

With ``num_mix > 1`` each mix pastes from the original batch over the previous one; that is
kornia's own ``apply_transform``. Differentiable in the images, as kornia's is.
"""
from __future__ import annotations

import functools

import torch

from .op import mix_unchecked


def _half_open_boxes(crop: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """kornia's ``(B, 4, 2)`` (x, y) vertices, read as bbox_to_mask reads them (vertex 0 the
    top-left, vertex 2 the bottom-right, both inclusive) -> int64 ``[B, 4]`` (y0, y1, x0, x1)
    half-open, clipped to the image (an inverted box is empty)."""
    x_min, y_min = crop[:, 0, 0], crop[:, 0, 1]
    x_max, y_max = crop[:, 2, 0], crop[:, 2, 1]
    # pixel k is inside iff x_min <= k <= x_max: k from ceil(x_min) to floor(x_max)
    x0 = torch.ceil(x_min).clamp(0, width).long()
    y0 = torch.ceil(y_min).clamp(0, height).long()
    x1 = torch.maximum(torch.floor(x_max).clamp(-1, width - 1).long() + 1, x0)
    y1 = torch.maximum(torch.floor(y_max).clamp(-1, height - 1).long() + 1, y0)
    return torch.stack([y0, y1, x0, x1], 1)


@functools.lru_cache(maxsize=None)
def _random_cutmix_v2():
    from kornia.augmentation import RandomCutMixV2 as Kornia
    from kornia.augmentation.utils import _transform_output_shape

    class RandomCutMixV2(Kornia):
        def apply_transform(self, input, params, maybe_flags=None):
            if len(params["mix_pairs"]) != 1:
                return super().apply_transform(input, params, maybe_flags)
            pair, crop = params["mix_pairs"][0], params["crop_src"][0]
            B, _, H, W = input.shape
            dev = input.device
            boxes = _half_open_boxes(crop, H, W).to(dev, non_blocking=True)
            return mix_unchecked(input, pair.to(dev, torch.long, non_blocking=True), boxes,
                                 torch.zeros(B, dtype=torch.float32, device=dev),
                                 torch.ones(B, dtype=torch.bool, device=dev))

        def transform_input(self, input, params, flags):
            to_apply = torch.atleast_1d(params["batch_prob"] > 0.5)
            if to_apply.numel() == 0 or not bool(to_apply.all()):  # kornia's gate, on its host tensor
                return super().transform_input(input, params, flags)
            ori_shape = input.shape
            output = self.apply_transform(self.transform_tensor(input), params, flags)
            return _transform_output_shape(output, ori_shape) if self.keepdim else output

    RandomCutMixV2.__doc__ = f"{__doc__}\nkornia's documentation:\n{Kornia.__doc__}"
    RandomCutMixV2.__module__ = "fastsd.mix"
    RandomCutMixV2.__qualname__ = "RandomCutMixV2"
    return RandomCutMixV2

