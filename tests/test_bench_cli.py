"""The benchmark report's pieces that need no timing: the interleaved rounds, the intervals, the
verdicts on targets and lower bounds, the per-op tables, --compare, the README section, the notes."""
import dataclasses
import json
import logging
import time

import pytest
import torch

from fastsd.bench import report as R
from fastsd.bench.__main__ import _notes_aside, main, write_readme
from fastsd.bench.core import COPY, Bench, Row, checks, interleave, median_ci, paired_ratio


def _row(impl, kind, ms, speedup=None, case="c", op="patch_swap", gbps=3.0, err=0.0, peak=1.0):
    speedup = speedup or {}
    return Row(op, case, impl, kind, ms, (0.9 * ms, 1.1 * ms), 12, gbps, err, peak, 1, 6.0,
               {b: m for b, (m, lo, hi) in speedup.items()}, {b: (lo, hi) for b, (m, lo, hi) in speedup.items()})


def _report(scale=1.0, spread=0.05):
    def x(m):
        return (m, m * (1 - spread), m * (1 + spread))

    rows = [_row("loop", "baseline", 20.0, {"eager_where": x(0.1)}),
            _row("eager_where", "baseline", 2.0, {"loop": x(10.0)}),
            _row(COPY, "baseline", 0.5, err=None),
            _row("cpp", "backend", 1.0 / scale, {"loop": x(20.0 * scale), "eager_where": x(2.0 * scale),
                                                 COPY: x(0.5 * scale)}),
            _row("torch", "backend", 3.0, {"loop": x(6.7), "eager_where": x(0.67), COPY: x(0.17)}),
            _row("bare_fwd_grad", "baseline", 10.0, op="icp", gbps=None, err=None),
            _row("torch", "backend", 11.0, {"bare_fwd_grad": x(0.91)}, op="icp", gbps=None)]
    cases = [dict(op="patch_swap", case="c", speedup_vs=["loop", "eager_where"], not_the_op=[], floor=COPY,
                  eager="eager_where", compiled=None, loadavg=0.5),
             dict(op="icp", case="c", speedup_vs=["bare_fwd_grad"], not_the_op=["bare_fwd_grad"],
                  floor="bare_fwd_grad", eager=None, compiled=None)]
    return {"environment": dict(date="2026-11-22T00:00:00", device="cpu", cpu="X", cores=2, torch_threads=2,
                                torch="2.x", commit="abc", copy_gbps=10.0, peak_gbps=None, loadavg=0.3),
            "dtype": "float32", "cases": cases, "rows": [dataclasses.asdict(r) for r in rows], "checks": []}


def test_interleave_runs_one_call_of_each_per_round_in_rotated_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = interleave(fns, "cpu", min_time=0, min_rounds=6, max_rounds=6, warmup_rounds=1)
    assert all(len(t) == 6 for t in times.values())
    rounds = [calls[i:i + 3] for i in range(3, len(calls), 3)]  # after the warm-up round
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]


def test_short_calls_are_timed_in_samples_of_several_calls(monkeypatch):
    # a clock that only the calls move (1 ms and 20 ms a call): the sampling logic, not the machine's
    # sleep precision, which a loaded machine stretches past the 10 ms sample
    from fastsd.bench import core

    now = [0.0]
    monkeypatch.setattr(core.time, "perf_counter", lambda: now[0])
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1
        now[0] += 0.001

    def long():
        calls["long"] += 1
        now[0] += 0.02

    times = interleave({"short": short, "long": long}, "cpu", min_time=0, min_rounds=3, max_rounds=3,
                       warmup_rounds=0, min_sample=0.01)
    assert calls["long"] == 1 + 3  # calibration, then one call per round
    assert calls["short"] == 1 + 3 * 10  # calibration, then samples of ceil(10 ms / 1 ms) calls
    assert times["short"] == pytest.approx([0.001] * 3) and times["long"] == pytest.approx([0.02] * 3)  # per call


