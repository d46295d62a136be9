"""The benchmark machinery shared by ``python -m fastsd.bench`` and the pytest-benchmark suites.

An op's benchmark module (fastsd/bench/<op>.py) defines ``benches(device, dtype, quick) -> [Bench]``.
A :class:`Bench` is one case: how to build its inputs, the fastsd backends that can run them, the
baselines, the float64 reference, and the minimum bytes a pass must move. The runner times every
implementation in one process, one after the other, so the ratios it prints compare like with like.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


@dataclass
class Bench:
    op: str
    case: str
    setup: Callable[[], Any]  # -> inputs, passed to every implementation
    backends: Dict[str, Callable[[Any], Any]]  # fastsd backend name -> fn(inputs)
    baselines: Dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # name -> fn(inputs)
    reference: Optional[Callable[[Any], Any]] = None  # fn(inputs) -> float64 result for the error column
    min_bytes: int = 0  # every input byte read once and every output byte written once
    speedup_vs: Sequence[str] = ()  # baselines the speedup columns are taken against
    # impl -> fn(inputs) to count kernels and bytes with, where the impl hides its ops (the torch
    # backend runs the reference inside one custom op: count the reference itself)
    count_with: Dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    not_the_op: Sequence[str] = ()  # baselines that compute something else (e.g. a copy): no error column
    note: str = ""


@dataclass
class Row:
    op: str
    case: str
    impl: str
    kind: str  # "backend" or "baseline"
    median_ms: float
    iqr_ms: float
    gbps: Optional[float]
    max_err: Optional[float]
    peak_mb: Optional[float] = None  # peak extra memory of one call
    kernels: Optional[int] = None  # aten ops dispatched by one call (a fastsd op counts as one)
    moved_mb: Optional[float] = None  # bytes of those ops' inputs and outputs: eager traffic
    speedup: Dict[str, float] = field(default_factory=dict)


class CPUOps:
    """Everything device-specific the bench does, for CPU tensors: wall-clock timing, the
    profiler's allocation events for peak memory, and no theoretical bandwidth (the report
    compares with the measured copy bandwidth)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        pass

    def time(self, fn: Callable[[], Any]) -> float:
        """Seconds one call of fn takes."""
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def peak_bytes(self, fn: Callable[[], Any]) -> int:
        """Peak memory one call of fn allocates beyond what was live before."""
        from .traffic import peak_cpu_memory

        return peak_cpu_memory(fn)

    def name(self) -> str:
        return "cpu"

    def peak_gbps(self) -> Optional[float]:
        """The device's theoretical memory bandwidth; None where unknown."""
        return None


class CUDAOps(CPUOps):
    """The same for CUDA tensors: CUDA events, the caching allocator's peak counter, and the
    theoretical bandwidth from the device's properties (double data rate x memory clock x bus width)."""

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def peak_bytes(self, fn: Callable[[], Any]) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - base

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def peak_gbps(self) -> Optional[float]:
        props = torch.cuda.get_device_properties(self.device)
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def device_ops(device) -> CPUOps:
    device = torch.device(device)
    return CUDAOps(device) if device.type == "cuda" else CPUOps(device)


def timed_backends(op: str, device, dtype: Optional[torch.dtype] = None) -> List[str]:
    """The fastsd backends that can run op on device's tensors, less Triton on CPU tensors (the
    interpreter is for parity tests, not timings)."""
    from .. import _backend

    probe = torch.empty(0, device=device, dtype=dtype)
    return [b for b in _backend.available(op, probe) if not (b == "triton" and torch.device(device).type == "cpu")]


def _sync(device: torch.device):
    device_ops(device).sync()


def measure(fn: Callable[[], Any], device: torch.device, min_time: float = 0.3, min_repeats: int = 5,
            max_repeats: int = 200) -> List[float]:
    """Times (seconds) of fn over repeats after one warm-up call; at least min_time in all."""
    ops = device_ops(device)
    fn()
    ops.sync()
    times: List[float] = []
    while len(times) < min_repeats or (sum(times) < min_time and len(times) < max_repeats):
        times.append(ops.time(fn))
    return times


def max_error(out, ref) -> Optional[float]:
    """Largest absolute difference over the (possibly nested) results, in float64."""
    if ref is None or out is None:
        return None
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
        ref = [ref[k] for k in sorted(ref)]
    if isinstance(out, (tuple, list)):
        errs = [max_error(o, r) for o, r in zip(out, ref)]
        errs = [e for e in errs if e is not None]
        return max(errs) if errs else None
    if not isinstance(out, torch.Tensor):
        return None
    if out.numel() == 0:
        return 0.0
    return float((out.detach().double() - ref.detach().double().to(out.device)).abs().max())


def _peak_mb(fn, device: torch.device) -> Optional[float]:
    return device_ops(device).peak_bytes(fn) / 2**20


def _count(fn):
    """Eager dispatch count of one call; None where the call is compiled (dynamo does its own dispatch)."""
    from .traffic import count

    try:
        return count(fn)
    except Exception:  # torch.compile'd callables refuse to run under a dispatch mode
        return None


def run_bench(bench: Bench, device: torch.device, min_time: float, only: Optional[Sequence[str]] = None) -> List[Row]:
    inputs = bench.setup()
    ref = bench.reference(inputs) if bench.reference is not None else None
    impls = [(n, "baseline", f) for n, f in bench.baselines.items()] + [
        (n, "backend", f) for n, f in bench.backends.items()
    ]
    rows = []
    for name, kind, fn in impls:
        if only and kind == "backend" and name not in only:
            continue
        times = measure(lambda: fn(inputs), device, min_time=min_time)
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 4 else [med, med, med]
        out = fn(inputs)
        counted = _count(lambda: bench.count_with.get(name, fn)(inputs))
        rows.append(Row(
            op=bench.op, case=bench.case, impl=name, kind=kind, median_ms=med * 1e3, iqr_ms=(q[2] - q[0]) * 1e3,
            gbps=(bench.min_bytes / med / 1e9) if bench.min_bytes else None,
            max_err=None if name in bench.not_the_op else max_error(out, ref), peak_mb=_peak_mb(lambda: fn(inputs), device),
            kernels=counted.kernels if counted else None, moved_mb=counted.bytes_moved / 2**20 if counted else None,
        ))
    by_name = {r.impl: r for r in rows}
    for r in rows:
        for b in bench.speedup_vs:
            if b in by_name and b != r.impl:
                r.speedup[b] = by_name[b].median_ms / r.median_ms
    return rows
