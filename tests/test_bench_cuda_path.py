"""The benchmark's CUDA path (``python -m fastsd.bench --device cuda``), run on a machine without a GPU.

The runner is driven unchanged through ``main([... "--device", "cuda" ...])`` with a fake CUDA layer:
the ``torch.cuda`` primitives the bench and ``ICPRefiner``'s graph path call (events, synchronize,
the allocator's counters, device name and properties, streams, graphs) are stand-ins, and tensors
asked for on "cuda" are made on the CPU. So the CUDA branches of fastsd.bench (CUDAOps: event timing
of every call of the interleaved rounds, max_memory_allocated, the theoretical bandwidth and the
"% peak" column; the Triton rows, which the interpreter runs; the CUDA-graph ICP row) run here as
they do on a GPU; only the primitives differ.

The stand-in graph (``fake_cuda.FakeGraph``) records the aten ops run between ``capture_begin()``
and ``capture_end()`` with the tensors they read and wrote, and ``replay()`` re-runs those ops on the
same tensors, writing each result into the captured output's memory: a CUDA graph's semantics (fixed
addresses, no Python re-run, a host read inside the capture is an error), so the graph row's error
column checks the captured refinement.
"""
import contextlib
import json
import time
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from fake_cuda import FakeGraph
from fastsd import _backend
from fastsd import icp as icp_module
from fastsd.bench import __main__ as bench_main
from fastsd.bench import icp as icp_bench
from fastsd.bench import losses as losses_bench
from fastsd.bench import patch_swap as patch_swap_bench
from fastsd.bench import report
from fastsd.bench.cases import PatchSwapCase
from fastsd.bench.core import device_ops

MIB = 2**20
PEAK_EXTRA = 3 * MIB  # what the fake allocator reports as one call's peak extra memory
PROPS = types.SimpleNamespace(name="Fake H100", memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits
PEAK_GBPS = 2 * 2_619_000e3 * 5120 / 8 / 1e9

pytestmark = [
    pytest.mark.skipif(bool(_backend.triton_import_error()) or not _backend.triton_interpreting(),
                       reason="the Triton rows need the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)"),
]


class FakeEvent:
    made = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        FakeEvent.made += 1

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):  # milliseconds, as CUDA events
        return (end.t - self.t) * 1e3


class FakeAllocator:
    def __init__(self):
        self.allocated, self.peak = 5 * MIB, 5 * MIB

    def reset_peak_memory_stats(self, device=None):
        self.peak = self.allocated + PEAK_EXTRA

    def memory_allocated(self, device=None):
        return self.allocated

    def max_memory_allocated(self, device=None):
        return self.peak


class FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass

    def is_capturing(self):
        return False


class CudaOnCPU(TorchFunctionMode):
    """Tensors asked for on "cuda" are made on the CPU."""

    @staticmethod
    def _cpu(a):
        if isinstance(a, torch.device) and a.type == "cuda" or isinstance(a, str) and a.split(":")[0] == "cuda":
            return torch.device("cpu")
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:  # a device is only a name: "cuda" stays "cuda"
            return func(*args, **(kwargs or {}))
        return func(*tree_map(self._cpu, args), **tree_map(self._cpu, kwargs or {}))


class CPUGenerator(torch.Generator):
    def __new__(cls, device="cpu"):
        return super().__new__(cls, "cpu")

    def __init__(self, device="cpu"):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    alloc = FakeAllocator()
    for name, value in dict(
        is_available=lambda: True, synchronize=lambda device=None: None, Event=FakeEvent,
        get_device_name=lambda device=None: PROPS.name, get_device_properties=lambda device=None: PROPS,
        reset_peak_memory_stats=alloc.reset_peak_memory_stats, memory_allocated=alloc.memory_allocated,
        max_memory_allocated=alloc.max_memory_allocated, Stream=FakeStream,
        current_stream=lambda device=None: FakeStream(), stream=lambda s: contextlib.nullcontext(),
        CUDAGraph=FakeGraph, graph_pool_handle=lambda: (0, 1), _sleep=lambda cycles: None,
    ).items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(icp_module, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: FakeStream())  # torch.optim asks
    monkeypatch.setattr(torch, "Generator", CPUGenerator)
    FakeEvent.made = FakeGraph.captures = FakeGraph.replays = 0
    with CudaOnCPU():
        yield