def test_one_thread_on_the_cpu_clock_by_default_and_n_threads_on_the_wall_clock():
    import torch

    from fastsd.bench import __main__ as bench_main

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        clock, note = bench_main.set_threads(None, torch.device("cpu"))  # quiet machine or busy: the same
        assert clock == "cpu" and torch.get_num_threads() == 1
        assert note.startswith("torch threads: 1 (the default; --threads N for N)") and "CPU time" in note
        clock, note = bench_main.set_threads(2, torch.device("cpu"))
        assert clock == "wall" and torch.get_num_threads() == 2 and "(--threads)" in note
        assert bench_main.set_threads(1, torch.device("cpu"))[0] == "cpu" and torch.get_num_threads() == 1
        torch.set_num_threads(2)  # on CUDA the host's threads are left alone: times come from events
        assert bench_main.set_threads(None, torch.device("cuda")) == ("events", "") and torch.get_num_threads() == 2
        assert bench_main.set_threads(1, torch.device("cuda")) == ("events", "torch threads: 1 (--threads)")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    env = dict(device="cpu", cpu="X", cores=2, torch_threads=1, clock="cpu", loadavg=2.5, torch="2.x", commit="abc")
    assert "2 cores, 1 torch thread, CPU-time clock; load average 2.50)" in bench_main.machine_line(env)
    with pytest.raises(SystemExit):
        main(["--threads", "0"])


def test_cpu_clock_does_not_count_the_time_other_processes_take(monkeypatch):
    # fake clocks: each call does its work (process CPU time) and, in some rounds, waits while
    # another process runs (wall time only), on one row more than on the other
    from fastsd.bench import core

    wall, cpu = [0.0], [0.0]
    monkeypatch.setattr(core.time, "perf_counter", lambda: wall[0])
    monkeypatch.setattr(core.time, "process_time", lambda: cpu[0])
    preempted = iter([0.0, 0.004, 0.0, 0.0, 0.01, 0.003, 0.0, 0.02] * 10)

    def work(seconds):
        def call():
            cpu[0] += seconds
            wall[0] += seconds + next(preempted)
        return call

    fns = {"once": work(0.001), "thrice": work(0.003)}
    ratios = {}
    for clock in ("cpu", "wall"):
        times = interleave(fns, "cpu", min_time=0, min_rounds=8, max_rounds=8, warmup_rounds=0, clock=clock)
        ratios[clock] = paired_ratio(times["thrice"], times["once"])
    assert ratios["cpu"] == pytest.approx((3.0, 3.0, 3.0))
    assert ratios["wall"][0] != pytest.approx(3.0, rel=0.2)  # the waits land on the two rows unevenly
    assert core.CPUOps("cpu", clock="cpu").time(work(0.002)) == pytest.approx(0.002)
    with pytest.raises(ValueError, match="clock"):
        core.CPUOps("cpu", clock="process")


def test_paired_ratio_is_exact_when_the_load_hits_both_calls_of_a_round():
    # b is 2x faster than a in every round, while the load changes tenfold between rounds: every
    # paired ratio is 2, though the times spread tenfold
    load = [1, 10, 1, 10, 1, 10, 2, 3, 5, 1]
    a = [2.0 * f for f in load]
    b = [1.0 * f for f in load]
    m, lo, hi = paired_ratio(a, b)
    assert m == lo == hi == pytest.approx(2.0)
    m, lo, hi = median_ci(list(range(1, 20)) + [1000.0])
    assert m == 10.5 and 5 < lo <= m <= hi < 16  # one outlier moves neither the median nor its interval


def test_checks_decide_on_the_interval():
    bench = Bench("patch_swap", "c", setup=lambda: None, backends={}, targets={"eager_where": 2.0},
                  target_source="issue 2", floor=COPY)

    def verdicts(lo, hi, copy=(0.5, 0.4, 0.6)):
        row = _row("cpp", "backend", 1.0, {"eager_where": ((lo + hi) / 2, lo, hi), COPY: copy})
        return {c.kind: c.status for c in checks(bench, [row])}

    assert verdicts(2.1, 2.5)["target"] == "met"
    assert verdicts(1.5, 1.9)["target"] == "missed"
    assert verdicts(1.8, 2.2)["target"] == "unsure"
    assert verdicts(2.1, 2.5)["floor"] == "ok"
    assert verdicts(2.1, 2.5, copy=(1.2, 1.05, 1.3))["floor"] == "faster"
    assert verdicts(2.1, 2.5, copy=(1.02, 0.97, 1.1))["floor"] == "ok"  # within the noise of the floor
    # the torch backend (the reference fallback) is not held to the compiled backends' targets
    torch_row = _row("torch", "backend", 1.0, {"eager_where": (1.0, 0.9, 1.1)})
    assert [c.kind for c in checks(bench, [torch_row])] == []


