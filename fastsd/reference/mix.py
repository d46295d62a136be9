"""Reference mix (SPEC section 6): CutMix box rows and MixUp rows in one op, the test oracle.

Per row i, with p = partner[i] and (y0, y1, x0, x1) = boxes[i] (half-open):

* CutMix row (``use_box[i]``): ``out[i, :, h, w] = x[p, :, h, w]`` for y0 <= h < y1 and
  x0 <= w < x1, else ``x[i, :, h, w]`` (an empty box copies the row);
* MixUp row: ``out[i] = x[i] * lam[i] + x[p] * (1 - lam[i])``, evaluated as timm does: ``1 - lam``
  in lam's dtype (float32 for timm's per-element draws, float64 for its per-batch one), both
  weights then cast to the compute type (float32 for float16/bfloat16/float32/uint8, float64 for
  float64), each product and the sum rounded to x's dtype as PyTorch's eager ops round them, and
  for uint8 the float32 sum rounded half to even (``torch.round``) and cast back, as timm's
  FastCollateMixup does. Not ``lerp``/``addcmul``: they round differently.
"""
from __future__ import annotations

from typing import Tuple

import torch


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, 4]`` (y0, y1, x0, x1) boxes -> ``[B, H, W]`` bool mask of the pixels inside each box."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    y0, y1, x0, x1 = (boxes[:, k, None, None] for k in range(4))
    return (rows[:, None] >= y0) & (rows[:, None] < y1) & (cols >= x0) & (cols < x1)


def mix_weights(lam: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w_self, w_partner) = (lam, 1 - lam) as the MixUp products use them: ``1 - lam`` in lam's
    dtype, both cast to the compute type of x's dtype (float64 for float64, else float32)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return lam.to(compute), (1 - lam).to(compute)


def _mixup(x: torch.Tensor, other: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    w1, w2 = (w[:, None, None, None] for w in mix_weights(lam, x.dtype))
    if x.dtype in (torch.float32, torch.float64):
        return x * w1 + other * w2
    if x.dtype == torch.uint8:
        return torch.round(x.float() * w1 + other.float() * w2).to(torch.uint8)
    # float16 / bfloat16: PyTorch computes each op in float32 and rounds its result to x's dtype
    a = (x.float() * w1).to(x.dtype)
    b = (other.float() * w2).to(x.dtype)
    return (a.float() + b.float()).to(x.dtype)


def mix(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
        use_box: torch.Tensor) -> torch.Tensor:
    """See the module docstring. ``x`` [B, C, H, W]; ``partner`` int [B]; ``boxes`` int [B, 4];
    ``lam`` float32/float64 [B] (read by MixUp rows); ``use_box`` bool [B]."""
    other = x[partner.long()]
    inside = box_mask(boxes, x.shape[2], x.shape[3]).unsqueeze(1)
    cut = torch.where(inside, other, x)
    mixed = _mixup(x, other, lam)
    return torch.where(use_box.bool()[:, None, None, None], cut, mixed)


def mix_backward(grad: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
                 use_box: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`mix` (floating x): with q the inverse permutation of partner,
    ``grad_x[j] = kept(g)[j] + sent(g)[q[j]]``, where a CutMix row keeps g outside its box and sends
    g inside it, a MixUp row keeps ``g * lam`` and sends ``g * (1 - lam)``. A gather: no atomics."""
    q = torch.argsort(partner.long())
    inside = box_mask(boxes, grad.shape[2], grad.shape[3]).unsqueeze(1)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    w1, w2 = (w.to(grad.dtype)[:, None, None, None] for w in mix_weights(lam, grad.dtype))
    box = use_box.bool()[:, None, None, None]
    kept = torch.where(box, torch.where(inside, zero, grad), grad * w1)
    sent = torch.where(box, torch.where(inside, grad, zero), grad * w2)
    return kept + sent[q]
