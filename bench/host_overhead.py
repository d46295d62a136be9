"""Host (Python) time per public call at tiny shapes, where the kernels cost next to nothing.

    PYTHONPATH=$PWD python bench/host_overhead.py                     # this tree's fastsd
    PYTHONPATH=$PWD python bench/host_overhead.py --before 4a888c1    # beside a commit's
    PYTHONPATH=$PWD python bench/host_overhead.py --device cuda --backends triton,cuda,torch

On a GPU every fastsd call is host-bound (docs/gpu/README.md): what a call costs on tiny CPU tensors
is that host work. ``--before REV`` also imports the fastsd of git revision REV as ``fastsd_before``
(a copy with its op namespace renamed, so both register side by side; its ``fastsd._C`` and
``kernels`` are this tree's) and times both in the same rounds: every (tree, call, backend) once per
round, the order rotated each round (:func:`fastsd.bench.core.interleave`), medians in
microseconds. On CUDA a sample is timed with events around the calls, which an idle GPU waits on
the host for.
``--registered`` adds this tree's calls with the eager path off (fastsd/_eager.py: every call through
the registered ops): the same comparison without an old revision (on a GPU machine, whose copy of the
tree may have no git history). ``--profile CALL`` prints cProfile's breakdown of one call instead.
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile

import torch


def _before_package(rev: str) -> str:
    """A copy of revision ``rev``'s fastsd importable as ``fastsd_before``; returns the directory to
    put on sys.path."""
    root = tempfile.mkdtemp(prefix="fastsd_before_")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(rev):  # `git archive REV fastsd` made beforehand (a GPU machine's copy has no history)
        with open(rev, "rb") as f:
            tar = f.read()
    else:
        tar = subprocess.run(["git", "-C", here, "archive", rev, "fastsd"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=tar, check=True)
    pkg = os.path.join(root, "fastsd_before")
    os.rename(os.path.join(root, "fastsd"), pkg)
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                src = open(path).read()
                src = re.sub(r"\bfastsd::", "fastsd_before::", src)
                src = re.sub(r"torch\.ops\.fastsd\.", "torch.ops.fastsd_before.", src)
                src = re.sub(r"(from|import) fastsd\b", r"\1 fastsd_before", src)
                open(path, "w").write(src)
    here = os.path.join(here, "fastsd")
    # The same extension file: loaded once, its fastsd_C ops registered once.
    os.symlink(os.path.realpath(os.path.join(here, "_C.abi3.so")), os.path.join(pkg, "_C.abi3.so"))
    kernels = os.path.join(here, "kernels")
    if os.path.exists(kernels):
        shutil.rmtree(os.path.join(pkg, "kernels"), ignore_errors=True)
        os.symlink(os.path.realpath(kernels), os.path.join(pkg, "kernels"))
    return root


def calls(fs, device="cpu"):
    """name -> fn() making one public call on tiny inputs (backward included where marked)."""
    g = torch.Generator().manual_seed(0)

    def make(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    x = make(2, 3, 8, 8)
    xg = x.clone().requires_grad_()
    partner = torch.tensor([1, 0], device=device)
    mask = torch.rand(2, 2, 2, generator=g).to(device) < 0.5
    labels2 = torch.tensor([0, 0], device=device)
    gx = torch.ones_like(x)
    z = make(4, 10, grad=True)
    t = make(4, 10)
    labels4, partner4 = torch.tensor([1, 1, 2, 2], device=device), torch.tensor([1, 0, 3, 2], device=device)
    student = [make(2, 4, 4, 4, grad=True), make(2, 8, 2, 2, grad=True)]
    target = [make(2, 4, 4, 4), make(2, 8, 2, 2)]
    boxes = torch.tensor([[1, 5, 2, 7], [0, 8, 0, 8]], device=device)
    lam, use_box = torch.tensor([0.3, 0.7], device=device), torch.tensor([True, False], device=device)
    xb, yb = make(8, 3, 8, 8), torch.arange(8, device=device) % 4
    mixup = fs.mix.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=4)
    cutmix = fs.mix.CutMix(num_classes=4)
    grad = torch.autograd.grad
    return {
        "patch_swap": lambda: fs.patch_swap(x, partner, mask),
        "patch_swap+bwd": lambda: grad(fs.patch_swap(xg, partner, mask), xg, gx),
        "intra_class_patch_swap": lambda: fs.intra_class_patch_swap(x, labels2, patch_size=4),
        "pair_kd_loss+bwd": lambda: grad(fs.pair_kd_loss(z, labels4, partner4), z),
        "kd_loss+bwd": lambda: grad(fs.kd_loss(z, t), z),
        "feature_loss+bwd": lambda: grad(fs.feature_alignment_loss(student, target), student),
        "mix": lambda: fs.mix.mix(x, partner, boxes, lam, use_box),
        # the drop-ins (timm's batch mode, torchvision's CutMix): their backend is the mix op's
        "Mixup batch": lambda: mixup(xb, yb),
        "CutMix": lambda: cutmix(xb, yb),
    }


def _in_backend(fs, backend, fn, registered=False):
    """fn() with ``backend`` forced; ``registered``: with fastsd's eager path off (every call through
    the registered torch.library op, as before the eager path)."""
    from fastsd import _eager

    def run():
        with fs.use_backend(backend):
            if not registered:
                return fn()
            saved, _eager.eager = _eager.eager, _never
            try:
                return fn()
            finally:
                _eager.eager = saved
    return run


def _never(tensors):
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", metavar="REV",
                        help="a git revision whose fastsd to time beside this tree's (or a file of `git archive REV fastsd`)")
    parser.add_argument("--registered", action="store_true",
                        help="also this tree's calls through the registered ops (the eager path off)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="on the CPU: wall time, or this process's CPU time (steadier beside other loads)")
    parser.add_argument("--backends", default="cpp,torch")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per row, at least")
    parser.add_argument("--profile", metavar="CALL", help="cProfile one call (per backend) instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    import fastsd
    from fastsd.bench.core import interleave, median_ci

    trees = {}
    if args.before:
        sys.path.insert(0, _before_package(args.before))
        trees["before"] = importlib.import_module("fastsd_before")
    if args.registered:
        trees["registered"] = fastsd
    trees["after"] = fastsd
    backends = args.backends.split(",")
    if args.profile:
        for tree, fs in trees.items():
            for b in backends:
                fn = _in_backend(fs, b, calls(fs, device)[args.profile], tree == "registered")
                for _ in range(200):
                    fn()
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(2000):
                    fn()
                prof.disable()
                print(f"=== {tree} {b} {args.profile}: 2000 calls")
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        return
    fns, missing = {}, set()
    for tree, fs in trees.items():
        for name, fn in calls(fs, device).items():
            for b in backends:
                run = _in_backend(fs, b, fn, tree == "registered")
                try:
                    run()
                except fs.BackendUnavailableError:  # e.g. an op without a CUDA C++ kernel
                    missing.add((name, b))
                    continue
                fns[(name, b, tree)] = run
    times = interleave(fns, device, min_time=args.min_time, min_rounds=30, min_sample=2e-3, clock=args.clock)
    cols = list(trees)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, 1 thread, {args.clock} clock"
    print(f"torch {torch.__version__}, {where}; median us per call (95% CI of the median)")
    ratios = [c for c in cols if c != "after"]
    head = "| call | backend | " + " | ".join(cols + [f"after/{c}" for c in ratios]) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in calls(fastsd, device):
        for b in backends:
            if (name, b) in missing:
                print(f"| {name} | {b} | " + " | ".join(["-"] * (len(cols) + len(ratios))) + " |")
                continue
            meds = {}
            cells = []
            for tree in cols:
                m, lo, hi = median_ci(times[(name, b, tree)])
                meds[tree] = m
                cells.append(f"{m * 1e6:.1f} ({lo * 1e6:.1f}-{hi * 1e6:.1f})")
            cells += [f"{meds['after'] / meds[c]:.2f}" for c in ratios]
            print(f"| {name} | {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
