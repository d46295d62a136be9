"""``python -m fastsd.bench``: the microbenchmark and parity report.

For every op and case: each fastsd backend that can run here and the baselines, median time and
spread (IQR) over repeats, effective GB/s (minimum bytes / time) as a share of the device's
theoretical memory bandwidth on CUDA (of the measured copy bandwidth on CPU, or where the device
does not report its memory clock and bus width), speedups against the baselines, and max error
against the float64 reference.
All timings of one report come from one process, so the ratios compare like with like.
The table goes to stdout and, with the environment, to a JSON file.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from typing import List, Optional

import torch

from .core import Row, device_ops, measure, run_bench

SUITES = ("patch_swap", "losses", "icp", "train_step")
# Whole training steps of a ResNet-18 take seconds each on a CPU: --full or --ops train_step only.
QUICK_SUITES = ("patch_swap", "losses", "icp")


def _suite_modules(ops, quick: bool = True):
    mods = []
    for name in SUITES:
        if (ops and name not in ops) or (not ops and quick and name not in QUICK_SUITES):
            continue
        try:
            mods.append(importlib.import_module(f"fastsd.bench.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"fastsd.bench.{name}":
                raise
    return mods


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of y.copy_(x) on 64 MiB tensors (read + write): the memory limit of this machine.

    Into a buffer that already exists: a fresh 64 MiB output (x.clone()) would time glibc's mmap and
    one page fault per 4 KiB page on the CPU, several times slower than the memory itself."""
    from .core import measure

    x = torch.empty(16 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x).fill_(0.0)
    times = measure(lambda: y.copy_(x), device, min_time=0.2)
    return 2 * x.numel() * 4 / sorted(times)[len(times) // 2] / 1e9


def environment(device: torch.device) -> dict:
    ops = device_ops(device)
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": ops.name(),
        "peak_gbps": ops.peak_gbps(),  # theoretical memory bandwidth; None on CPU
        "commit": _commit(),
        # allocation settings that move CPU timings (page faults of fresh large buffers)
        "env": {k: os.environ.get(k) for k in ("FASTSD_HUGEPAGES", "THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS")},
    }
    for mod in ("triton", "torchvision"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except Exception:
            env[mod] = None
    from .. import _ext

    env["fastsd_C"] = _ext.load_error() or "loaded"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def format_table(rows: List[Row], copy_gbps: float, peak_gbps: Optional[float] = None) -> str:
    """The report's table; the % column is GB/s as a share of peak_gbps where given, else of copy_gbps."""
    ref_gbps, ref = (peak_gbps, "peak") if peak_gbps else (copy_gbps, "copy")
    vs = []
    for r in rows:
        for k in r.speedup:
            if k not in vs:
                vs.append(k)
    head = (["op", "case", "impl", "median ms", "IQR ms", "GB/s", f"% {ref}"] + [f"x vs {k}" for k in vs]
            + ["max err", "peak MB", "kernels", "moved MB"])
    lines = []
    for r in rows:
        lines.append([
            r.op, r.case, r.impl + ("" if r.kind == "backend" else "*"), f"{r.median_ms:.3f}", f"{r.iqr_ms:.3f}",
            f"{r.gbps:.1f}" if r.gbps else "-", f"{100 * r.gbps / ref_gbps:.0f}%" if r.gbps else "-",
        ] + [f"{r.speedup[k]:.2f}" if k in r.speedup else "-" for k in vs] + [
            f"{r.max_err:.2e}" if r.max_err is not None else "-",
            f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-",
            str(r.kernels) if r.kernels is not None else "-",
            f"{r.moved_mb:.1f}" if r.moved_mb is not None else "-",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    return "\n".join(out) + (
        "\n(* = baseline; x vs B = B's median time / this row's; GB/s = minimum bytes / median time;"
        + ("\n % peak = share of the device's theoretical memory bandwidth;" if ref == "peak" else
           "\n % copy = share of the measured copy bandwidth (y.copy_(x), 64 MiB);") +
        "\n peak MB = peak extra memory of one call; kernels, moved MB = aten ops dispatched by one eager call"
        "\n and the bytes of their inputs and outputs, a fastsd op counting as one kernel)")


def write_readme(path: str, env: dict, dtype: str, table: str) -> None:
    """Replace the text between <!-- bench:start --> and <!-- bench:end --> with this run's table."""
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    peak = f", theoretical peak {env['peak_gbps']:.0f} GB/s" if env.get("peak_gbps") else ""
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} section")
    body = (f"Measured by `make readme-bench` on {env['date'][:10]}: {env['device']} ({env['cpu']}, "
            f"{env['cores']} cores, {env['torch_threads']} torch threads), torch {env['torch']}, commit "
            f"{env['commit']}, {dtype}; copy bandwidth {env['copy_gbps']:.1f} GB/s{peak}.\n\n```\n{table}\n```")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{body}\n{end}{tail}")


def triton_traffic_rows():
    """Run the counted-traffic report in a subprocess with TRITON_INTERPRET=1 (it must be set before
    triton is imported); None, with the reason printed, when it cannot run."""
    import tempfile

    from .. import _backend

    if _backend.triton_import_error():
        print(f"\n(counted Triton traffic skipped: {_backend.triton_import_error()})")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "traffic.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-m", "fastsd.bench.triton_traffic", "--json", out], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"\n(counted Triton traffic failed: {proc.stderr.strip().splitlines()[-1:]})")
            return None
        with open(out) as f:
            return json.load(f)


