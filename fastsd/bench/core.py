"""The benchmark machinery shared by ``python -m fastsd.bench`` and the pytest-benchmark suites.

An op's benchmark module (fastsd/bench/<op>.py) defines ``benches(device, dtype, quick) -> [Bench]``.
A :class:`Bench` is one case: how to build its inputs, the fastsd backends that can run them, the
baselines, the float64 reference, the minimum bytes a pass must move, the issue's speed targets and
the lower bound no row can beat.

Timing is interleaved: the implementations of a case take turns, one call each per round, the order
rotated every round (:func:`interleave`), so a change in the machine's load lands on every row of
the round alike instead of on whichever row was being timed in its own block. A speedup is the
median over rounds of the paired ratio (baseline's time / this row's time in the same round) with a
bootstrap 95 % interval (:func:`median_ci`); the verdicts on targets and lower bounds are taken on
that interval, never on one number.

On the CPU the clock is a choice (``clock``): ``"cpu"``, this process's CPU time, for one torch
thread (the bench's default), where it is the work of the call whatever other processes run beside
it (the time they take from it is not counted); ``"wall"``, ``time.perf_counter``, for several
threads, where CPU time would add up every thread's work and spin-waits. On CUDA, CUDA events.
"""
from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

COPY = "copy"  # the implicit baseline of memory-bound cases: y.copy_(x) of the case's minimum bytes


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
    # The targets: baseline -> the least speedup the target rows must reach against it.
    targets: Dict[str, float] = field(default_factory=dict)
    target_rows: Optional[Sequence[str]] = None  # backends the targets are for (None: all but "torch")
    target_source: str = ""  # where the targets were set, e.g. "issue 2"
    max_peak_share: Dict[str, float] = field(default_factory=dict)  # baseline -> most peak memory, as a share
    # A lower bound: a baseline (or COPY) whose work every row also does, so no row can be faster.
    floor: Optional[str] = None
    floor_exempt: Sequence[str] = ()  # rows that skip part of the floor's work (a CUDA graph replay)
    eager: Optional[str] = None  # the plain-PyTorch baseline of the summary line
    compiled: Optional[str] = None  # the torch.compile baseline of the summary line
    note: str = ""

    @property
    def memory_bound(self) -> bool:
        return self.min_bytes > 0

    def info(self) -> dict:
        """What the report needs to know of the case beyond its rows (the JSON's ``cases``)."""
        return dict(op=self.op, case=self.case, min_bytes=self.min_bytes, speedup_vs=list(self.speedup_vs),
                    not_the_op=list(self.not_the_op), targets=dict(self.targets), target_source=self.target_source,
                    floor=self.floor, eager=self.eager, compiled=self.compiled, note=self.note)


@dataclass
class Row:
    op: str
    case: str
    impl: str
    kind: str  # "backend" or "baseline"
    median_ms: float
    ci_ms: Tuple[float, float]  # bootstrap 95 % interval of the median time
    rounds: int
    gbps: Optional[float]
    max_err: Optional[float]
    peak_mb: Optional[float] = None  # peak extra memory of one call
    kernels: Optional[int] = None  # kernels launched by one call (eager dispatch count; a fastsd op is one)
    moved_mb: Optional[float] = None  # bytes of those kernels' inputs and outputs: eager traffic
    speedup: Dict[str, float] = field(default_factory=dict)  # baseline -> median paired ratio
    speedup_ci: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # its bootstrap 95 % interval
    times_ms: List[float] = field(default_factory=list)  # every timed call, round by round


@dataclass
class Check:
    """One verdict of the report: a target (speedup >= bound), a lower bound (speedup against the
    floor <= 1) or a memory cap (peak <= bound x the baseline's), taken on the interval."""
    op: str
    case: str
    impl: str
    vs: str
    kind: str  # "target", "floor" or "memory"
    bound: float
    median: float
    lo: float
    hi: float
    status: str  # "met", "missed", "unsure" (the interval crosses the bound); floors: "ok", "faster"
    source: str = ""

    @property
    def flagged(self) -> bool:
        return self.status not in ("met", "ok")


CLOCKS = ("wall", "cpu")


