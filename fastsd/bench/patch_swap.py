"""Patch swap benchmark cases (issue 2): every backend that can run here against three baselines.

* ``loop``: a per-pair Python loop, the way public trainers swap patches today (upsample the
  pair's cell mask, then a ``torch.where`` per image of the pair);
* ``eager_where``: eager ``torch.where`` over the whole batch with a mask upsampled by
  ``F.interpolate`` (the best plain-PyTorch one-liner);
* ``compiled_ref``: ``torch.compile`` of the reference (compile time not counted);
* ``clone``: ``x.clone()``, the memory limit of any op that reads x once and writes once into a
  new tensor.

The runner adds ``copy`` (``y.copy_(x)`` of the same bytes into an existing buffer): a patch swap
reads x once and writes its output once, a copy's traffic, so no row can be faster than the copy
(the case's lower bound). Targets (issue 2), for the compiled backends: at least 2x the eager
``torch.where``, at least 20x the per-pair loop on the 32 x 32 case, within 1.5x of ``x.clone()``.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .. import _backend, reference
from ..patch_swap import patch_swap
from .cases import PATCH_SWAP_BENCH, PATCH_SWAP_GPU_BENCH, PatchSwapCase
from .core import COPY, Bench, timed_backends

TARGETS = {"eager_where": 2.0, "clone": 1 / 1.5}
LOOP_TARGET = {"256x3x32x32 grid 8x8": 20.0}  # the per-pair loop target holds on the 32 x 32 case only


def loop_patch_swap(x, partner, mask):
    """Per-pair Python loop (the baseline public code resembles)."""
    out = x.clone()
    H, W = x.shape[-2:]
    gh, gw = mask.shape[1:]
    for i, j in enumerate(partner.tolist()):
        if j <= i:
            continue
        m = mask[i].repeat_interleave(-(-H // gh), 0)[:H].repeat_interleave(-(-W // gw), 1)[:, :W]
        if H % gh or W % gw:  # grids that do not divide the image: exact cell map
            m = reference.upsample_mask(mask[i:i + 1], H, W)[0]
        out[i] = torch.where(m, x[j], x[i])
        out[j] = torch.where(m, x[i], x[j])
    return out


def eager_where_patch_swap(x, partner, mask):
    m = F.interpolate(mask[:, None].to(x.dtype if x.is_floating_point() else torch.float32),
                      size=x.shape[-2:], mode="nearest").bool()
    return torch.where(m, x[partner], x)


def _backend_fn(name):
    def run(inputs):
        with _backend.use_backend(name):
            return patch_swap(*inputs)

    return run


def bench_case(case: PatchSwapCase, device, dtype) -> Bench:
    def setup():
        return case.make(dtype, device)

    backends = {b: _backend_fn(b) for b in timed_backends("patch_swap", device)}
    return Bench(
        op="patch_swap",
        case=case.name,
        setup=setup,
        backends=backends,
        baselines={
            "loop": lambda i: loop_patch_swap(*i),
            "eager_where": lambda i: eager_where_patch_swap(*i),
            "compiled_ref": lambda i, f=torch.compile(reference.patch_swap, dynamic=False): f(*i),
            "clone": lambda i: i[0].clone(),
        },
        reference=lambda i: reference.patch_swap(i[0].double(), i[1], i[2]),
        min_bytes=case.bytes(dtype),
        speedup_vs=("loop", "eager_where", "compiled_ref", "clone"),
        not_the_op=("clone",),
        count_with={"torch": lambda i: reference.patch_swap(*i)},
        targets=dict(TARGETS, **({"loop": LOOP_TARGET[case.name]} if case.name in LOOP_TARGET else {})),
        target_source="issue 2", floor=COPY, eager="eager_where", compiled="compiled_ref",
    )


def benches(device="cpu", dtype=torch.float32, quick=True) -> List[Bench]:
    """The cases of PATCH_SWAP_BENCH, and on CUDA those of PATCH_SWAP_GPU_BENCH too."""
    cases = PATCH_SWAP_BENCH + (PATCH_SWAP_GPU_BENCH if torch.device(device).type == "cuda" else [])
    return [bench_case(c, device, dtype) for c in cases]
