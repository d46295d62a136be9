"""The drop-ins' per-row arguments on the device, and their targets mixed by the fused op.

A sampler's draws (partner, boxes, lambdas, row kinds) are a few numpy arrays a batch. They reach
a GPU in one copy from a pinned staging block (:class:`_Staging`), without blocking the host: a copy
from pageable memory waits for the device's stream to drain first (cudaMemcpy's rule), which in a
training step means the work queued before the call (on an H100, 2026-11-27, behind 2.4 ms of queued
work a drop-in call took 2.3 ms of host time with three or four such copies, 0.4-0.6 ms now). The
libraries' partners and the targets' constant rows are made once per batch size and device
(:func:`constant_rows`).

timm and torchvision mix the targets with an ATen expression, ``y * lam + y[partner] * (1 - lam)``:
four to six passes over ``[B, num_classes]``. :func:`mix_rows` makes that one pass of the fused op
with every row a MixUp row, bit-identical (the op rounds as eager ops round), where the op's C++
kernels run it (:func:`fuses_on`): on the CPU (the drop-ins at 256 x 3 x 32 x 32 with 1000 classes
took 0.8-1.3 ms a call instead of 1.7-3.0 ms, 2 cores, one thread) and on CUDA where the mix op's
CUDA C++ kernels run (a launch costs about 15 us of host time there). Triton's Python launcher costs
about 45 us a launch more (H100, Triton 3.6), more than the ATen launches it would save: on the
Triton backend the targets keep the ATen expression.
"""
from __future__ import annotations

import functools
import threading
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import torch

from .. import _backend
from ..patch_swap import _has_cuda_kernel, _kernel_image
from .op import mix_unchecked, mix_unchecked_


class Rows(NamedTuple):
    """The fused op's per-row arguments on the device: ``partner`` int64 [B], ``boxes`` int64 [B, 4],
    ``lam`` float32/float64 [B] (the images' MixUp rows), ``use_box`` bool [B]; where the targets go
    through the fused op (:func:`fuses_on`, :func:`mix_rows`), ``label_lam`` their lambda, ``no_box``
    all False and ``empty_boxes`` zeros (the kernels check every box against the shape they mix), else
    None; ``involution``: partner[partner[i]] == i."""

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
CONSTANTS = {  # and the targets' rows (every one a MixUp row)
    **PARTNERS,
    "no_box": lambda B: np.zeros(B, dtype=bool),
    "empty_boxes": lambda B: np.zeros((B, 4), dtype=np.int64),
}


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index (the current CUDA device for a bare "cuda"): one cache key a device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def constant_rows(kind: str, B: int, device: torch.device) -> torch.Tensor:
    """``CONSTANTS[kind]`` of a batch of B on ``device`` (int64, or bool for "no_box"), made once per
    batch size and device (a few batch sizes a run; never evicted, so never freed while a stream may
    read them). Read only (no kernel writes them)."""
    return _constant_rows(kind, B, _indexed(device))


@functools.lru_cache(maxsize=None)
def _constant_rows(kind: str, B: int, device: torch.device) -> torch.Tensor:
    a = CONSTANTS[kind](B)
    with torch.inference_mode(False):  # made under inference_mode, it could not be saved for a backward later
        t = torch.from_numpy(a if a.dtype == bool else a.astype(np.int64)).to(device)
    if t.is_cuda:  # waited for once, so that every stream may read it
        torch.cuda.current_stream(t.device).synchronize()
    return t


