"""Host time of the mix drop-ins behind queued GPU work, as in a training step (2026-11-27 lease).

A copy from pageable host memory waits for the device's stream to drain before it starts; the
drop-ins of a420cc0 made three or four of them a call, so in a training loop (the GPU busy with the
step queued before) the host waited for that work each call. This queues ``torch.cuda._sleep`` of
about 2 ms before each call and times the call on the host (perf_counter, no sync inside), this
tree's drop-ins beside a420cc0's (``--before``: a file of ``git archive a420cc0 fastsd``) and the
libraries', round-robin.

    PYTHONPATH=$PWD python docs/gpu/2026-11-27-h100/queued.py --before .dev/before.tar
"""
import argparse
import importlib
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench"))
from host_overhead import _before_package  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--before")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--sleep-cycles", type=int, default=4_000_000)
    a = p.parse_args()
    import fastsd.mix as fm
    trees = {"after": fm}
    if a.before:
        sys.path.insert(0, _before_package(a.before))
        trees["before"] = importlib.import_module("fastsd_before.mix")
    import timm.data
    from torchvision.transforms import v2

    dev = torch.device("cuda")
    x = torch.randn(256, 3, 32, 32, device=dev)
    y = torch.randint(0, 1000, (256,), device=dev)
    calls = {}
    for mode in ("batch", "elem"):
        kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=1000)
        calls[f"timm {mode}: timm"] = timm.data.Mixup(**kw)
        for t, m in trees.items():
            calls[f"timm {mode}: fastsd {t}"] = m.Mixup(**kw)
    for name in ("CutMix", "MixUp"):
        calls[f"{name}: torchvision"] = getattr(v2, name)(num_classes=1000)
        for t, m in trees.items():
            calls[f"{name}: fastsd {t}"] = getattr(m, name)(num_classes=1000)
    xs = {k: x.clone() for k in calls}
    for k, c in calls.items():  # warm-up (compiles, the partner rows, the pinned blocks)
        for _ in range(3):
            c(xs[k], y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(a.sleep_cycles)
    torch.cuda.synchronize()
    sleep_ms = (time.perf_counter() - t0) * 1e3
    idle, busy = {k: [] for k in calls}, {k: [] for k in calls}
    keys = list(calls)
    for r in range(a.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            for samples, queued in ((idle, False), (busy, True)):
                torch.cuda.synchronize()
                if queued:
                    torch.cuda._sleep(a.sleep_cycles)
                t = time.perf_counter()
                calls[k](xs[k], y)
                samples[k].append(time.perf_counter() - t)
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; 256x3x32x32 float32, 1000 classes; "
          f"queued work {sleep_ms:.2f} ms; host ms per call, median of {a.rounds} (round-robin)")
    print("| call | idle GPU | behind queued work |")
    print("|---|---|---|")
    for k in keys:
        print(f"| {k} | {statistics.median(idle[k]) * 1e3:.3f} | {statistics.median(busy[k]) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
