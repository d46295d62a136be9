"""The paper-protocol examples (examples/cifar100_patchswap.py, examples/cifar100_icp.py) run end
to end: one epoch on a tiny FakeData stand-in of CIFAR-100's shape, on CPU, in a subprocess, with
no download; their summary has the per-epoch accuracy, time per step and fastsd's share."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--fake-data", "--fake-size", "48", "--batch-size", "16", "--width", "4", "--epochs", "1",
        "--workers", "0", "--device", "cpu", "--threads", "1", "--profile-steps", "1"]


def _run(script, tmp_path, *extra):
    summary = tmp_path / "summary.json"
    data = tmp_path / "no-data"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *TINY, "--data", str(data),
                           "--json", str(summary), *extra], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not data.exists()  # nothing downloaded
    return json.loads(summary.read_text()), proc.stdout


def test_patchswap_example_one_epoch_on_fake_data(tmp_path):
    summary, out = _run("cifar100_patchswap.py", tmp_path)
    (epoch,) = summary["history"]
    assert epoch["epoch"] == 1 and 0.0 <= epoch["test_acc"] <= 100.0 and epoch["ms_per_step"] > 0
    assert epoch["loss"] > 0
    ops = summary["fastsd_share"]["ops_s"]
    assert {"fastsd::patch_swap", "fastsd::pair_kd_loss", "fastsd::pair_kd_loss (backward)"} <= set(ops)
    assert all(t > 0 for t in ops.values()) and sum(ops.values()) < summary["fastsd_share"]["wall_s"]
    assert "test accuracy" in out and "ms/step" in out and "fastsd's ops" in out


def test_icp_example_one_epoch_on_fake_data(tmp_path):
    # one epoch: the per-epoch schedule never leaves the warm-up, so the step schedule without warm-up
    summary, out = _run("cifar100_icp.py", tmp_path, "--schedule", "step", "--warmup", "0", "--steps", "2")
    (epoch,) = summary["history"]
    assert epoch["epoch"] == 1 and 0.0 <= epoch["test_acc"] <= 100.0 and epoch["ms_per_step"] > 0
    assert epoch["alpha"] < 1 and epoch["feature"] > 0  # the second and third steps refined
    share = summary["fastsd_share"]
    assert {"fastsd::icp_update_", "fastsd::feature_alignment_loss"} <= set(share["ops_s"])
    (refinement,) = share["regions_s"].values()
    assert share["ops_s"]["fastsd::icp_update_"] < refinement < share["wall_s"]
    assert "ICPDistillation(layers=['layer1', 'layer2', 'layer3']" in out


def test_example_models_are_the_papers():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import _common as C
    finally:
        sys.path.pop(0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(C.resnet18()) / 1e6, 1) == 11.2  # ResNet-18 for CIFAR-100
    assert round(count(C.resnet20()) / 1e6, 2) == 0.28  # ResNet-20 (He et al.) for CIFAR-100
    r20 = C.resnet20()
    assert [len(getattr(r20, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    convs = sum(1 for m in r20.modules() if isinstance(m, C.nn.Conv2d) and m.kernel_size == (3, 3))
    assert convs + 1 == 20  # the stem and 9 blocks of two 3 x 3 convolutions, and fc
    assert C.warmup_epochs(0.25, 10) == 2
