"""``python -m fastsd.bench``: the microbenchmark and parity report.

For every op and case, each fastsd backend that can run here and the baselines take turns: one
call of each per round, the order rotated every round, so a change in the machine's load lands on
every row alike (fastsd.bench.core). The report has one table per op with the columns that op has:
median time and its 95 % interval, effective GB/s (minimum bytes / time) and its share of a copy of
the same bytes timed in the same rounds, each speedup as the median of the per-round paired ratios
with its bootstrap 95 % interval, max error against the float64 reference, peak memory, and the
kernels and bytes of one call. The issue's targets and each op's lower bound are checked on the
intervals. A summary line per op, the JSON report, plots, and optionally the README section follow.

On the CPU the run uses one torch thread and times the process's CPU time (set_threads), which
leaves out the time other processes take, so a busy machine moves the speedups little;
``--threads N`` times N threads on the wall clock.

``--compare OLD.json`` compares this run's speedups with an earlier report's; with two files,
``--compare A.json B.json`` compares two saved reports without running anything.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import textwrap
import time
import warnings
from typing import List, Optional, Tuple

import torch

from . import report as R
from .core import Row, checks, cpu_load, device_ops, run_bench

SUITES = ("patch_swap", "losses", "icp", "train_step", "mix")
# Whole training steps of a ResNet-18 take seconds each on a CPU: --full or --ops train_step only.
QUICK_SUITES = ("patch_swap", "losses", "icp")
README_PLOTS = os.path.join("docs", "bench")  # beside the README: the plots its section shows


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


def copy_bandwidth(device: torch.device, clock: str = "wall") -> float:
    """GB/s of y.copy_(x) on 64 MiB tensors (read + write): the memory limit of this machine, for
    the header (each case's % copy is against a copy of its own bytes, timed in its rounds).

    Into a buffer that already exists: a fresh 64 MiB output (x.clone()) would time glibc's mmap and
    one page fault per 4 KiB page on the CPU, several times slower than the memory itself."""
    from .core import measure

    x = torch.empty(16 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x).fill_(0.0)
    times = measure(lambda: y.copy_(x), device, min_time=0.2, clock=clock)
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
        "loadavg": _loadavg(),  # the 1-minute load average when the run started
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


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


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


def machine_line(env: dict) -> str:
    load = f"; load average {env['loadavg']:.2f}" if env.get("loadavg") is not None else ""
    clock = f", {CLOCK_NAMES[env['clock']]}" if env.get("clock") in CLOCK_NAMES else ""
    threads = f"{env['torch_threads']} torch thread{'s' if env['torch_threads'] != 1 else ''}"
    return (f"{env['device']} ({env['cpu']}, {env['cores']} cores, {threads}{clock}{load}), "
            f"torch {env['torch']}, commit {env['commit']}")


def write_readme(path: str, report: dict, plots: List[str], json_path: Optional[str] = None) -> None:
    """Replace the text between <!-- bench:start --> and <!-- bench:end --> with this run's summary,
    per-op tables, counted-bytes table and plots (paths relative to the README), and name the JSON
    report kept beside it (``json_path``), which ``--compare`` checks a later run against."""
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    env = report["environment"]
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} section")
    peak = f", theoretical peak {env['peak_gbps']:.0f} GB/s" if env.get("peak_gbps") else ""
    runtime = f" in {report['runtime_s']:.0f} s" if report.get("runtime_s") else ""
    body = [f"Measured by `make readme-bench` on {env['date'][:10]}{runtime}: {machine_line(env)}, "
            f"{report['dtype']}; copy bandwidth (64 MiB) {env['copy_gbps']:.1f} GB/s{peak}. "
            f"Best row of each case in bold; `*` marks a baseline."
            + (f" The run's report is [{json_path}]({json_path}): `python -m fastsd.bench --quick --compare "
               f"{json_path}` checks a checkout against it on the intervals (exit 1 on a regression)."
               if json_path else ""),
            R.markdown_tables(report)]
    if report.get("traffic"):
        from .triton_traffic import format_rows

        body.append("#### Counted bytes per call\n\nTriton kernels under the interpreter (every load and store) "
                    "against eager PyTorch (inputs and outputs of every aten op); min = each input read once, each "
                    f"output written once.\n\n```\n{format_rows(report['traffic'])}\n```")
    if plots:
        body.append("#### Plots\n\n" + "\n".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots))
    body.append(textwrap.fill(R.LEGEND.replace("* = baseline", "`*` = baseline", 1), 100))
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(head + start + "\n" + "\n\n".join(body) + "\n" + end + tail)


def triton_traffic_rows():
    """Run the counted-traffic report in a subprocess with TRITON_INTERPRET=1 (it must be set before
    triton is imported); None, with the reason printed, when it cannot run."""
    import tempfile

    from .. import _backend

    why = _backend.triton_import_error() or _backend.triton_interpreter_error()
    if why:
        print(f"\n(counted Triton traffic skipped: {why})")
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


def compare(report: dict, old_path: str, threshold: float) -> int:
    """Print this report's speedups against an earlier one's; 1 when one regressed (on the intervals)."""
    with open(old_path) as f:
        old = json.load(f)
    text, code = R.compare_reports(old, report, threshold)
    print(f"\ncompared with {old_path}:\n{text}")
    return code


@contextlib.contextmanager
def _notes_aside(notes: List[str]):
    """Warnings and torch's extension-loader log lines (e.g. "No CUDA runtime is found", logged when
    torch.compile first loads its C++ toolchain) are kept for after the tables, not printed into the
    progress bar."""
    loggers = [logging.getLogger(n) for n in ("torch.utils.cpp_extension", "torch._inductor")]

    class Keep(logging.Handler):
        def emit(self, record):
            notes.append(f"{record.name}: {record.getMessage()}")

    handler, saved = Keep(logging.WARNING), [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
        notes += [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        for lg, propagate in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate


def run(benches, device, args, min_time: float, min_rounds: int, max_time: float, clock: str = "wall"):
    """Rows, checks and case infos (with the load average after each) of every bench, behind a
    progress bar on stderr."""
    try:
        from tqdm import tqdm

        progress = tqdm(benches, desc="bench", unit="case", file=sys.stderr, leave=False)
    except ImportError:  # tqdm is optional
        progress = benches
    rows: List[Row] = []
    found, infos = [], []
    for b in progress:
        def on_round(r, b=b):
            if hasattr(progress, "set_postfix_str"):
                progress.set_postfix_str(f"{b.op}: {b.case} (round {r})", refresh=False)

        on_round(0)
        case_rows = run_bench(b, device, min_time=min_time, only=args.backends, min_rounds=min_rounds,
                              max_time=max_time, on_round=on_round, clock=clock)
        rows += case_rows
        found += checks(b, case_rows)
        infos.append(dict(b.info(), loadavg=_loadavg()))
    if hasattr(progress, "close"):
        progress.close()
    return rows, found, infos


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
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads on the CPU (default 1, timed on the process's CPU time, which leaves out the "
                        "time other processes take; N > 1: on the wall clock, where busy cores stall every parallel "
                        "region)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per case (default 12, 30 with --full; at least 5 where the calls of a case "
                        "take over 8 s, 60 s with --full)")
    p.add_argument("--min-time", type=float, default=None,
                   help="more rounds until each implementation's timed calls add up to this (s; 0.25, 1 with --full)")
    p.add_argument("--json", default=None,
                   help="where to write the JSON report (default bench-results/bench-<device>.json)")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OLD.json: compare this run's speedups with an earlier report's (exit 1 on a regression); "
                        "A.json B.json: compare two saved reports and run nothing")
    p.add_argument("--threshold", type=float, default=1.1,
                   help="--compare: a regression is a new interval more than this factor below the old one")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="run beside N CPU-bound background processes (started and killed here): the loaded run "
                        "of python -m fastsd.bench.pair")
    p.add_argument("--plots", metavar="DIR", default=None,
                   help="write PNG plots here (default: beside the JSON report, or docs/bench/ with --readme)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-traffic", action="store_true",
                   help="skip the counted-bytes table (Triton under the interpreter vs eager dispatch)")
    p.add_argument("--readme", metavar="README.md",
                   help="also write the report, with the machine it ran on, between the bench markers of this file")
    args = p.parse_args(argv)
    if args.compare and len(args.compare) > 2:
        p.error("--compare takes OLD.json, or A.json B.json")
    if args.compare and len(args.compare) == 2:
        reports = []
        for path in args.compare:
            with open(path) as f:
                reports.append(json.load(f))
        text, code = R.compare_reports(reports[0], reports[1], args.threshold)
        print(f"{args.compare[1]} against {args.compare[0]}:\n{text}")
        return code
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: a number >= 1, got {args.threads}")
    with cpu_load(args.load):
        return _bench(args)


CLOCK_NAMES = {"cpu": "CPU-time clock", "wall": "wall clock", "events": "CUDA events"}


def set_threads(threads: Optional[int], device: torch.device) -> Tuple[str, str]:
    """Apply --threads; return (clock, the header line that says which thread count and clock the
    run uses, and why).

    One thread on the CPU unless --threads says otherwise, quiet machine or busy: the thread count
    is the same in every run, so two runs' speedups compare. On one thread the process's CPU time
    is the call's work, and time that other processes take from it is not counted. On several
    threads CPU time would add up every thread's work and spin-waits, so the clock is the wall
    clock; where other processes keep cores busy, each parallel region then waits for one of them,
    and ops made of many small regions slow far more than one fused kernel (2 threads beside 2
    CPU-bound processes on 2 cores: 7 of 28 speedups within 20 % of the quiet run's)."""
    if device.type != "cpu":  # the host's threads only run the launches: left as they are unless asked
        if threads:
            torch.set_num_threads(threads)
        return "events", f"torch threads: {threads} (--threads)" if threads else ""
    n = threads or 1
    torch.set_num_threads(n)
    if n == 1:
        why = "--threads 1" if threads else "the default; --threads N for N"
        return "cpu", (f"torch threads: 1 ({why}), timed on this process's CPU time: the time other processes "
                       "take from it is not counted (what they still move: shared caches, memory bandwidth, clock "
                       "speed)")
    return "wall", (f"torch threads: {n} (--threads), timed on the wall clock: where other processes keep cores "
                    "busy, every parallel region waits for one of them; compare with runs on the same thread count")


def _bench(args) -> int:
    t0 = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    min_time = args.min_time if args.min_time is not None else 1.0 if args.full else 0.25
    min_rounds = args.rounds or (30 if args.full else 12)
    # slow cases (whole models, ImageNet-size maps) stop at 5 rounds once their calls add up to this
    max_time = 60.0 if args.full else 8.0

    clock, threads_note = set_threads(args.threads, device)
    env = environment(device)
    env["clock"] = clock
    env["threads_note"] = threads_note
    env["copy_gbps"] = copy_bandwidth(device, clock)
    env["background_load"] = args.load
    print(f"fastsd.bench on {machine_line(env)}; {args.dtype}")
    print(f"copy bandwidth (y.copy_(x), 64 MiB): {env['copy_gbps']:.1f} GB/s"
          + (f"; beside {args.load} CPU-bound background processes" if args.load else ""))
    if threads_note:
        print(textwrap.fill(threads_note, R.WIDTH - 10))
    settings = ", ".join(f"{k}={v}" for k, v in env["env"].items() if v is not None)
    if settings:
        print(f"environment: {settings}")
    if env["peak_gbps"]:
        print(f"theoretical memory bandwidth (2 x memory clock x bus width): {env['peak_gbps']:.0f} GB/s")
    print()

    notes: List[str] = []
    with _notes_aside(notes):
        benches = [b for m in _suite_modules(args.ops, quick=not args.full)
                   for b in m.benches(device=device, dtype=dtype, quick=not args.full)]
        rows, found, infos = run(benches, device, args, min_time, min_rounds, max_time, clock)
    report = {"environment": env, "dtype": args.dtype, "cases": infos,
              "rows": [dataclasses.asdict(r) for r in rows], "checks": [dataclasses.asdict(c) for c in found]}
    print(R.format_report(report))
    if notes:
        print("\nnotes (warnings raised during the run):")
        for n in dict.fromkeys(notes):
            print(f"  {n}")

    report["traffic"] = None
    if not args.no_traffic:
        report["traffic"] = triton_traffic_rows()
        if report["traffic"] is not None:
            from .triton_traffic import format_rows

            print("\nBytes moved per call, counted: Triton kernels under the interpreter (every load and store)")
            print("against eager PyTorch (inputs and outputs of every aten op); min = each input read once,")
            print("each output written once. On a GPU, time ~ bytes / bandwidth: the GPU-side figure of this report.")
            print(format_rows(report["traffic"]))
    path = args.json or os.path.join("bench-results", f"bench-{args.device}.json")
    plots: List[str] = []
    if not args.no_plots:
        from .plots import write_plots

        out_dir = args.plots or (os.path.join(os.path.dirname(args.readme) or ".", README_PLOTS) if args.readme
                                 else os.path.dirname(path) or ".")
        plots = write_plots(report, out_dir, env, device, dtype)
        for png in plots:
            print(f"plot: {png}")
    report["runtime_s"] = time.perf_counter() - t0
    report["environment"]["loadavg_end"] = _loadavg()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nJSON report: {path}; {report['runtime_s']:.0f} s")
    if args.readme:
        where = os.path.dirname(os.path.abspath(args.readme))
        # the README's numbers, kept beside it: --compare decides a later run against them on the intervals
        kept = os.path.join(where, README_PLOTS, f"bench-{args.device}.json")
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        with open(kept, "w") as f:
            json.dump(report, f, indent=1)
        write_readme(args.readme, report, [os.path.relpath(os.path.abspath(q), where) for q in plots],
                     json_path=os.path.relpath(kept, where))
        print(f"benchmark section of {args.readme} regenerated; its report: {kept}")
    if args.compare:
        return compare(report, args.compare[0], args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
