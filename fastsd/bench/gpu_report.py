"""``python -m fastsd.bench.gpu_report``: the day a GPU is lent, one command and one JSON file (issue 12;
``make gpu-report``).

1. **GPU tests**: ``pytest -m gpu`` in a subprocess with ``TRITON_INTERPRET=0`` (the compiled
   kernels: tests/conftest.py turns the interpreter on unless told otherwise); the counts and the
   names of the failures.
2. **Benchmark**: ``python -m fastsd.bench --device cuda``'s runner in this process; its JSON report.
3. **Per kernel**: every benchmark case's Triton call again, with a CUDA event pair around each
   Triton launch: the median time per launch, the bytes of its tensor arguments (each distinct tensor
   read or written once: the minimum a memory-bound kernel moves, as the benchmark's GB/s) and the
   GB/s and share of the device's theoretical bandwidth that make.
4. **Static model**: ``python -m fastsd.bench.sass --json`` in a subprocess (compiled-code costs from
   ptxas/cuobjdump, no GPU needed), its JSON on stdout: a list of entries (or ``{"kernels": [...]}``),
   each with a ``name`` and any predicted fields. An entry sits next to the measured kernel whose
   ``@triton.jit`` function it compiles: ``entry["kernel"]`` is that function's ``__name__``.
5. **Launches** per call of each case's Triton call (:func:`fastsd.bench.launches.count_launches`).

Everything goes to one JSON file (``--json``, default ``bench-results/gpu-report.json``); a table of
step 3 with the static entries beside it goes to stdout. Each step records its error instead of
stopping the report; the exit status is 1 when a GPU test failed or a step could not run.

``tests/test_gpu_report.py`` runs all of it here, through the fake CUDA layer of
tests/test_bench_cuda_path.py (the interpreter stands in for the GPU's kernels), so that on a GPU it
runs the first time.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten

from .core import device_ops

SUITES = ("patch_swap", "losses", "icp")
STATIC_MODEL = "fastsd.bench.sass"


def _error(exc: BaseException) -> Dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}


# --- 1. the GPU tests ----------------------------------------------------------------------------


def gpu_tests(paths: Sequence[str], timeout: float = 3600) -> Dict[str, Any]:
    """``pytest -m gpu paths`` in a subprocess: the counts from its JUnit XML and the failures."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *paths]
        # The compiled kernels, not the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 unless set).
        env = dict(os.environ, TRITON_INTERPRET="0")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        result: Dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                                  "tail": proc.stdout.strip().splitlines()[-3:]}
        if not os.path.exists(xml):
            result["error"] = (proc.stderr or proc.stdout).strip()[-2000:]
            return result
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for key in ("tests", "failures", "errors", "skipped"):
            result[key] = sum(int(s.get(key, 0)) for s in suites)
        result["passed"] = result["tests"] - result["failures"] - result["errors"] - result["skipped"]
        result["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
    # 5: no test selected (pytest's exit status), which is no failure
    result["ok"] = proc.returncode in (0, 5) and not result["failed"]
    return result


# --- 2. the benchmark ------------------------------------------------------------------------------


def bench(args: Sequence[str]) -> Dict[str, Any]:
    """``python -m fastsd.bench --device cuda *args`` in this process; its JSON report."""
    from . import __main__ as bench_main

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        status = bench_main.main(["--device", "cuda", "--no-plots", *args, "--json", path])
        with open(path) as f:
            report = json.load(f)
    report["returncode"] = status
    return report


# --- 3 and 5. per kernel, and launches per call ----------------------------------------------------


def _arg_bytes(args, kwargs) -> int:
    """Bytes of the distinct tensors among a launch's arguments (tuples of tensors included)."""
    seen, total = set(), 0
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor):
            key = (t.data_ptr(), t.numel(), t.element_size())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


# GPU clock cycles the stream spins before each timed launch (~0.5 ms at 1-2 GHz): the start event
# then waits on the GPU while the host runs the launcher, so the pair times the kernel, not the
# 20-80 us of Python a Triton launch costs (an H200 with Triton 3.6 showed 45-77 us for every small
# kernel, 6 MB or 0.2 MB alike, without it).
HIDE_LAUNCH_CYCLES = 1_000_000


