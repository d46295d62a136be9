"""``make gpu-report`` (``python -m fastsd.bench.gpu_report``) run here, in its CPU-only form.

The report's CUDA steps go through the fake CUDA layer of tests/test_bench_cuda_path.py (events,
synchronize, device properties; tensors asked for on "cuda" made on the CPU; the interpreter runs the
Triton kernels), so on a GPU the same code runs the first time. The GPU tests run for real in their
subprocess: there no CUDA device exists, so each is skipped, and the report says so. The static model
(``python -m fastsd.bench.sass --json``) is stood in for by fixed entries where its module is absent
or too slow for this suite; its subprocess path is checked on a module that fails.
"""
import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

from fastsd.bench import gpu_report
from fastsd.bench import icp as icp_bench
from fastsd.bench import losses as losses_bench
from fastsd.bench import patch_swap as patch_swap_bench
from fastsd.bench.cases import PatchSwapCase
from test_bench_cuda_path import PEAK_GBPS, fake_cuda, pytestmark  # noqa: F401  (the fixture, the skip)

STATIC = [  # rows of the static model (fastsd.bench.sass), for two specs
    {"name": "patch_swap_forward_fp32_nchw_vec4", "kernel": "cell_select_kernel", "regs": 26, "occupancy": 1.0,
     "issue": 0.45},
    {"name": "patch_swap_forward_fp32_nchw_vec1", "kernel": "cell_select_kernel", "regs": 29, "occupancy": 1.0,
     "issue": 1.4},
]


@pytest.fixture
def small_cases(monkeypatch):
    monkeypatch.setattr(patch_swap_bench, "PATCH_SWAP_BENCH", [PatchSwapCase("8x3x16x16", (8, 3, 16, 16), (4, 4))])
    monkeypatch.setattr(patch_swap_bench, "PATCH_SWAP_GPU_BENCH", [PatchSwapCase("8x3x16x16 grid 6x6", (8, 3, 16, 16), (6, 6))])
    monkeypatch.setattr(icp_bench, "ICP_BENCH", [icp_bench.ICPCase("small_cnn_b4_k5", icp_bench.SmallCNN, batch=4)])
    monkeypatch.setattr(losses_bench, "benches", lambda device, dtype, quick: [
        losses_bench.pair_kd_bench(8, 10, device, dtype),
        losses_bench.feature_bench("tiny", [(2, 4, 4, 4), (2, 8, 2, 2)], "mse", device, dtype)])
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the bench's compiled baselines
    # The GPU's blocks, not the interpreter's larger ones: the launches are the variants a GPU runs.
    from fastsd.kernels import mix as mix_kernels, patch_swap as swap_kernels

    monkeypatch.setattr(swap_kernels, "_INTERPRETER_MAX_BLOCK", 1)
    monkeypatch.setattr(mix_kernels, "_INTERPRETER_MAX_BLOCK", 1)


def test_gpu_report_through_the_fake_cuda_layer(fake_cuda, small_cases, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_report, "static_model", lambda module=None: {"entries": STATIC})
    out = tmp_path / "gpu-report.json"
    status = gpu_report.main(["--json", str(out), "--tests", str(Path(__file__).parent / "test_icp.py"), "--suites", "patch_swap", "losses",
                              "--repeats", "3", "--bench-args", "--ops", "patch_swap", "losses", "--no-traffic",
                              "--rounds", "3", "--min-time", "0"])  # rows, not timings: the fewest rounds
    report = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert status == 0, report

    tests = report["gpu_tests"]  # the subprocess has no CUDA device: every gpu test is skipped
    assert tests["ok"] and tests["tests"] > 0 and tests["skipped"] == tests["tests"] and tests["failed"] == []

    assert report["environment"]["device"] == "Fake H100"
    assert {(r["op"], r["impl"]) for r in report["bench"]["rows"]} >= {("patch_swap", "triton"),
                                                                       ("pair_kd_loss", "triton")}

    cases = {c["op"]: c for c in report["kernels"] if c["case"] != "8x3x16x16 grid 6x6"}
    assert set(cases) == {"patch_swap", "pair_kd_loss", "feature_alignment_loss"}
    # The CUDA-only narrow-cell case is timed too, and its launch is the EACH variant (the 4x4
    # grid's is not): the report's constants say which variant each row timed.
    narrow = next(c for c in report["kernels"] if c["case"] == "8x3x16x16 grid 6x6")
    assert narrow["kernels"][0]["constexprs"]["EACH"] == 2  # lines of 16 fp32: whole 16-byte chunks
    assert cases["patch_swap"]["kernels"][0]["constexprs"]["EACH"] == 0
    swap = {k["kernel"]: k for k in cases["patch_swap"]["kernels"]}
    k = swap["cell_select_kernel"]
    assert k["launches_per_call"] == 1
    x_bytes = 8 * 3 * 16 * 16 * 4
    assert k["bytes_per_launch"] == 2 * x_bytes + 8 * 8 + 8 * 4 * 4  # x, out, partner, the uint8 mask view
    assert k["median_us"] > 0 and k["gbps"] == pytest.approx(k["bytes_per_launch"] / k["median_us"] / 1e3)
    assert k["pct_peak"] == pytest.approx(100 * k["gbps"] / PEAK_GBPS)
    # The launch's own variant: on the GPU's block (the fixture turns the interpreter's larger blocks
    # off), the AOT spec compiled for it, here with every divisibility fact the launch has; and the
    # static model's row for that spec and its prediction on the fake device (its H100 bandwidth).
    assert k["variant"]["base"].startswith("('cell_select_kernel'")
    assert (k["spec"], k["spec_exact"]) == ("patch_swap_forward_fp32_nchw_vec4", True), k["spec"]
    assert k["static"] == STATIC[0]
    memory_us = k["bytes_per_launch"] / (PEAK_GBPS * 1e9) * 1e6
    assert k["model"] == {"us": pytest.approx(memory_us), "bound": "memory", "memory_us": pytest.approx(memory_us),
                          "issue_us": pytest.approx(0.45 * k["bytes_per_launch"] / 3.35e12 * 1e6)}
    assert narrow["kernels"][0]["spec"] == "patch_swap_forward_fp32_nchw_each4_lines"
    assert narrow["kernels"][0]["static"] is None and narrow["kernels"][0]["model"] is None  # no row for it
    pair = {k["kernel"]: k for k in cases["pair_kd_loss"]["kernels"]}
    assert set(pair) == {"_pair_counts_kernel", "_pair_kd_kernel"}
    assert "H100" in report["model_machine"]
    assert cases["patch_swap"]["launches"]["host_syncs"] == 0
    assert "triton.cell_select_kernel" in cases["patch_swap"]["launches"]["ops"]["forward"]
    assert "cell_select_kernel" in text and "patch_swap_forward_fp32_nchw_vec4" in text and "memory" in text