def fuses_on(device: torch.device) -> bool:
    """Whether the targets on ``device`` go through the fused op: on the CPU; on CUDA where the mix
    op's CUDA C++ kernels run (auto takes them first, fastsd._backend.CUDA_FIRST), not Triton's."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or _backend.forced_backend() not in (None, "cuda") or not _has_cuda_kernel("mix_check"):
        return False
    return _kernel_image(_indexed(device).index)


class _Block(NamedTuple):
    host: torch.Tensor  # pinned uint8
    view: np.ndarray  # its memory, for numpy's writes
    done: "torch.cuda.Event"  # recorded after the copy that last read the block


class _Staging:
    """Pinned host blocks for the draws' one host-to-device copy a call, per device. A block is
    written again only when the copy that last read it is done (its event); while every block is in
    flight a new one is made, up to :attr:`MAX_BLOCKS`, then the oldest is waited for."""

    MAX_BLOCKS = 8
    ALIGN = 16  # each array at a 16-byte offset (the kernels' vector loads; Triton's pointer specialisation)

    def __init__(self):
        self.blocks: List[_Block] = []
        self.turn = 0
        self.lock = threading.Lock()

    def _block(self, nbytes: int) -> _Block:
        for k in range(len(self.blocks)):
            i = (self.turn + k) % len(self.blocks)
            b = self.blocks[i]
            if b.host.numel() >= nbytes and b.done.query():
                self.turn = i + 1
                return b
        if len(self.blocks) == self.MAX_BLOCKS:
            i = self.turn % len(self.blocks)
            self.blocks[i].done.synchronize()
            if self.blocks[i].host.numel() >= nbytes:
                self.turn = i + 1
                return self.blocks[i]
            self.blocks.pop(i)
        host = self._pinned(max(nbytes, 4096))
        b = _Block(host, host.numpy(), torch.cuda.Event())
        self.blocks.append(b)
        self.turn = len(self.blocks)
        return b

    @staticmethod
    def _pinned(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, arrays: List[np.ndarray], device: torch.device) -> List[torch.Tensor]:
        """The arrays on ``device``, in one non-blocking copy."""
        offsets, n = [], 0
        for a in arrays:
            offsets.append(n)
            n += -(-a.nbytes // self.ALIGN) * self.ALIGN
        with self.lock:
            b = self._block(n)
            for a, o in zip(arrays, offsets):
                b.view[o:o + a.nbytes] = a.reshape(-1).view(np.uint8)
            d = b.host[:n].to(device, non_blocking=True)
            b.done.record(torch.cuda.current_stream(device))
        return [d[o:o + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape) for a, o in zip(arrays, offsets)]


_TORCH_DTYPES = {np.dtype(t): torch.from_numpy(np.zeros(1, dtype=t)).dtype
                 for t in (np.int64, np.float32, np.float64, bool, np.uint8)}
_STAGING: Dict[torch.device, _Staging] = {}


def _staged(device: torch.device) -> bool:
    return device.type == "cuda"


def to_device(arrays: List[np.ndarray], device: torch.device) -> List[torch.Tensor]:
    """Numpy arrays on ``device``: on the CPU their own memory; on CUDA one copy through pinned
    memory that the host does not wait for (:class:`_Staging`); elsewhere a copy each."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    if device.type == "cpu":
        return [torch.from_numpy(a) for a in arrays]
    if not _staged(device):
        return [torch.from_numpy(a).to(device) for a in arrays]
    device = _indexed(device)
    staging = _STAGING.get(device)
    if staging is None:
        staging = _STAGING.setdefault(device, _Staging())
    return staging.copy(arrays, device)


def rows(device: torch.device, partner: str, boxes: np.ndarray, lam: np.ndarray, use_box: np.ndarray,
         label_lam: np.ndarray) -> Rows:
    """The numpy draws of a batch on ``device``, with the library's partner ``partner`` ("flip" or
    "roll", :data:`PARTNERS`); ``label_lam`` may be ``lam`` itself."""
    B = len(lam)
    arrays = [boxes.astype(np.int64, copy=False), lam, use_box]
    fused = fuses_on(device)
    if fused and label_lam is not lam:
        arrays.append(label_lam)
    t = to_device(arrays, device)
    involution = partner == "flip" or B <= 2
    if not fused:
        return Rows(constant_rows(partner, B, device), *t[:3], None, None, None, involution)
    return Rows(constant_rows(partner, B, device), *t[:3], t[3] if label_lam is not lam else t[1],
                constant_rows("no_box", B, device), constant_rows("empty_boxes", B, device), involution)


def mix_images(x: torch.Tensor, r: Rows, inplace: bool) -> torch.Tensor:
    """The images' pass: in place (timm's contract) where ``inplace`` and it can be (an involution
    partner, x contiguous and needing no grad), else into a new tensor."""
    if inplace and r.involution and not x.requires_grad and (
            x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return mix_unchecked_(x, r.partner, r.boxes, r.lam, r.use_box)
    return mix_unchecked(x, r.partner, r.boxes, r.lam, r.use_box)


def fuses(r: Optional[Rows], y: torch.Tensor) -> bool:
    """Whether :func:`mix_rows` gives what the libraries' ATen expression gives for ``y``: where the
    op's C++ kernels run (``r.fused_labels``, :func:`fuses_on`), for a contiguous y (the expression
    keeps a strided y's layout) that needs no gradient (autograd's backward of ``y * lam`` multiplies
    by lam in float32, the op's in y's dtype: float16/bfloat16 gradients would differ)."""
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