def test_each_op_has_a_narrow_table_with_only_its_columns():
    report = _report()
    row = report["rows"][3]
    report["checks"] = [dict(op="patch_swap", case="c", impl="cpp", vs="loop", kind="target", bound=25.0,
                             median=20.0, lo=19.0, hi=21.0, status="missed", source="issue 2")]
    text = R.format_report(report)
    ps, icp = text.split("\n\nicp\n")[0], text.split("\n\nicp\n")[1].split("\n\nsummary")[0]
    assert max(len(line) for line in text.splitlines()) < R.WIDTH
    assert "loop*" in ps and "copy*" in ps and "GB/s" in ps and "% copy" in ps and "50%" in ps
    assert "where" in ps.splitlines()[2] and "floor" not in ps.splitlines()[2]
    assert "c (load average 0.5):" in ps
    assert f"{R.fmt_x(row['speedup']['loop'])}±5%!" in ps  # the missed target is marked in its cell
    assert "missed: c, cpp x loop >= 25.0: 20.0 (19.0-21.0)" in ps
    assert "GB/s" not in icp and "floor" in icp and "where" not in icp  # ICP is not memory-bound
    summary = text.split("summary\n")[1]
    assert "patch_swap  cpp" in summary and "2.00x (where)" in summary and "50%" in summary


def test_a_row_faster_than_its_lower_bound_is_flagged_in_its_table_and_the_summary():
    report = _report()
    floor = dict(op="icp", case="c", impl="torch", vs="bare_fwd_grad", kind="floor", bound=1.0, median=1.36,
                 lo=1.2, hi=1.5, status="faster", source="")
    text = R.format_report(dict(report, checks=[dict(floor, status="ok", median=0.91, lo=0.85, hi=0.97)]))
    assert "lower bound (bare_fwd_grad): no row is faster than it (1 rows; fastest 0.91x)" in text
    assert "BELOW FLOOR" not in text and "FASTER THAN" not in text
    text = R.format_report(dict(report, checks=[floor]))
    icp, summary = text.split("\n\nicp\n")[1].split("\n\nsummary")
    assert "FASTER THAN ITS LOWER BOUND: c, torch x bare_fwd_grad = 1.36 (1.20-1.50)" in icp
    assert "0.91±5%!" in icp  # the row's cell against the floor is marked
    assert [line for line in summary.splitlines() if line.startswith("icp")][0].endswith("BELOW FLOOR")


def test_compare_decides_on_the_intervals(tmp_path):
    old = _report()
    # medians 15 % apart, intervals overlapping: the same
    text, code = R.compare_reports(old, _report(0.85, spread=0.1), threshold=1.1)
    assert code == 0 and "REGRESSION" not in text
    # the whole new interval more than 1.1x below the old one: a regression
    text, code = R.compare_reports(old, _report(0.5), threshold=1.1)
    assert code == 1 and "REGRESSION" in text
    assert "of 5 fastsd speedups within 20 %" in text
    assert "timed differently" not in text
    # runs on other thread counts or clocks: said above the table (their speedups differ by the method)
    other = _report()
    other["environment"].update(torch_threads=1, clock="cpu")
    text, _ = R.compare_reports(old, other)
    assert text.startswith("warning: the runs timed differently (2 torch threads, wall clock against 1, cpu)")
    # two saved reports, and one from before the intervals (its medians count as intervals)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    legacy = _report()
    for r in legacy["rows"]:
        del r["speedup_ci"]
    a.write_text(json.dumps(legacy))
    b.write_text(json.dumps(_report(0.5)))
    assert main(["--compare", str(a), str(b)]) == 1