def test_cuda_run_of_the_runner(fake_cuda, monkeypatch, tmp_path, capsys):
    # Small cases: the Triton rows run under the interpreter.
    monkeypatch.setattr(patch_swap_bench, "PATCH_SWAP_BENCH", [PatchSwapCase("8x3x16x16", (8, 3, 16, 16), (4, 4))])
    # and the CUDA-only case (cells of 2-3 px: the Triton kernel's EACH variant), as small
    monkeypatch.setattr(patch_swap_bench, "PATCH_SWAP_GPU_BENCH", [PatchSwapCase("8x3x16x16 grid 6x6", (8, 3, 16, 16), (6, 6))])
    monkeypatch.setattr(icp_bench, "ICP_BENCH", [icp_bench.ICPCase("small_cnn_b4_k5", icp_bench.SmallCNN, batch=4)])
    monkeypatch.setattr(losses_bench, "benches", lambda device, dtype, quick: [
        losses_bench.pair_kd_bench(8, 10, device, dtype),
        losses_bench.feature_bench("tiny", [(2, 4, 4, 4), (2, 8, 2, 2)], "mse", device, dtype)])
    # torch.compile takes tens of seconds per baseline on a CPU and is not on the CUDA path of the bench.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    # ICPRefiner takes its graph path for CUDA tensors only (x.device.type); these live on the CPU.
    monkeypatch.setattr(icp_module.ICPRefiner, "_use_graph", lambda self, x: self.cuda_graph != "never")

    out = tmp_path / "bench.json"
    assert bench_main.main(["--device", "cuda", "--ops", "patch_swap", "losses", "icp", "--no-plots",
                            "--no-traffic", "--rounds", "6", "--min-time", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    text = capsys.readouterr().out

    env = report["environment"]
    assert env["device"] == "Fake H100" and env["peak_gbps"] == pytest.approx(PEAK_GBPS)
    # the share of the theoretical bandwidth beside the share of a copy of the same bytes
    assert "% peak" in text and "% copy" in text and f"{PEAK_GBPS:.0f} GB/s" in text
    rows = {(r["op"], r["impl"]): r for r in report["rows"]}
    assert {op for op, _ in rows} == {"patch_swap", "pair_kd_loss", "feature_alignment_loss", "icp"}
    for op in ("patch_swap", "pair_kd_loss", "feature_alignment_loss", "icp"):
        assert (op, "triton") in rows  # the interpreter stands in for the GPU's compiled kernels
    for r in report["rows"]:
        assert r["median_ms"] > 0 and r["peak_mb"] == PEAK_EXTRA / MIB  # CUDA events, the allocator's counters
        assert r["max_err"] is None or r["max_err"] < 1e-4, r
    ps = rows["patch_swap", "triton"]
    assert ps["gbps"] == pytest.approx(8 * 3 * 16 * 16 * 4 * 2 / ps["median_ms"] / 1e6)
    # Every timing went through events: two per call, one call per row and round (5 or 6 rounds: a
    # case whose calls add up to 5 s stops at 5), and the header's copy bandwidth.
    assert all(r["rounds"] in (5, 6) for r in report["rows"])
    assert FakeEvent.made >= 2 * sum(r["rounds"] for r in report["rows"])
    assert {r["impl"] for r in report["rows"] if r["op"] == "patch_swap"} >= {"copy", "triton"}
    assert {r["case"] for r in report["rows"] if r["op"] == "patch_swap"} == {"8x3x16x16", "8x3x16x16 grid 6x6"}

    # The CUDA-graph row: captured once, then replayed; the same refinement as eager.
    graph = rows["icp", "graph"]
    assert FakeGraph.captures == 1 and FakeGraph.replays >= 9  # count, error, peak, warm-up, 6 rounds
    assert graph["kernels"] == 3  # x and y copied in, the result copied out: the replay is no aten op
    assert graph["max_err"] == pytest.approx(rows["icp", "torch"]["max_err"], rel=1e-3, abs=1e-7)
    assert set(graph["speedup"]) == {"bare_fwd_grad", "optim_adam"}
    # The bench times one input; a replay follows new values in the captured input, as a graph's does.
    bench = icp_bench.bench_case(icp_bench.ICP_BENCH[0], "cuda", torch.float32)
    model, x, y = bench.setup()
    bench.backends["graph"]((model, x, y))
    x2 = torch.randn_like(x)
    torch.testing.assert_close(bench.backends["graph"]((model, x2, y)), bench.backends["torch"]((model, x2, y)))


def test_cuda_bandwidth_falls_back_to_copy_without_memory_clock(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(name="X"))
    assert device_ops("cuda").peak_gbps() is None
    row = dict(op="patch_swap", case="c", impl="triton", kind="backend", median_ms=1.0, ci_ms=(0.9, 1.1), gbps=5.0,
               max_err=0.0, peak_mb=1.0, kernels=1, moved_mb=1.0, speedup={"copy": 0.5},
               speedup_ci={"copy": (0.4, 0.6)})
    assert "% peak" in report.op_table("patch_swap", [row], [], peak_gbps=100.0)
    text = report.op_table("patch_swap", [row], [], peak_gbps=device_ops("cuda").peak_gbps())
    assert "% copy" in text and "50%" in text and "% peak" not in text
