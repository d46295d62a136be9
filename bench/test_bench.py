"""pytest-benchmark suites: the same cases as ``python -m fastsd.bench`` (one case table, no copy).

    .venv/bin/python -m pytest bench/
    FASTSD_BENCH_FULL=1 .venv/bin/python -m pytest bench/    # also the whole-training-step suite

Each (op, case) is a group; its rows are the fastsd backends that can run here and the baselines.
"""
import os

import pytest
import torch

from fastsd.bench.__main__ import _suite_modules

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("FASTSD_BENCH_FULL") == "1"
BENCHES = [b for m in _suite_modules(None, quick=not FULL)
           for b in m.benches(device=DEVICE, dtype=torch.float32, quick=not FULL)]
PARAMS = [
    pytest.param(b, name, fn, id=f"{b.op}[{b.case}]-{name}")
    for b in BENCHES
    for name, fn in list(b.baselines.items()) + list(b.backends.items())
]


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


@pytest.mark.parametrize("bench,impl,fn", PARAMS)
def test_bench(benchmark, bench, impl, fn, inputs_cache):
    key = (bench.op, bench.case)
    if key not in inputs_cache:
        inputs_cache.clear()  # keep one case's inputs alive at a time
        inputs_cache[key] = bench.setup()
    inputs = inputs_cache[key]
    benchmark.group = f"{bench.op}: {bench.case}"
    benchmark.extra_info["min_bytes"] = bench.min_bytes
    if DEVICE.type == "cuda":
        def run():
            fn(inputs)
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn, inputs)