def test_static_model_errors_are_reported():
    result = gpu_report.static_model("fastsd.no_such_module")
    assert result["returncode"] != 0 and "No module named" in result["error"]
    cases = [{"op": "patch_swap", "case": "c", "kernels": [{"kernel": "cell_select_kernel", "variant": None}]}]
    gpu_report.join(cases, result, index={})
    assert cases[0]["kernels"][0]["static"] is None and cases[0]["kernels"][0]["spec"] is None
    assert "(variant unknown)" in gpu_report.format_kernels(
        [{**cases[0], "kernels": [{**cases[0]["kernels"][0], "launches_per_call": 1, "median_us": 1.0,
                                  "bytes_per_launch": 1, "gbps": None, "pct_peak": None}]}])


def test_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        gpu_report.main([])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_static_model_speaks_the_sass_report_s_arguments(monkeypatch, tmp_path, capsys):
    """The command static_model runs is one fastsd.bench.sass accepts, and a JSON file that report
    wrote earlier (made without a GPU) is read the same way: the real model, on one spec."""
    from fastsd.bench import sass

    name = next(s["name"] for s in sass.kernel_specs() if "patch_swap" in s["name"])
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        status = sass.main([*cmd[3:], "--names", name])  # [python, -m, module, ...]
        return type("Proc", (), {"returncode": status, "stdout": capsys.readouterr().out, "stderr": ""})()

    monkeypatch.setattr(gpu_report, "subprocess", types.SimpleNamespace(run=run, TimeoutExpired=TimeoutError))
    live = gpu_report.static_model()
    assert commands and commands[0][2] == gpu_report.STATIC_MODEL
    assert "error" not in live and [e["name"] for e in live["entries"]] == [name]
    assert live["entries"][0]["kernel"]

    path = tmp_path / "sass.json"
    assert sass.main(["--json", str(path), "--names", name]) == 0
    saved = gpu_report.static_model(str(path))
    assert "error" not in saved and saved["entries"] == live["entries"]
    assert "error" in gpu_report.static_model(str(tmp_path / "missing.json"))


def test_a_launch_finds_the_variant_it_ran():
    """match_spec: the spec of the launch's function, signature, constexprs and options compiled with
    the most of its divisibility attributes and none it lacks."""
    index = {"k/fp32": [(frozenset(), "vec4_unaligned"), (frozenset({"a0", "a1"}), "vec4_aligned"),
                        (frozenset({"a0", "a2"}), "vec4_other")],
             "k/fp16": [(frozenset({"a0"}), "vec8")]}
    assert gpu_report.match_spec({"base": "k/fp32", "attrs": ["a0", "a1"]}, index) == ("vec4_aligned", True)
    assert gpu_report.match_spec({"base": "k/fp32", "attrs": ["a0", "a1", "a3"]}, index) == ("vec4_aligned", False)
    assert gpu_report.match_spec({"base": "k/fp32", "attrs": ["a1"]}, index) == ("vec4_unaligned", False)
    assert gpu_report.match_spec({"base": "k/fp16", "attrs": []}, index) == (None, None)  # it assumes more
    assert gpu_report.match_spec({"base": "k/fp64", "attrs": []}, index) == (None, None)
    assert gpu_report.match_spec(None, index) == (None, None)


