"""Counting what eager PyTorch does: kernels launched, bytes moved, peak extra memory.

:class:`DispatchCounter` is a ``TorchDispatchMode``: every aten op that reaches it counts as one
kernel launch (view and metadata ops excepted), its tensor inputs and outputs as bytes moved, and
the storages it creates as live memory until they are freed. That is the unfused traffic of an
eager computation, the figure a fused kernel is compared with (on a GPU, time ~ bytes / bandwidth).
A fastsd custom op counts as one kernel with its own inputs and outputs.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_METADATA_OPS = ("sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_local_scalar_dense", "detach")


def _is_view_or_meta(func) -> bool:
    """Views (outputs alias an input, nothing written) and metadata queries move no data."""
    if func.__name__.startswith(_METADATA_OPS):
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DispatchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.ops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view_or_meta(func):
            return out
        self.kernels += 1
        name = str(func.overloadpacket.__name__)
        self.ops[name] = self.ops.get(name, 0) + 1
        self.bytes_read += sum(_nbytes(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        self.bytes_written += sum(_nbytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written


def count(fn: Callable[[], Any]) -> DispatchCounter:
    """Run fn once under a DispatchCounter and return the counter (the result is dropped)."""
    with DispatchCounter() as c:
        fn()
    return c


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs start/stop lines to fd 2; keep them out of the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_cpu_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by fn on the CPU beyond what was live before: the running sum of the
    profiler's raw allocation and free events ("[memory]", signed sizes) in time order. Every
    allocation through c10's CPU allocator is reported (compiled and C++ code included, and
    fastsd's huge-page buffers, which report themselves the same way)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