def compare(rows: List[Row], old_path: str, threshold: float) -> int:
    """Print each row's time against an earlier run; 1 when any backend row regressed beyond threshold."""
    with open(old_path) as f:
        old = {(r["op"], r["case"], r["impl"]): r for r in json.load(f)["rows"]}
    worst = 1.0
    print(f"\ncompared with {old_path} (ratio = new / old median time; > {threshold:.2f} is a regression):")
    for r in rows:
        o = old.get((r.op, r.case, r.impl))
        if o is None:
            continue
        ratio = r.median_ms / o["median_ms"]
        flag = " REGRESSION" if ratio > threshold and r.kind == "backend" else ""
        if r.kind == "backend":
            worst = max(worst, ratio)
        print(f"  {r.op:<14} {r.case:<28} {r.impl:<12} {ratio:6.2f}{flag}")
    return 1 if worst > threshold else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short timings (default)")
    g.add_argument("--full", action="store_true", help="longer timings and every case")
    p.add_argument("--ops", nargs="*", help=f"suites to run (of {', '.join(SUITES)}; default: all with --full, "
                                             f"{', '.join(QUICK_SUITES)} otherwise)")
    p.add_argument("--backends", nargs="*", help="fastsd backends to time (default: all that can run)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="where to write the JSON report (default bench-results/bench-<device>.json)")
    p.add_argument("--compare", metavar="OLD.json", help="print ratios against an earlier report; exit 1 on a regression")
    p.add_argument("--threshold", type=float, default=1.25, help="regression threshold for --compare")
    p.add_argument("--plots", metavar="DIR", default=None,
                   help="write PNG plots here (default: beside the JSON report); --no-plots to skip")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-traffic", action="store_true",
                   help="skip the counted-bytes table (Triton under the interpreter vs eager dispatch)")
    p.add_argument("--readme", metavar="README.md",
                   help="also write the table, with the machine it ran on, between the bench markers of this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    min_time = 1.0 if args.full else 0.25

    env = environment(device)
    copy_gbps = copy_bandwidth(device)
    env["copy_gbps"] = copy_gbps
    print(f"fastsd.bench on {env['device']} ({env['cpu']}, {env['cores']} cores, torch threads "
          f"{env['torch_threads']}); torch {env['torch']}, commit {env['commit']}; {args.dtype}")
    print(f"measured copy bandwidth (y.copy_(x), 64 MiB): {copy_gbps:.1f} GB/s")
    settings = ", ".join(f"{k}={v}" for k, v in env["env"].items() if v is not None)
    if settings:
        print(f"environment: {settings}")
    if env["peak_gbps"]:
        print(f"theoretical memory bandwidth (2 x memory clock x bus width): {env['peak_gbps']:.0f} GB/s")
    print()

    benches = [b for m in _suite_modules(args.ops, quick=not args.full) for b in m.benches(device=device, dtype=dtype, quick=not args.full)]
    try:
        from tqdm import tqdm

        progress = tqdm(benches, desc="bench", unit="case", file=sys.stderr, leave=False)
    except ImportError:  # tqdm is optional
        progress = benches
    rows: List[Row] = []
    for b in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{b.op}: {b.case}")
        rows += run_bench(b, device, min_time=min_time, only=args.backends)

    table = format_table(rows, copy_gbps, env["peak_gbps"])
    print(table)
    traffic = None
    if not args.no_traffic:
        traffic = triton_traffic_rows()
        if traffic is not None:
            from .triton_traffic import format_rows

            print("\nBytes moved per call, counted: Triton kernels under the interpreter (every load and store)")
            print("against eager PyTorch (inputs and outputs of every aten op); min = each input read once,")
            print("each output written once. On a GPU, time ~ bytes / bandwidth: the GPU-side figure of this report.")
            print(format_rows(traffic))
            table += "\n\nCounted bytes per call (Triton under the interpreter vs eager dispatch):\n" + format_rows(traffic)
    path = args.json or os.path.join("bench-results", f"bench-{args.device}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "dtype": args.dtype, "rows": [dataclasses.asdict(r) for r in rows],
                   "traffic": traffic}, f, indent=1)
    print(f"\nJSON report: {path}")
    if not args.no_plots:
        from .plots import write_plots

        for png in write_plots(rows, args.plots or os.path.dirname(path) or ".", env, device, dtype):
            print(f"plot: {png}")
    if args.readme:
        write_readme(args.readme, env, args.dtype, table)
        print(f"benchmark section of {args.readme} regenerated")
    if args.compare:
        return compare(rows, args.compare, args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