class CPUOps:
    """Everything device-specific the bench does, for CPU tensors: timing on ``clock`` (wall or
    this process's CPU time), the profiler's allocation events for peak memory, and no
    theoretical bandwidth (the report compares with the measured copy bandwidth)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        if clock not in CLOCKS:
            raise ValueError(f"clock: one of {CLOCKS}, got {clock!r}")
        self.device = device
        self.clock = clock

    def sync(self) -> None:
        pass

    def time(self, fn: Callable[[], Any]) -> float:
        """Seconds one call of fn takes on the clock: wall time, or CPU time of the process (every
        thread's user and system time; with one torch thread, the call's own work)."""
        now = time.process_time if self.clock == "cpu" else time.perf_counter
        t0 = now()
        fn()
        return now() - t0

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


def device_ops(device, clock: str = "wall") -> CPUOps:
    """The device's timing and memory hooks; ``clock`` chooses the CPU's clock (CUDA: events)."""
    device = torch.device(device)
    return CUDAOps(device) if device.type == "cuda" else CPUOps(device, clock)


def timed_backends(op: str, device, dtype: Optional[torch.dtype] = None) -> List[str]:
    """The fastsd backends that can run op on device's tensors, less Triton on CPU tensors (the
    interpreter is for parity tests, not timings)."""
    from .. import _backend

    probe = torch.empty(0, device=device, dtype=dtype)
    return [b for b in _backend.available(op, probe) if not (b == "triton" and torch.device(device).type == "cpu")]


def _sync(device: torch.device):
    device_ops(device).sync()


def measure(fn: Callable[[], Any], device: torch.device, min_time: float = 0.3, min_repeats: int = 5,
            max_repeats: int = 200, clock: str = "wall") -> List[float]:
    """Times (seconds) of fn over repeats after one warm-up call; at least min_time in all. One
    function in its own block: for a figure that is compared with nothing timed beside it (the
    header's copy bandwidth). Implementations that are compared go through :func:`interleave`."""
    ops = device_ops(device, clock)
    fn()
    ops.sync()
    times: List[float] = []
    while len(times) < min_repeats or (sum(times) < min_time and len(times) < max_repeats):
        times.append(ops.time(fn))
    return times


def _repeated(fn: Callable[[], Any], k: int) -> Callable[[], None]:
    def run():
        for _ in range(k):
            fn()  # each result dropped before the next call, as in a loop of single calls
    return run


def interleave(fns: Dict[str, Callable[[], Any]], device, min_time: float = 0.25, min_rounds: int = 12,
               max_rounds: int = 200, warmup_rounds: int = 1, max_time: float = float("inf"), least_rounds: int = 5,
               min_sample: float = 0.0, on_round: Optional[Callable[[int], None]] = None,
               clock: str = "wall") -> Dict[str, List[float]]:
    """Seconds per call of every fn, timed in rounds: one sample of each per round, the order rotated
    by one each round (so none is always first after another's allocations, or last).

    A sample is one call, or, for a fn faster than ``min_sample``, as many calls back to back as
    make up ``min_sample`` (counted from one calibration call), divided by their number: a sample
    that spans several scheduler time slices is slowed by other processes in proportion to its
    length, as every row's sample of the round is, where a call shorter than a slice is either not
    preempted at all or preempted for a whole slice, which no pairing evens out.

    ``warmup_rounds`` untimed rounds first (the first call of a ``torch.compile``'d fn compiles).
    Then ``min_rounds`` rounds, fewer (``least_rounds`` at least) where the timed calls reach
    ``max_time`` first (slow cases), and more while they add up to less than ``min_time`` per fn
    (fast cases), up to ``max_rounds``. ``clock``: the CPU's clock (:class:`CPUOps`)."""
    ops = device_ops(device, clock)
    names = list(fns)
    for _ in range(warmup_rounds):
        for n in names:
            fns[n]()
        ops.sync()
    reps = {n: 1 for n in names}
    if min_sample > 0:
        for n in names:
            reps[n] = max(1, min(1000, math.ceil(min_sample / max(ops.time(fns[n]), 1e-9))))
    samples = {n: fns[n] if reps[n] == 1 else _repeated(fns[n], reps[n]) for n in names}
    times: Dict[str, List[float]] = {n: [] for n in names}
    spent = 0.0
    r = 0
    least_rounds = min(least_rounds, min_rounds)
    while (r < least_rounds or (r < min_rounds and spent < max_time)
           or (spent < min_time * len(names) and r < max_rounds)):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = ops.time(samples[n])
            times[n].append(t / reps[n])
            spent += t
        r += 1
        if on_round is not None:
            on_round(r)
    return times


def median_ci(samples, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Tuple[float, float, float]:
    """(median, lo, hi): the sample median and the percentile-bootstrap interval of the median at
    ``level``, from ``resamples`` draws with replacement (seeded: a report reads the same twice)."""
    x = np.asarray(samples, dtype=np.float64)
    med = float(np.median(x))
    if x.size < 2:
        return med, med, med
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    lo, hi = np.quantile(np.median(x[idx], axis=1), [(1 - level) / 2, (1 + level) / 2])
    return med, float(lo), float(hi)


def paired_ratio(num: Sequence[float], den: Sequence[float], **kw) -> Tuple[float, float, float]:
    """Median and bootstrap interval of num[r] / den[r] over rounds r: the speedup of den's
    implementation against num's, each round's two calls made under the same load."""
    return median_ci(np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64), **kw)


@contextlib.contextmanager
def cpu_load(processes: int, limit_s: float = 900.0) -> Iterator[List[subprocess.Popen]]:
    """``processes`` CPU-bound Python processes in the background, killed on exit. Each also ends
    by itself after ``limit_s`` seconds, so none outlives a run that is itself killed."""
    # Each says when it spins: the run starts under the load, not during the processes'
    # interpreter start-up.
    code = (f"import sys, time\nt = time.monotonic() + {limit_s}\nsys.stdout.write('1')\nsys.stdout.flush()\n"
            "while time.monotonic() < t: pass\n")
    procs: List[subprocess.Popen] = []
    try:
        for _ in range(processes):
            procs.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        for p in procs:
            p.stdout.read(1)
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()


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


def count_call(fn: Callable[[], Any]) -> Tuple[Optional[int], Optional[int]]:
    """(launches, bytes moved) of one call: the kernels it dispatches and the bytes of their inputs
    and outputs, from :mod:`fastsd.bench.traffic`'s eager dispatch count (a fastsd op counts as one
    kernel); (None, None) for compiled code. The launches column comes from the first element:
    another launch counter replaces it here, in one line."""
    counted = _count(fn)
    if counted is None:
        return None, None
    return counted.kernels, counted.bytes_moved


def _copy_fn(nbytes: int, inputs, device) -> Callable[[Any], Any]:
    """``y.copy_(x)`` into existing buffers, nbytes / 2 each way: the time the case's minimum traffic
    takes at the speed of a copy. The copy reads the case's own input tensors (in order, the last one
    cut to size), so it finds them as warm in cache as the rows do that read them in the same round;
    buffers of its own would have been evicted by the other rows in between."""
    from torch.utils._pytree import tree_flatten

    pairs, left = [], nbytes // 2
    for t in tree_flatten(inputs)[0]:
        if left <= 0:
            break
        if isinstance(t, torch.Tensor) and t.is_contiguous() and t.numel() and t.device == torch.device(device):
            src = t.detach().view(-1)[:max(1, left // t.element_size())]
            pairs.append((src, torch.empty_like(src)))
            left -= src.numel() * src.element_size()
    if left > 0:  # the inputs hold fewer bytes than the minimum (outputs larger than inputs)
        src = torch.ones(max(1, left // 4), dtype=torch.float32, device=device)
        pairs.append((src, torch.empty_like(src)))

    def copy(_inputs):
        for src, dst in pairs:
            dst.copy_(src)
    return copy


def implementations(bench: Bench, inputs, device, only: Optional[Sequence[str]] = None
                    ) -> List[Tuple[str, str, Callable]]:
    """(name, kind, fn(inputs)) of every row of the case: the baselines, the memory-bound cases' copy,
    then the fastsd backends (less those not in ``only``)."""
    impls = [(n, "baseline", f) for n, f in bench.baselines.items()]
    if bench.memory_bound and COPY not in bench.baselines:
        impls.append((COPY, "baseline", _copy_fn(bench.min_bytes, inputs, device)))
    impls += [(n, "backend", f) for n, f in bench.backends.items() if not only or n in only]
    return impls


def run_bench(bench: Bench, device: torch.device, min_time: float, only: Optional[Sequence[str]] = None,
              min_rounds: int = 12, max_rounds: int = 200, max_time: float = float("inf"), min_sample: float = 0.02,
              on_round=None, clock: str = "wall") -> List[Row]:
    """Every row of one case: the error, kernel count and peak memory of one call each (three calls
    that also warm every implementation up), then the interleaved timing and the paired speedups."""
    inputs = bench.setup()
    ref = bench.reference(inputs) if bench.reference is not None else None
    impls = implementations(bench, inputs, device, only)
    not_the_op = set(bench.not_the_op) | {COPY}
    extra = {}
    for name, kind, fn in impls:  # one call each first: these are also the first warm-up calls
        out = fn(inputs)  # the first call compiles (torch.compile) or captures (a CUDA graph): not counted
        counted_fn = bench.count_with.get(name, fn)
        launches, moved = count_call(lambda: counted_fn(inputs))
        extra[name] = dict(
            max_err=None if name in not_the_op else max_error(out, ref),
            peak_mb=_peak_mb(lambda: fn(inputs), device),
            kernels=launches, moved_mb=moved / 2**20 if moved is not None else None,
        )
        del out
    times = interleave({name: (lambda fn=fn: fn(inputs)) for name, _, fn in impls}, device, min_time=min_time,
                       min_rounds=min_rounds, max_rounds=max_rounds, warmup_rounds=0, max_time=max_time,
                       min_sample=min_sample, on_round=on_round, clock=clock)
    rows = []
    ratio_vs = list(dict.fromkeys(list(bench.speedup_vs) + [COPY] + ([bench.floor] if bench.floor else [])))
    for name, kind, _ in impls:
        med, lo, hi = median_ci(times[name])
        row = Row(op=bench.op, case=bench.case, impl=name, kind=kind, median_ms=med * 1e3,
                  ci_ms=(lo * 1e3, hi * 1e3), rounds=len(times[name]),
                  gbps=(bench.min_bytes / med / 1e9) if bench.memory_bound else None,
                  times_ms=[round(t * 1e3, 6) for t in times[name]], **extra[name])
        for b in ratio_vs if name != COPY else ():  # the copy is only a yardstick
            if b in times and b != name:
                m, lo, hi = paired_ratio(times[b], times[name])
                row.speedup[b], row.speedup_ci[b] = m, (lo, hi)
        rows.append(row)
    return rows


def checks(bench: Bench, rows: List[Row]) -> List[Check]:
    """The case's verdicts: each target row's speedup against each target (met: the whole interval
    at or above it; missed: the whole interval below; unsure: it crosses), every row against the
    floor (faster: the whole interval above 1, impossible for a true lower bound), and peak memory
    caps."""
    out: List[Check] = []
    by_impl = {r.impl: r for r in rows}
    target_rows = [r for r in rows if r.kind == "backend" and (
        r.impl in bench.target_rows if bench.target_rows is not None else r.impl != "torch")]
    for r in target_rows:
        for b, bound in bench.targets.items():
            if b not in r.speedup:
                continue
            m, (lo, hi) = r.speedup[b], r.speedup_ci[b]
            status = "met" if lo >= bound else "missed" if hi < bound else "unsure"
            out.append(Check(r.op, r.case, r.impl, b, "target", bound, m, lo, hi, status, bench.target_source))
        for b, share in bench.max_peak_share.items():
            if b in by_impl and r.peak_mb is not None and by_impl[b].peak_mb:
                v = r.peak_mb / by_impl[b].peak_mb  # measured, not timed: no interval
                out.append(Check(r.op, r.case, r.impl, b, "memory", share, v, v, v,
                                 "met" if v <= share else "missed", bench.target_source))
    if bench.floor:
        for r in rows:
            if r.impl == bench.floor or r.impl in bench.floor_exempt or bench.floor not in r.speedup:
                continue
            m, (lo, hi) = r.speedup[bench.floor], r.speedup_ci[bench.floor]
            out.append(Check(r.op, r.case, r.impl, bench.floor, "floor", 1.0, m, lo, hi,
                             "faster" if lo > 1.0 else "ok"))
    return out