class KernelTimer:
    """A hook for :func:`fastsd.bench.launches.on_triton_launch`: a CUDA event pair around each launch,
    recorded behind a spin of the stream so that the host's launch overhead is not in the pair."""

    def __init__(self):
        self.launches: List[tuple] = []  # (kernel, start event, end event, bytes)
        self.constexprs: Dict[str, Dict[str, Any]] = {}  # kernel -> its first launch's constants

    def __call__(self, name, args, kwargs, launch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(HIDE_LAUNCH_CYCLES)
        start.record()
        out = launch()
        end.record()
        self.launches.append((name, start, end, _arg_bytes(args, kwargs)))
        self.constexprs.setdefault(name, {k: v for k, v in kwargs.items()
                                          if k.isupper() and isinstance(v, (bool, int, float, str))})
        return out

    def rows(self, calls: int, peak_gbps: Optional[float]) -> List[Dict[str, Any]]:
        """One row per kernel (after a synchronize): launches per call, median time and bytes per launch."""
        by_kernel: Dict[str, List[tuple]] = {}
        for name, start, end, nbytes in self.launches:
            end.synchronize()
            by_kernel.setdefault(name, []).append((start.elapsed_time(end) / 1e3, nbytes))
        rows = []
        for name, runs in by_kernel.items():
            seconds = statistics.median(t for t, _ in runs)
            nbytes = int(statistics.median(b for _, b in runs))
            gbps = nbytes / seconds / 1e9 if seconds > 0 else None
            rows.append({"kernel": name, "constexprs": self.constexprs.get(name, {}),
                         "launches_per_call": len(runs) / calls, "median_us": seconds * 1e6,
                         "bytes_per_launch": nbytes, "gbps": gbps,
                         "pct_peak": 100 * gbps / peak_gbps if gbps and peak_gbps else None})
        return rows


def kernels(suites: Sequence[str], dtype: torch.dtype, repeats: int, peak_gbps: Optional[float]) -> List[Dict[str, Any]]:
    """Steps 3 and 5 for every case of the benchmark suites (``benches(device, dtype, quick)``) that
    has a Triton backend."""
    from .launches import count_launches, on_triton_launch

    device = torch.device("cuda")
    out = []
    for suite in suites:
        for case in importlib.import_module(f"fastsd.bench.{suite}").benches(device=device, dtype=dtype, quick=True):
            fn = case.backends.get("triton")
            if fn is None:
                continue
            row: Dict[str, Any] = {"op": case.op, "case": case.case}
            try:
                inputs = case.setup()
                fn(inputs)  # compile, warm up
                torch.cuda.synchronize()
                timer = KernelTimer()
                with on_triton_launch(timer):
                    for _ in range(repeats):
                        fn(inputs)
                row["kernels"] = timer.rows(repeats, peak_gbps)
                launches = count_launches(lambda: fn(inputs))
                row["launches"] = {k: launches[k] for k in ("forward", "backward", "total", "host_syncs", "ops")}
            except Exception as exc:  # one case's failure is reported, not fatal
                row.update(_error(exc))
            out.append(row)
    return out


# --- 4. the static model ---------------------------------------------------------------------------


def static_model(module: str = STATIC_MODEL, timeout: float = 3600) -> Dict[str, Any]:
    """``python -m <module> --json -``: its entries, or the error. ``module`` may instead be the path
    of a JSON file that module wrote earlier (``python -m fastsd.bench.sass --json PATH``, made on a
    machine without a GPU, so that the lease is not spent compiling)."""
    if module.endswith(".json"):
        try:
            with open(module) as f:
                return _static_entries({"command": f"read {module}", "returncode": 0}, f.read())
        except OSError as exc:
            return {"command": f"read {module}", **_error(exc)}
    cmd = [sys.executable, "-m", module, "--json", "-"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"command": " ".join(cmd[1:]), **_error(exc)}
    result: Dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode}
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout).strip()[-2000:]
        return result
    return _static_entries(result, proc.stdout)


def _static_entries(result: Dict[str, Any], text: str) -> Dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        result["error"] = f"not JSON ({exc}): {text[:200]!r}"
        return result
    entries = data.get("kernels") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
        result["error"] = "expected a list of {name, ...} entries (or {'kernels': [...]})"
        return result
    result["entries"] = entries
    return result


def join(kernel_cases: List[Dict[str, Any]], static: Dict[str, Any]) -> None:
    """Put beside each measured kernel the static entries that compile its jit function."""
    by_kernel: Dict[str, List[dict]] = {}
    for entry in static.get("entries", []):
        if entry.get("kernel"):
            by_kernel.setdefault(entry["kernel"], []).append(entry)
    for case in kernel_cases:
        for k in case.get("kernels", []):
            k["static"] = _variants(by_kernel.get(k["kernel"], []), k.get("constexprs") or {})


