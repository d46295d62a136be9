"""A self-check of the benchmark's timing method (fastsd.bench.core.interleave and paired_ratio).

Two functions of known ratio, the same in-cache copy repeated n and 3n times, are timed by the old
method (each in its own block, one after the other) and by the interleaved one (one call of each
per round, the order rotated; the median of the per-round ratios). A burst of CPU-bound processes,
started and killed here, lands on the second half of the run: on the whole second block of the
sequential method, on the second half of the rounds of the interleaved one. The interleaved ratio
stays within 15 % of 3; the sequential one reads the burst as a slowdown of one function.

The test pins itself (one torch thread) and the burst to one CPU, so the burst weighs the same on a
2-core laptop and a 64-core server: three processes beside the timed thread leave it about a
quarter of that CPU, whatever else the machine runs.
"""
import contextlib
import os
import statistics
import time

import pytest
import torch

from fastsd.bench.core import cpu_load, interleave, measure, paired_ratio

# serial: no other test beside it (make test runs it after the parallel suite; the Makefile's SERIAL_TESTS)
pytestmark = [pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)"),
              pytest.mark.serial]

BURST = 3  # CPU-bound processes beside the timed thread on its CPU
ROUNDS = 16
CALL_S = 0.02  # about how long the shorter function takes on a quiet CPU


@contextlib.contextmanager
def one_cpu_one_thread():
    """This process on one CPU with one torch thread; both restored on exit."""
    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cpus)})
    torch.set_num_threads(1)
    try:
        yield min(cpus)
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def burst_on(cpu: int):
    """BURST CPU-bound processes on ``cpu`` (each ends by itself after a minute), killed on exit."""
    with cpu_load(BURST, limit_s=60) as procs:
        for p in procs:
            os.sched_setaffinity(p.pid, {cpu})
        time.sleep(0.2)  # let them start up and settle into their loops
        yield


def copies(k: int, reps: int):
    x = torch.ones(32 * 1024)  # 128 KiB: in cache, so time is work, not memory traffic
    y = torch.empty_like(x)

    def run():
        for _ in range(k * reps):
            y.copy_(x)
    return run


def test_interleaved_ratio_holds_under_a_load_burst_where_the_sequential_one_does_not():
    with one_cpu_one_thread() as cpu, contextlib.ExitStack() as load:
        t = min(measure(copies(1, 100), torch.device("cpu"), min_time=0.05))
        reps = max(10, round(100 * CALL_S / t))
        once, thrice = copies(1, reps), copies(3, reps)

        # the old method: one block each; the burst arrives with the second block
        first = measure(once, torch.device("cpu"), min_time=0, min_repeats=ROUNDS // 2, max_repeats=ROUNDS // 2)
        with burst_on(cpu):
            second = measure(thrice, torch.device("cpu"), min_time=0, min_repeats=ROUNDS // 2,
                             max_repeats=ROUNDS // 2)
        sequential = statistics.median(second) / statistics.median(first)

        # the interleaved method: the same burst arrives halfway through the rounds
        def on_round(r):
            if r == ROUNDS // 2:
                load.enter_context(burst_on(cpu))

        times = interleave({"once": once, "thrice": thrice}, torch.device("cpu"), min_time=0, min_rounds=ROUNDS,
                           max_rounds=ROUNDS, on_round=on_round)
        load.close()
    ratio, lo, hi = paired_ratio(times["thrice"], times["once"])
    loaded = statistics.median(times["once"][ROUNDS // 2:]) / statistics.median(times["once"][:ROUNDS // 2])
    note = (f"interleaved {ratio:.2f} ({lo:.2f}-{hi:.2f}), sequential {sequential:.2f}, truth 3; "
            f"the burst slowed each call {loaded:.1f}x")
    assert loaded > 1.5, "the burst did not load the timed CPU: " + note
    assert abs(ratio / 3 - 1) < 0.15, note
    assert abs(sequential / 3 - 1) > 0.15, note
