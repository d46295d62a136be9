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
   each named by its AOT spec. Each timed launch's compiled variant (the JIT's own binder on its
   arguments: signature, constexprs, divisibility attributes, options) finds its ``AOT_SPECS`` entry
   (:func:`match_spec`; "less aligned" where the spec was compiled knowing less alignment than the
   launch has, "no AOT spec" where none is that variant), and beside the measured time goes that
   spec's registers, occupancy and issue share and the model's time (:func:`predict`: the longer of
   the bytes at the device's bandwidth and the instructions its element path issues, scaled from the
   H100 model by the device's SMs and clock; no launch latency or tail, so a lower bound) with the
   measured time over it. ``tests/test_gpu_report.py`` checks that every launch of the GPU benchmark's
   patch swap and mix cases is exactly an AOT spec.
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
import math
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def variant_of(kernel, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The key (fastsd.kernels._aot.variant_key) of what the Triton JIT compiles for ``kernel[grid](*args, **kwargs)`` on
    sm_90 (fastsd.kernels._aot.launch_spec: the JIT's own binder; about 1 ms of host time a call).
    Options the JIT takes from elsewhere (``TRITON_DEBUG=1``) are not seen: fastsd's launchers pass
    theirs (``debug``) explicitly."""
    from ..kernels._aot import launch_spec, variant_key

    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}  # run()'s own, not the kernel's
    return variant_key(launch_spec("launch", kernel, args, kwargs))


def match_spec(variant: Optional[Dict[str, Any]], index: Dict[str, List[tuple]]) -> Tuple[Optional[str], Optional[bool]]:
    """(AOT spec name, exact) for a launch's variant: the spec compiled with the same function,
    signature, constexprs and options and the most of the launch's divisibility attributes, none it
    lacks; ``exact`` when it has them all (else it was compiled knowing less alignment than the launch
    has). (None, None) where no spec is such a variant."""
    if not variant:
        return None, None
    have = set(variant["attrs"])
    fits = [(len(attrs), name) for attrs, name in index.get(variant["base"], []) if attrs <= have]
    if not fits:
        return None, None
    n, name = max(fits)
    return name, n == len(have)


def aot_index() -> Dict[str, List[tuple]]:
    """``base`` of fastsd.kernels._aot.variant_key -> [(divisibility attributes, spec name)] of every
    ``AOT_SPECS`` entry of fastsd.kernels (what the static model compiles)."""
    from ..kernels._aot import variant_key
    from .sass import kernel_specs

    index: Dict[str, List[tuple]] = {}
    for spec in kernel_specs():
        key = variant_key(spec)
        index.setdefault(key["base"], []).append((frozenset(key["attrs"]), spec["name"]))
    return index


class KernelTimer:
    """A hook for :func:`fastsd.bench.launches.on_triton_launch`: a CUDA event pair around each launch,
    recorded behind a spin of the stream so that the host's launch overhead is not in the pair. Each
    launch's compiled variant (:func:`variant_of`) is found after the end event is recorded, outside
    the timed pair (its ~1 ms of host time would outlast the spin); where it cannot be (an older
    Triton's binder), the rows say why (``variant_error``)."""

    def __init__(self):
        self.launches: List[tuple] = []  # (kernel, variant's JSON, start event, end event, bytes)
        self.constexprs: Dict[tuple, Dict[str, Any]] = {}  # (kernel, variant's JSON) -> its launches' constants
        self.variant_error: Optional[str] = None  # the first reason a launch's variant was not found

    def __call__(self, name, args, kwargs, launch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(HIDE_LAUNCH_CYCLES)
        start.record()
        out = launch()
        end.record()
        try:
            variant = json.dumps(variant_of(getattr(launch, "kernel", None), args, kwargs), sort_keys=True)
        except Exception as exc:  # noqa: BLE001 - e.g. an older Triton's binder: the row says so
            variant = "null"
            self.variant_error = self.variant_error or f"{type(exc).__name__}: {exc}"
        self.launches.append((name, variant, start, end, _arg_bytes(args, kwargs)))
        self.constexprs.setdefault((name, variant), {k: v for k, v in kwargs.items()
                                                     if k.isupper() and isinstance(v, (bool, int, float, str))})
        return out

    def rows(self, calls: int, peak_gbps: Optional[float]) -> List[Dict[str, Any]]:
        """One row per kernel and compiled variant (after a synchronize): launches per call, median
        time and bytes per launch."""
        by_kernel: Dict[tuple, List[tuple]] = {}
        for name, variant, start, end, nbytes in self.launches:
            end.synchronize()
            by_kernel.setdefault((name, variant), []).append((start.elapsed_time(end) / 1e3, nbytes))
        rows = []
        for (name, variant), runs in by_kernel.items():
            seconds = statistics.median(t for t, _ in runs)
            nbytes = int(statistics.median(b for _, b in runs))
            gbps = nbytes / seconds / 1e9 if seconds > 0 else None
            rows.append({"kernel": name, "variant": json.loads(variant),
                         **({"variant_error": self.variant_error} if variant == "null" else {}),
                         "constexprs": self.constexprs[(name, variant)],
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


def device_machine(peak_gbps: Optional[float] = None):
    """The static model's machine (fastsd.bench.sass.Machine) for the current CUDA device: its SMs,
    clock and ``peak_gbps``, each from the device where it says (else the model's H100 figure)."""
    import dataclasses

    from .sass import H100

    props = torch.cuda.get_device_properties(torch.device("cuda"))
    sms = getattr(props, "multi_processor_count", None)
    khz = getattr(props, "clock_rate", None)
    return dataclasses.replace(H100, name=getattr(props, "name", H100.name),
                               bandwidth=peak_gbps * 1e9 if peak_gbps else H100.bandwidth,
                               sms=sms or H100.sms, clock=khz * 1e3 if khz else H100.clock)


def predict(entry: Dict[str, Any], nbytes: int, machine) -> Optional[Dict[str, Any]]:
    """The static model's time for a launch of ``entry``'s variant moving ``nbytes``: the longer of
    the bytes at the machine's bandwidth and the instructions its element path issues for them
    (``entry["issue"]``: a share of an H100's issue slots per byte; scaled by SMs x schedulers x clock).
    A lower bound: no launch latency, tail or occupancy."""
    from .sass import H100

    issue = entry.get("issue")
    if not isinstance(issue, (int, float)) or not math.isfinite(issue) or nbytes <= 0:
        return None
    memory = nbytes / machine.bandwidth
    rate = machine.sms * machine.schedulers * machine.clock
    issued = issue * nbytes / H100.bandwidth * (H100.sms * H100.schedulers * H100.clock) / rate
    return {"us": max(memory, issued) * 1e6, "bound": "issue" if issued > memory else "memory",
            "memory_us": memory * 1e6, "issue_us": issued * 1e6}


def join(kernel_cases: List[Dict[str, Any]], static: Dict[str, Any], index: Optional[Dict[str, List[tuple]]] = None,
         machine=None) -> Optional[str]:
    """Put beside each measured kernel the AOT spec its launch compiled (``spec``: None where the
    variant is no ``AOT_SPECS`` entry, a gap in what the AOT check and the static model read), that
    spec's static model row (``static``) and its prediction (``model``, :func:`predict` on
    ``machine``). Returns why the AOT specs could not be read, if they could not (else None)."""
    error = None
    if index is None:
        try:
            index = aot_index()
        except Exception as exc:  # noqa: BLE001 - reported, and every row's spec is None
            index, error = {}, f"AOT specs: {type(exc).__name__}: {exc}"
    entries = {e["name"]: e for e in static.get("entries", [])}
    for case in kernel_cases:
        for k in case.get("kernels", []):
            k["spec"], k["spec_exact"] = match_spec(k.get("variant"), index)
            k["static"] = entries.get(k["spec"])
            k["model"] = (predict(k["static"], k.get("bytes_per_launch", 0), machine)
                          if k["static"] and machine is not None else None)
    return error


def format_kernels(kernel_cases: List[Dict[str, Any]]) -> str:
    head = ["op", "case", "kernel", "launches", "us/launch", "MB/launch", "GB/s", "% peak", "spec (AOT)",
            "regs", "occ", "issue", "model us", "x model"]
    lines = []
    for case in kernel_cases:
        if "error" in case:
            lines.append([case["op"], case["case"], "-", "-", "-", "-", "-", "-", case["error"][:60]] + ["-"] * 5)
            continue
        for k in case["kernels"]:
            entry, model = k.get("static") or {}, k.get("model")
            lines.append([
                case["op"], case["case"], k["kernel"], f"{k['launches_per_call']:g}", f"{k['median_us']:.1f}",
                f"{k['bytes_per_launch'] / 2**20:.2f}", f"{k['gbps']:.0f}" if k["gbps"] else "-",
                f"{k['pct_peak']:.0f}%" if k["pct_peak"] else "-",
                (k["spec"] + ("" if k.get("spec_exact") else " (less aligned)")) if k.get("spec")
                else ("(no AOT spec)" if k.get("variant") else "(variant unknown)"),
                str(entry["regs"]) if entry.get("regs") is not None else "-",
                f"{entry['occupancy']:.0%}" if isinstance(entry.get("occupancy"), (int, float)) else "-",
                f"{entry['issue']:.0%}" if isinstance(entry.get("issue"), (int, float)) else "-",
                f"{model['us']:.1f} {model['bound']}" if model else "-",
                f"{k['median_us'] / model['us']:.1f}" if model and model["us"] > 0 else "-",
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
    machine = device_machine(peak)
    specs_error = join(report["kernels"], report["static_model"], machine=machine)
    if specs_error:
        report["aot_specs_error"] = specs_error
    report["model_machine"] = machine.describe()
    print("\nPer Triton kernel and compiled variant: median time per launch (CUDA events around each launch),")
    print("bytes of its tensor arguments, GB/s; beside it the AOT spec the launch compiled and the static")
    print("model's registers, occupancy, issue share and time (the longer of the bytes at the device's")
    print(f"bandwidth and the issued instructions; no launch latency or tail) on {machine.name}:")
    print(format_kernels(report["kernels"]))
    if "error" in report["static_model"]:
        print(f"(static model: {report['static_model']['error'].splitlines()[-1] if report['static_model']['error'] else ''})")
    if specs_error:
        print(f"({specs_error})")
    for why in sorted({k["variant_error"] for c in report["kernels"] for k in c.get("kernels", []) if "variant_error" in k}):
        print(f"(variant unknown: {why})")

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nGPU report: {args.json}")
    ok = (report["gpu_tests"].get("ok", False) and "error" not in report["bench"]
          and report["bench"].get("returncode", 1) == 0 and "error" not in report["static_model"]
          and not specs_error and not any("error" in c for c in report["kernels"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