def test_predict_is_the_longer_of_memory_and_issue():
    from fastsd.bench.sass import H100

    nbytes = 3.35e6  # 1 us at the H100's 3.35 TB/s
    assert gpu_report.predict({"issue": 0.5}, nbytes, H100) == {
        "us": pytest.approx(1.0), "bound": "memory", "memory_us": pytest.approx(1.0), "issue_us": pytest.approx(0.5)}
    assert gpu_report.predict({"issue": 2.0}, nbytes, H100)["us"] == pytest.approx(2.0)
    half = dataclasses.replace(H100, sms=66, bandwidth=6.7e12)  # half the issue rate, twice the bandwidth
    got = gpu_report.predict({"issue": 0.5}, nbytes, half)
    assert got["bound"] == "issue" and got["us"] == pytest.approx(1.0) and got["memory_us"] == pytest.approx(0.5)
    assert gpu_report.predict({"issue": float("inf")}, nbytes, H100) is None
    assert gpu_report.predict({}, nbytes, H100) is None


def _gpu_bench_launches():
    """(what, module, kernel names, thunk) of the launches the GPU benchmark's patch swap and mix cases
    make, each dtype and layout, forward and backward: launchers on meta tensors, which a GPU launch's
    variant shares (16-byte aligned pointers, the GPU's blocks)."""
    from fastsd.bench import mix as mix_bench
    from fastsd.bench.cases import PATCH_SWAP_BENCH, PATCH_SWAP_GPU_BENCH
    from fastsd.kernels import mix as M, patch_swap as P

    meta = dict(device="meta")
    out = []
    for case in PATCH_SWAP_BENCH + PATCH_SWAP_GPU_BENCH:
        B = case.shape[0]
        p, m = torch.empty(B, dtype=torch.int64, **meta), torch.empty(B, *case.grid, dtype=torch.bool, **meta)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float64):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.empty(case.shape, dtype=dtype, **meta).contiguous(memory_format=fmt)
                what = f"patch swap {case.name} {dtype} {fmt}"
                out.append((what, P, ["cell_select_kernel"], lambda x=x, p=p, m=m: P.patch_swap(x, p, m, p)))
                if dtype.is_floating_point:
                    out.append((what + " backward", P, ["cell_select_kernel"],
                                lambda x=x, p=p, m=m: P.patch_swap_backward(x, p, m, p)))
    for shape in mix_bench.SIZES.values():
        B = shape[0]
        rows = (torch.empty(B, dtype=torch.int64, **meta), torch.empty(B, 4, dtype=torch.int64, **meta),
                torch.empty(B, **meta), torch.empty(B, dtype=torch.bool, **meta))
        for dtype in (torch.float32, torch.float16, torch.uint8):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.empty(shape, dtype=dtype, **meta).contiguous(memory_format=fmt)
                what = f"mix {shape} {dtype} {fmt}"
                out.append((what, M, ["mix_kernel"], lambda x=x: M.mix(x, *rows)))
                out.append((what + " in place", M, ["mix_kernel"], lambda x=x: M.mix_(x, *rows)))
                if dtype.is_floating_point:
                    out.append((what + " backward", M, ["mix_backward_kernel"],
                                lambda x=x: M.mix_backward(x, *rows, inverse_partner=rows[0])))
    return out


def test_every_gpu_bench_launch_is_an_aot_spec():
    """The AOT specs (what test_aot compiles and the static model reads) include, exactly, the variant
    every launch of the GPU benchmark's patch swap and mix cases compiles: make gpu-report's rows
    each find their spec."""
    from fastsd.kernels import _aot

    index = gpu_report.aot_index()
    assert index
    missing, found = [], 0
    for what, module, names, thunk in _gpu_bench_launches():
        with _aot.recorded(module, names) as launches:
            thunk()
        assert launches, what
        for _name, kernel, _grid, args, kwargs in launches:
            spec, exact = gpu_report.match_spec(_aot.variant_key(_aot.launch_spec("l", kernel, args, kwargs)), index)
            found += 1
            if not exact:
                missing.append(f"{what}: {spec or 'no spec'}")
    assert not missing, missing
    assert found >= 80


def test_a_variant_or_specs_not_found_say_why(fake_cuda, monkeypatch):
    """A launch whose variant the binder cannot give (here: no kernel object, as from an older
    Triton's launcher) is timed still, its row saying why; AOT specs that cannot be built are
    reported by join, and every row's spec is None."""
    timer = gpu_report.KernelTimer()
    assert timer("k", (torch.zeros(4),), {"BLOCK": 4}, lambda: "launched") == "launched"
    (row,) = timer.rows(1, None)
    assert row["variant"] is None and row["variant_error"] and row["constexprs"] == {"BLOCK": 4}

    def broken():
        raise RuntimeError("no specs here")

    monkeypatch.setattr(gpu_report, "aot_index", broken)
    cases = [{"op": "o", "case": "c", "kernels": [row]}]
    assert gpu_report.join(cases, {"entries": STATIC}) == "AOT specs: RuntimeError: no specs here"
    assert row["spec"] is None and row["static"] is None and row["model"] is None
    assert "(variant unknown)" in gpu_report.format_kernels(cases)
