"""What the paper-protocol examples share: CIFAR-100 (or a stand-in of its shape), CIFAR ResNets,
the training loop, evaluation, and the share of the step that fastsd's ops take.

Used by ``examples/cifar100_patchswap.py`` and ``examples/cifar100_icp.py``; each script only
builds its model, optimiser and recipe and says what one training step computes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastsd  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fastsd  # noqa: F401

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
NUM_CLASSES = 100


# --- arguments -----------------------------------------------------------------------------------


def parser(description: str, *, epochs: int, batch_size: int, lr: float, width: int) -> argparse.ArgumentParser:
    """The options both scripts take; each script adds its method's own and sets its defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="./data", help="where torchvision's CIFAR100 lives (downloaded there if absent)")
    p.add_argument("--fake-data", action="store_true",
                   help="torchvision FakeData of CIFAR-100's shape (3 x 32 x 32, 100 classes) instead: no download")
    p.add_argument("--fake-size", type=int, default=1024, help="training images of the fake data (a quarter as many test)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--width", type=int, default=width, help="channels of the first stage (the paper's: the default)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluate on this many test batches only")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="autocast dtype: auto = bf16 on CUDA, off on CPU")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="channels_last model and batches: auto = on for CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="steps profiled for fastsd's share (after the first step of the first epoch, or for ICP of "
                        "the first epoch that refines); 0: none")
    p.add_argument("--json", default=None, help="write the run's summary as JSON to this file")
    return p


# --- data ----------------------------------------------------------------------------------------