def _variants(entries: List[dict], launched: Dict[str, Any]) -> List[dict]:
    """The entries compiled with the constants the launch used (those both name agree); all of them
    where none does (a launch without keyword constants, or a spec set that misses the variant)."""
    same = [e for e in entries
            if all(launched[key] == value for key, value in (e.get("constexprs") or {}).items() if key in launched)
            and any(key in launched for key in (e.get("constexprs") or {}))]
    return same or entries


def _predicted(entry: dict) -> str:
    fields = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
              if k not in ("name", "kernel") and isinstance(v, (int, float, str))][:4]
    return f"{entry['name']} ({', '.join(fields)})" if fields else entry["name"]


def format_kernels(kernel_cases: List[Dict[str, Any]]) -> str:
    head = ["op", "case", "kernel", "launches", "us/launch", "MB/launch", "GB/s", "% peak", "static model"]
    lines = []
    for case in kernel_cases:
        if "error" in case:
            lines.append([case["op"], case["case"], "-", "-", "-", "-", "-", "-", case["error"][:60]])
            continue
        for k in case["kernels"]:
            static = k.get("static") or []
            lines.append([
                case["op"], case["case"], k["kernel"], f"{k['launches_per_call']:g}", f"{k['median_us']:.1f}",
                f"{k['bytes_per_launch'] / 2**20:.2f}", f"{k['gbps']:.0f}" if k["gbps"] else "-",
                f"{k['pct_peak']:.0f}%" if k["pct_peak"] else "-",
                "; ".join(_predicted(e) for e in static[:2]) + (f" (+{len(static) - 2})" if len(static) > 2 else ""),
            ])
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


# --- the command -------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench.gpu_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join("bench-results", "gpu-report.json"), help="the report")
    p.add_argument("--tests", nargs="*", default=["tests"], help="paths for pytest -m gpu (none: skip the tests)")
    p.add_argument("--bench-args", nargs=argparse.REMAINDER, default=[],
                   help="more arguments for python -m fastsd.bench (last on the line)")
    p.add_argument("--suites", nargs="*", default=list(SUITES), help="benchmark suites timed per kernel")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20, help="calls per case timed per kernel")
    p.add_argument("--static-model", default=STATIC_MODEL,
                   help="module printing the static model's JSON, or a .json file it wrote earlier")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "static"],
                   help="steps to leave out (a short lease: run them as separate, time-boxed commands)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (torch.cuda.is_available() is False)")

    report: Dict[str, Any] = {}
    skipped = {"skipped": "--skip", "ok": True, "returncode": 0}
    if "tests" in args.skip or not args.tests:
        report["gpu_tests"] = skipped
    else:
        report["gpu_tests"] = gpu_tests(args.tests)
    print(f"gpu tests: {report['gpu_tests'].get('tail') or report['gpu_tests']}")
    peak = device_ops(torch.device("cuda")).peak_gbps()
    if "bench" in args.skip:
        report["bench"] = skipped
    else:
        try:
            report["bench"] = bench(args.bench_args)
            report["environment"] = report["bench"].get("environment")
            peak = (report["environment"] or {}).get("peak_gbps", peak)
        except BaseException as exc:  # SystemExit of argparse included: the report is still written
            report["bench"] = _error(exc)
    report["kernels"] = kernels(args.suites, getattr(torch, args.dtype), args.repeats, peak)
    report["static_model"] = {"skipped": "--skip"} if "static" in args.skip else static_model(args.static_model)
    join(report["kernels"], report["static_model"])
    print("\nPer Triton kernel: median time per launch (CUDA events around each launch), bytes of its tensor")
    print("arguments, GB/s; beside it, the static model's entries for the same jit function:")
    print(format_kernels(report["kernels"]))
    if "error" in report["static_model"]:
        print(f"(static model: {report['static_model']['error'].splitlines()[-1] if report['static_model']['error'] else ''})")

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nGPU report: {args.json}")
    ok = (report["gpu_tests"].get("ok", False) and "error" not in report["bench"]
          and report["bench"].get("returncode", 1) == 0 and "error" not in report["static_model"]
          and not any("error" in c for c in report["kernels"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
