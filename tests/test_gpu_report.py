"""``make gpu-report`` (``python -m fastsd.bench.gpu_report``) run here, in its CPU-only form.

The report's CUDA steps go through the fake CUDA layer of tests/test_bench_cuda_path.py (events,
synchronize, device properties; tensors asked for on "cuda" made on the CPU; the interpreter runs the
Triton kernels), so on a GPU the same code runs the first time. The GPU tests run for real in their
subprocess: there no CUDA device exists, so each is skipped, and the report says so. The static model
(``python -m fastsd.bench.sass --json``) is stood in for by fixed entries where its module is absent
or too slow for this suite; its subprocess path is checked on a module that fails.
"""
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

STATIC = [
    {"name": "patch_swap_forward_fp32_nchw_vec4", "kernel": "cell_select_kernel", "issue_budget_pct": 45.0},
    {"name": "patch_swap_forward_fp32_nchw_vec1", "kernel": "cell_select_kernel", "issue_budget_pct": 140.0},
    {"name": "pair_kd_fp32_b1024", "kernel": "_pair_kd_kernel", "registers": 104},
    {"name": "no_such_kernel", "kernel": "nothing_launches_this"},
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
    assert [e["name"] for e in k["static"]] == [STATIC[0]["name"], STATIC[1]["name"]]
    pair = {k["kernel"]: k for k in cases["pair_kd_loss"]["kernels"]}
    assert set(pair) == {"_pair_counts_kernel", "_pair_kd_kernel"} and pair["_pair_kd_kernel"]["static"] == [STATIC[2]]
    assert cases["patch_swap"]["launches"]["host_syncs"] == 0
    assert "triton.cell_select_kernel" in cases["patch_swap"]["launches"]["ops"]["forward"]
    assert "cell_select_kernel" in text and "patch_swap_forward_fp32_nchw_vec4" in text


def test_static_model_errors_are_reported():
    result = gpu_report.static_model("fastsd.no_such_module")
    assert result["returncode"] != 0 and "No module named" in result["error"]
    cases = [{"op": "patch_swap", "case": "c", "kernels": [{"kernel": "cell_select_kernel"}]}]
    gpu_report.join(cases, result)
    assert cases[0]["kernels"][0]["static"] == []


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
    entries = [{"name": "ps_fp32_vec4", "kernel": "k", "constexprs": {"BLOCK": 1024, "CHUNK": 4, "MIXED": False}},
               {"name": "ps_fp32_vec1", "kernel": "k", "constexprs": {"BLOCK": 1024, "CHUNK": 1, "MIXED": False}},
               {"name": "ps_fp16_vec8", "kernel": "k", "constexprs": {"BLOCK": 2048, "CHUNK": 8, "MIXED": True}}]
    cases = [{"kernels": [{"kernel": "k", "constexprs": {"BLOCK": 1024, "CHUNK": 1, "MIXED": False}},
                          {"kernel": "k", "constexprs": {}},
                          {"kernel": "k", "constexprs": {"BLOCK": 512, "CHUNK": 2}}]}]
    gpu_report.join(cases, {"entries": entries})
    found = [[e["name"] for e in k["static"]] for k in cases[0]["kernels"]]
    assert found[0] == ["ps_fp32_vec1"]
    assert found[1] == found[2] == [e["name"] for e in entries]  # nothing to match on, or no such variant
