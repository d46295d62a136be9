"""Loading of the optional compiled extension ``fastsd._C`` (csrc/).

Its C++ ops live in the ``fastsd_C`` namespace (``torch.ops.fastsd_C.<op>``); the public,
differentiable ops are the Python ``torch.library`` ops in the ``fastsd`` namespace, which call
these as backend kernels.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """None when fastsd._C is loaded, else why not (for the backend reasons and fastsd.info)."""
    try:
        from . import _C  # noqa: F401  (loading it registers torch.ops.fastsd_C)
    except ImportError as exc:
        log = build_log()
        hint = f" Build log: {log.splitlines()[0]}" if log else ""
        return f"fastsd._C is not available ({exc}).{hint}"
    return None


def ops():
    if load_error() is not None:
        raise RuntimeError(load_error())
    return torch.ops.fastsd_C


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    return load_error() is None and bool(torch.ops.fastsd_C.built_with_cuda())


def empty_cache() -> int:
    """Free the large CPU buffers (over 32 MiB) that the C++ kernels keep for reuse; returns their bytes.

    On Linux those outputs come from transparent huge pages, and up to 8 freed ones (2 GiB at
    most) are kept, as CUDA's caching allocator keeps device memory: a training loop asks for the
    same sizes every step, and a fresh mapping costs the kernel's zeroing and, on fragmented
    memory, a compaction stall. 0 where nothing is kept (no extension, FASTSD_HUGEPAGES=0)."""
    if load_error() is not None:
        return 0
    return int(torch.ops.fastsd_C.empty_cache())


def build_log() -> str:
    path = os.path.join(os.path.dirname(__file__), "_build_log.txt")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