def test_readme_section_is_replaced_with_summary_tables_and_plots(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\noutro\n")
    write_readme(str(readme), _report(), ["docs/bench/speedup.png"])
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro") and text.endswith("outro\n")
    assert (text.index("| op | fastsd |") < text.index("#### patch_swap")
            < text.index("![speedup](docs/bench/speedup.png)"))
    assert "| **c** | **cpp** | **1.00** |" in text  # the fastest row of the case in bold
    assert "| c | copy* |" in text  # not the op: never the best row
    write_readme(str(readme), _report(), [], json_path="docs/bench/bench-cpu.json")
    assert "`python -m fastsd.bench --quick --compare docs/bench/bench-cpu.json`" in readme.read_text()


def test_loader_warnings_are_kept_for_after_the_tables(capsys):
    notes = []
    with _notes_aside(notes):
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
    assert notes == ["torch.utils.cpp_extension: No CUDA runtime is found"]
    assert "No CUDA runtime" not in capsys.readouterr().err


def test_peak_cpu_memory_follows_allocations_and_frees_in_order():
    import torch

    from fastsd.bench.traffic import peak_cpu_memory

    n = 1_000_000  # 4 MB of float32

    def two_live():  # a and b live together, then a is freed before c is made
        a = torch.empty(n)
        b = a * 2
        del a
        return b + 1

    def one_live():
        a = torch.empty(n)
        del a
        return torch.empty(n)

    assert 8_000_000 <= peak_cpu_memory(two_live) < 8_001_000
    assert 4_000_000 <= peak_cpu_memory(one_live) < 4_001_000


def test_pair_runs_quiet_then_loaded_then_compares(monkeypatch, tmp_path):
    from fastsd.bench import pair

    calls = []
    monkeypatch.setattr(pair.subprocess, "call", lambda cmd: calls.append(cmd[1:]) or 0)
    assert pair.main(["--out", str(tmp_path), "--", "--quick", "--ops", "losses"]) == 0
    quiet, loaded = str(tmp_path / "quiet.json"), str(tmp_path / "loaded.json")
    assert calls == [["-m", "fastsd.bench", "--quick", "--ops", "losses", "--json", quiet],
                     ["-m", "fastsd.bench", "--quick", "--ops", "losses", "--load", "2", "--json", loaded],
                     ["-m", "fastsd.bench", "--compare", quiet, loaded]]


def test_cpu_load_processes_end_with_the_block():
    from fastsd.bench.core import cpu_load

    with cpu_load(2, limit_s=30) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        # already spinning when the block starts (each said so), not still starting up
        cpu = [float(open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[11]) for p in procs]
        time.sleep(0.3)
        later = [float(open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[11]) for p in procs]
        assert all(b > a for a, b in zip(cpu, later)), (cpu, later)  # user time grows: they spin
    assert all(p.poll() is not None for p in procs)


def test_counted_traffic_says_why_it_cannot_run(monkeypatch, capsys):
    """With a Triton whose interpreter cannot run the kernels (Triton < 3.8 with NumPy 2.4), the
    counted-traffic report is skipped with the reason, not run into the interpreter's error."""
    from fastsd import _backend
    from fastsd.bench import __main__ as bench_main

    monkeypatch.setattr(_backend, "triton_interpreter_error", lambda: "Triton 3.6.0's interpreter cannot run these")
    assert bench_main.triton_traffic_rows() is None
    assert "counted Triton traffic skipped: Triton 3.6.0's interpreter" in capsys.readouterr().out


def test_a_run_states_its_threads_and_clock_and_keeps_the_readme_report_beside_it(monkeypatch, tmp_path, capsys):
    """The run itself (cases faked: no timing): the header says the thread count, the clock and why;
    the JSON report is written, and with --readme also kept beside the README for --compare."""
    import torch

    from fastsd.bench import __main__ as bench_main

    report = _report()
    seen = {}

    def fake_run(benches, device, args, min_time, min_rounds, max_time, clock="wall"):
        seen["clock"], seen["threads"] = clock, torch.get_num_threads()
        return [Row(**r) for r in report["rows"]], [], report["cases"]

    monkeypatch.setattr(bench_main, "run", fake_run)
    monkeypatch.setattr(bench_main, "_suite_modules", lambda ops, quick=True: [])
    monkeypatch.setattr(bench_main, "copy_bandwidth", lambda device, clock="wall": 10.0)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    saved = torch.get_num_threads()
    try:
        assert main(["--device", "cpu", "--no-plots", "--no-traffic", "--json", str(tmp_path / "r.json"),
                     "--readme", str(readme)]) == 0
    finally:
        torch.set_num_threads(saved)
    out = capsys.readouterr().out
    assert seen == {"clock": "cpu", "threads": 1}
    assert "1 torch thread, CPU-time clock" in out and "torch threads: 1 (the default" in out
    kept = json.loads((tmp_path / "docs" / "bench" / "bench-cpu.json").read_text())
    assert kept["environment"]["clock"] == "cpu" and kept["environment"]["torch_threads"] == 1
    assert kept["rows"] == json.loads((tmp_path / "r.json").read_text())["rows"]
    assert "--compare docs/bench/bench-cpu.json" in readme.read_text()


@pytest.mark.skipif(bool(__import__("fastsd._ext", fromlist=["load_error"]).load_error()), reason="no fastsd._C")
def test_overhead_times_clone_kernel_and_public_call_of_both_cases():
    """python -m fastsd.bench.overhead: both 32 px cases, each with the clone, the C++ op alone and
    the public call in the same rounds, and the Python layer as their difference (tiny here)."""
    import torch

    from fastsd.bench import overhead

    threads = torch.get_num_threads()
    rows = overhead.measure(shape=(4, 3, 8, 8), min_time=0.01, min_sample=0.0)
    assert torch.get_num_threads() == threads
    assert [r["case"].split()[0] for r in rows] == ["patch_swap", "mix"]
    for r in rows:
        assert set(r["ms"]) == {"clone", "kernel", "public"} and r["rounds"] >= 5
        assert r["python_us"] == pytest.approx((r["ms"]["public"] - r["ms"]["kernel"]) * 1e3)
        for median, lo, hi in r["clone_over"].values():
            assert 0 < lo <= median <= hi
    table = overhead.format_rows(rows)
    assert "patch_swap 4x3x8x8 grid 8x8" in table and "mix 4x3x8x8 op out of place" in table


def test_overhead_times_each_drop_in_against_its_library(monkeypatch):
    """python -m fastsd.bench.overhead's second table: each drop-in and its library's own call in the
    same rounds, on a host-bound batch, and the library's time over fastsd's. Each library call is
    made 2 ms of CPU time slower here, so a row whose callables were swapped (or that timed one of
    them twice) shows a ratio below 1; the thread count and the global RNGs are left as they were."""
    import numpy as np

    timm_mixup = pytest.importorskip("timm.data.mixup")
    from torchvision.transforms import v2

    from fastsd.bench import overhead

    def slowed(call):
        def spin_then_call(*args, **kwargs):
            end = time.process_time() + 0.002
            while time.process_time() < end:
                pass
            return call(*args, **kwargs)
        return spin_then_call

    monkeypatch.setattr(timm_mixup.Mixup, "__call__", slowed(timm_mixup.Mixup.__call__))
    for name in ("CutMix", "MixUp"):
        monkeypatch.setattr(getattr(v2, name), "forward", slowed(getattr(v2, name).forward))
    threads, torch_rng, numpy_rng = torch.get_num_threads(), torch.get_rng_state(), np.random.get_state()
    rows = overhead.measure_drop_ins(shape=(4, 3, 6, 6), num_classes=5, min_time=0.01, min_sample=0.0)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), torch_rng)
    assert np.random.get_state()[1].tolist() == numpy_rng[1].tolist()
    assert [r["case"] for r in rows] == ["timm Mixup batch switch", "timm Mixup elem switch", "torchvision CutMix",
                                         "torchvision MixUp"]
    for r in rows:
        assert set(r["us"]) == {"library", "fastsd"} and r["rounds"] >= 5 and r["shape"] == (4, 3, 6, 6)
        median, lo, hi = r["library_over_fastsd"]
        assert 0 < lo <= median <= hi
        assert r["us"]["library"] > 2000 and median > 1, r
    table = overhead.format_drop_in_rows(rows)
    assert table.startswith("drop-in (host time) | shape |") and "torchvision MixUp | 4x3x6x6 |" in table