def datasets(args, train_transform):
    """(train, test) CIFAR-100 sets, or FakeData of the same shape with ``--fake-data``."""
    import torchvision
    from torchvision import transforms as T

    test_transform = T.Compose([T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    if args.fake_data:
        size = (3, 32, 32)
        train = torchvision.datasets.FakeData(args.fake_size, size, NUM_CLASSES, transform=train_transform,
                                              random_offset=args.seed)
        test = torchvision.datasets.FakeData(max(1, args.fake_size // 4), size, NUM_CLASSES,
                                             transform=test_transform, random_offset=10 ** 6 + args.seed)
        return train, test
    try:
        train = torchvision.datasets.CIFAR100(args.data, train=True, download=True, transform=train_transform)
        test = torchvision.datasets.CIFAR100(args.data, train=False, download=True, transform=test_transform)
    except Exception as exc:  # no internet and no copy in --data
        raise SystemExit(f"CIFAR-100 is not in {args.data!r} and could not be downloaded ({exc}); "
                         f"put it there, or run with --fake-data") from exc
    return train, test


def standard_augmentation():
    """Random 32 x 32 crop of the 4-px zero-padded image and a horizontal flip (the usual CIFAR one)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


def loaders(args, train_set, test_set, env: Env):
    from torch.utils.data import DataLoader

    common = dict(num_workers=args.workers, pin_memory=env.device.type == "cuda", persistent_workers=args.workers > 0)
    g = torch.Generator().manual_seed(args.seed)
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=g, **common)
    test = DataLoader(test_set, batch_size=256, shuffle=False, **common)
    if len(train) == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    return train, test


# --- models ----------------------------------------------------------------------------------------


# The residual block of examples/train.py's digits model (one definition; that script imports only torch
# at load time).
from train import BasicBlock  # noqa: E402


class CifarResNet(nn.Module):
    """A ResNet for 32 x 32 images: a 3 x 3 stride-1 stem (no max-pool), stages ``layer1..layerN`` of
    basic blocks (the first block of each later stage halves the resolution), global average
    pooling and ``fc``."""

    def __init__(self, blocks, widths, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            cin = w
        self.stages = len(blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(width: int = 64) -> CifarResNet:
    """ResNet-18 for CIFAR (2-2-2-2 blocks, widths 64-128-256-512 at ``width=64``; 11.2 M parameters)."""
    return CifarResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width])


def resnet20(width: int = 16) -> CifarResNet:
    """ResNet-20 of He et al. (3 stages of 3 blocks, widths 16-32-64 at ``width=16``; 0.28 M parameters)."""
    return CifarResNet([3, 3, 3], [width, 2 * width, 4 * width])


# --- device, precision, layout ----------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    device: torch.device
    amp: bool  # bf16 autocast
    channels_last: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def __str__(self) -> str:
        return f"device {self.device}" + (", bf16 autocast" if self.amp else "") + (
            ", channels_last" if self.channels_last else "")


def setup(args) -> Env:
    """The device, autocast and layout the options ask for; seeds torch."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Env(device, amp=args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda"),
               channels_last=args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda"))


def prepare_model(args, model: nn.Module, env: Env) -> nn.Module:
    model = model.to(env.device)
    if env.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        # in place (nn.Module.compile, torch >= 2.2): the module, its names and the hooks the
        # recipes put on its layers stay where they are
        model.compile()
    return model


# --- fastsd's share of the step ----------------------------------------------------------------------


class Labelled:
    """``fn`` called inside ``torch.profiler.record_function(name)``, so the profile can attribute it."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args, **kwargs):
        with torch.profiler.record_function(self.name):
            return self.fn(*args, **kwargs)


_BACKWARD = "autograd::engine::evaluate_function: GeneratedBackwardFor_"


def fastsd_share(prof, wall_s: float, device, regions=()) -> Dict[str, float]:
    """Seconds per op of fastsd in a profile: its ``torch.library`` ops (``fastsd::...``, forward)
    and their backward nodes, or the eager path's labels of the same (``fastsd.<op>``, ``fastsd.<op>
    (backward)``: fastsd._eager), inclusive of what they call; on CUDA the time of the kernels they
    launched, on CPU their CPU time. ``regions``: ``record_function`` labels to report as well
    (they may contain fastsd ops: not added to the ops' total). Plus the profiled wall time."""
    cuda = device.type == "cuda"
    ops, labelled = {}, {}
    for e in prof.key_averages():
        t = (e.device_time_total if cuda else e.cpu_time_total) / 1e6
        if e.key in regions:
            labelled[e.key] = labelled.get(e.key, 0.0) + t
        elif e.key.startswith(("fastsd::", "fastsd.")):  # the registered op, or the eager path's label
            name = "fastsd::" + e.key[len("fastsd::" if e.key.startswith("fastsd::") else "fastsd."):]
            ops[name] = ops.get(name, 0.0) + t
        elif e.key.startswith(_BACKWARD + "fastsd_"):
            name = "fastsd::" + e.key[len(_BACKWARD + "fastsd_"):].replace("_defaultBackward", "") + " (backward)"
            ops[name] = ops.get(name, 0.0) + t
    return {"wall": wall_s, "ops": ops, "regions": labelled}


def print_share(share: Dict, steps: int, device) -> None:
    wall = share["wall"]
    what = "kernel time of" if device.type == "cuda" else "CPU time in"
    total = sum(share["ops"].values())
    print(f"fastsd's ops over {steps} profiled steps ({1e3 * wall / steps:.1f} ms/step under the profiler): "
          f"{what} fastsd's ops {100 * total / wall:.1f} % of the step", flush=True)
    for name, t in sorted(share["ops"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:52s} {100 * t / wall:6.2f} %  ({1e3 * t / steps:.2f} ms/step)")
    for name, t in share["regions"].items():  # (contain model passes and some of the ops above)
        print(f"  {name}: {100 * t / wall:.1f} % of the step ({1e3 * t / steps:.2f} ms/step)")


# --- training --------------------------------------------------------------------------------------


def evaluate(model, loader, env: Env, max_batches=None) -> float:
    """Top-1 accuracy (%) on ``loader`` in eval mode."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=env.device)
    seen = 0
    with torch.no_grad():
        for b, (x, y) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = _to(x, y, env)
            with env.autocast():
                correct += (model(x).argmax(1) == y).sum()
            seen += len(y)
    model.train()
    return 100.0 * int(correct) / max(seen, 1)


def _to(x, y, env: Env):
    x = x.to(env.device, non_blocking=True)
    if env.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(env.device, non_blocking=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, name: str, model: nn.Module, train_loader, test_loader, env: Env, step: Callable, optimizer,
          scheduler=None, *, logged=("loss",), regions=(), before_step: Optional[Callable] = None,
          profile_epoch: int = 0) -> dict:
    """The training loop: ``out = step(x, y, epoch, progress)`` under autocast (a dict whose
    ``"loss"`` is backpropagated; the keys in ``logged`` are averaged per epoch), then
    ``before_step()`` (e.g. gradient clipping), the optimiser step and ``scheduler.step()`` once
    per epoch. Prints per-epoch test accuracy and time per step, and fastsd's share of the profiled
    steps (``--profile-steps`` steps of epoch ``profile_epoch``, after its first step). Returns a
    JSON-able summary."""
    profile_epoch = profile_epoch if profile_epoch < args.epochs else 0
    steps_per_epoch = len(train_loader) if args.steps_per_epoch is None else min(len(train_loader),
                                                                                 args.steps_per_epoch)
    window = range(1, 1 + args.profile_steps) if args.profile_steps > 0 else range(0)
    history, share = [], None
    device = env.device
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{steps_per_epoch} steps/epoch of {args.batch_size}, {env}{', compiled' if args.compile else ''}",
          flush=True)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        sums = {k: torch.zeros((), device=device) for k in logged}
        prof = None
        _sync(device)
        t_epoch = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            if epoch == profile_epoch and len(window) and i == window.start:
                _sync(device)
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                prof = torch.profiler.profile(activities=activities)
                prof.__enter__()
                t_prof = time.perf_counter()
            x, y = _to(x, y, env)
            progress = (epoch + i / steps_per_epoch) / args.epochs
            with env.autocast():
                out = step(x, y, epoch, progress)
            out["loss"].backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k in logged:
                sums[k] += torch.as_tensor(out[k]).detach().float()
            if prof is not None and i == window.stop - 1:
                _sync(device)
                wall = time.perf_counter() - t_prof
                prof.__exit__(None, None, None)
                share = fastsd_share(prof, wall, device, regions)
                share["steps"] = len(window)
                prof = None
        if prof is not None:  # fewer steps than the window: profile what ran
            _sync(device)
            wall = time.perf_counter() - t_prof
            prof.__exit__(None, None, None)
            share = fastsd_share(prof, wall, device, regions)
            share["steps"] = max(1, min(steps_per_epoch, window.stop) - window.start)
        _sync(device)
        seconds = time.perf_counter() - t_epoch
        if scheduler is not None:
            scheduler.step()
        acc = evaluate(model, test_loader, env, args.eval_batches)
        means = {k: float(v) / steps_per_epoch for k, v in sums.items()}
        history.append({"epoch": epoch + 1, "test_acc": acc, "ms_per_step": 1e3 * seconds / steps_per_epoch, **means})
        print(f"epoch {epoch + 1:3d}/{args.epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f"  test accuracy {acc:6.2f} %  {1e3 * seconds / steps_per_epoch:8.1f} ms/step"
              + ("  (warm-up included)" if epoch == 0 else "")
              + ("  (profiled steps included)" if epoch == profile_epoch and len(window) else ""), flush=True)
        if epoch == profile_epoch and share is not None:
            print_share(share, share["steps"], device)
    total = time.perf_counter() - start
    summary = {"script": name, "device": str(device), "epochs": args.epochs, "seconds": round(total, 1),
               "test_acc": history[-1]["test_acc"] if history else None, "history": history,
               "fastsd_share": None if share is None else {
                   "wall_s": share["wall"], "steps": share["steps"], "ops_s": share["ops"],
                   "regions_s": share["regions"]}}
    print(f"{name}: test accuracy {summary['test_acc']:.2f} % after {args.epochs} epochs, {total:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def warmup_epochs(rate: float, epochs: int) -> int:
    """The ICP trainer's warm-up in whole epochs: ``int(rate * epochs)``."""
    if not 0.0 <= rate <= 1.0 or math.isnan(rate):
        raise SystemExit(f"--warmup must be in [0, 1], got {rate}")
    return int(rate * epochs)
