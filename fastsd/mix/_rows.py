"""The drop-ins' per-row arguments on the device, and their targets mixed by the fused op on the CPU.

A sampler's draws (partner, boxes, lambdas, row kinds) are a few numpy arrays a batch; timm and
torchvision mix the targets with an ATen expression, ``y * lam + y[partner] * (1 - lam)``: four to
six passes over ``[B, num_classes]``. On the CPU, :func:`mix_rows` makes that one pass of the fused
op with every row a MixUp row, bit-identical (the op rounds as eager ops round): the drop-ins at
256 x 3 x 32 x 32 with 1000 classes took 0.8-1.3 ms a call instead of 1.7-3.0 ms (2 cores, one
thread). On CUDA the drop-ins keep the ATen expression: measured on an H100, the extra launch of the
op (Triton's Python launcher costs about 45 us a launch there, ATen about 5 us) and packing the draws
into one host-to-device copy (about 10 us of Python per view) cost more host time than the launches
they saved.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import numpy as np
import torch

from .op import mix_unchecked, mix_unchecked_


class Rows(NamedTuple):
    """The fused op's per-row arguments on the device: ``partner`` int64 [B], ``boxes`` int64 [B, 4],
    ``lam`` float32/float64 [B] (the images' MixUp rows), ``use_box`` bool [B]; on the CPU, for the
    targets (:func:`mix_rows`), ``label_lam`` their lambda, ``no_box`` all False and ``empty_boxes``
    zeros (the kernels check every box against the shape they mix), else None; ``involution``:
    partner[partner[i]] == i."""

    partner: torch.Tensor
    boxes: torch.Tensor
    lam: torch.Tensor
    use_box: torch.Tensor
    label_lam: Optional[torch.Tensor]
    no_box: Optional[torch.Tensor]
    empty_boxes: Optional[torch.Tensor]
    involution: bool

    @property
    def fused_labels(self) -> bool:
        return self.no_box is not None


PARTNERS = {  # the libraries' partners: row i mixed with row partner[i]
    "flip": lambda B: np.arange(B - 1, -1, -1),  # timm's x.flip(0): an involution
    "roll": lambda B: (np.arange(B) - 1) % max(B, 1),  # torchvision's x.roll(1, 0)
}


@functools.lru_cache(maxsize=64)
def partner_rows(kind: str, B: int, device: torch.device) -> torch.Tensor:
    """``PARTNERS[kind]`` as an int64 [B] tensor on ``device``, made once per batch size and device:
    on CUDA a host-to-device copy a call less. Read only (no kernel writes a partner). On CUDA the
    copy is waited for once, so that every stream may read the tensor."""
    t = torch.from_numpy(PARTNERS[kind](B).astype(np.int64)).to(device)
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
    return t


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array on ``device``: on the CPU its own memory; else copied through pinned memory
    without blocking the host. A copy from pageable memory (``torch.from_numpy(a).to(device)``)
    waits for the device's stream to drain first (cudaMemcpy's rule for pageable memory): in a
    training step, for the GPU work queued before the call. torch's pinned allocator keeps the
    staging block until its copy is done."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def rows(device: torch.device, partner: str, boxes: np.ndarray, lam: np.ndarray, use_box: np.ndarray,
         label_lam: np.ndarray) -> Rows:
    """The numpy draws of a batch on ``device`` (on the CPU their own memory, no copy), with the
    library's partner ``partner`` ("flip" or "roll", :data:`PARTNERS`); ``label_lam`` may be ``lam``
    itself."""
    B = len(lam)
    arrays = [boxes.astype(np.int64, copy=False), lam, use_box]
    fused = device.type == "cpu"
    if fused:
        arrays += [label_lam, np.zeros(B, dtype=bool), np.zeros((B, 4), dtype=np.int64)]
    t = [partner_rows(partner, B, device)] + [to_device(a, device) for a in arrays]
    involution = partner == "flip" or B <= 2
    if not fused:
        return Rows(*t, None, None, None, involution)
    return Rows(*t[:4], t[2] if label_lam is lam else t[4], t[5], t[6], involution)


def mix_images(x: torch.Tensor, r: Rows, inplace: bool) -> torch.Tensor:
    """The images' pass: in place (timm's contract) where ``inplace`` and it can be (an involution
    partner, x contiguous and needing no grad), else into a new tensor."""
    if inplace and r.involution and not x.requires_grad and (
            x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return mix_unchecked_(x, r.partner, r.boxes, r.lam, r.use_box)
    return mix_unchecked(x, r.partner, r.boxes, r.lam, r.use_box)


def fuses(r: Optional[Rows], y: torch.Tensor) -> bool:
    """Whether :func:`mix_rows` gives what the libraries' ATen expression gives for ``y``: on the CPU
    (``r.fused_labels``), for a contiguous y (the expression keeps a strided y's layout) that needs
    no gradient (autograd's backward of ``y * lam`` multiplies by lam in float32, the op's in y's
    dtype: float16/bfloat16 gradients would differ)."""
    return r is not None and r.fused_labels and y.device == r.partner.device and y.is_contiguous() and (
        not y.requires_grad)


def mix_rows(y: torch.Tensor, r: Rows) -> torch.Tensor:
    """``y * lam + y[partner] * (1 - lam)`` of a ``[B, K]`` y (targets, labels) with lam = ``r.label_lam``,
    where :func:`fuses`, by the fused op with every row a MixUp row: bit-identical to that ATen
    expression (``1 - lam`` in lam's dtype, each product and the sum rounded as eager ops round). In
    place for an involution partner: y must then be the caller's own."""
    B, K = y.shape
    y4 = y.view(B, 1, 1, K)
    if r.involution:
        return mix_unchecked_(y4, r.partner, r.empty_boxes, r.label_lam, r.no_box).view(B, K)
    return mix_unchecked(y4, r.partner, r.empty_boxes, r.label_lam, r.no_box).view(B, K)
