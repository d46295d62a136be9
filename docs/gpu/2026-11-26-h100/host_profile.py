"""Host time per call on CUDA of fastsd's public calls (no sync in the loop) and a cProfile of each."""
import cProfile, pstats, io, time, statistics, sys
import numpy as np, torch, fastsd, fastsd.mix as fm
from fastsd.bench.cases import PatchSwapCase
from fastsd.mix.op import mix_unchecked, mix_unchecked_
dev = "cuda"
x, partner, mask = PatchSwapCase("c", (256, 3, 32, 32), (8, 8)).make(torch.float32, dev)
B = 256
flip = torch.arange(B - 1, -1, -1, device=dev)
boxes = torch.zeros(B, 4, dtype=torch.long, device=dev); boxes[:, 1] = 16; boxes[:, 3] = 16
lam = torch.rand(B, device=dev); use_box = torch.rand(B, device=dev) < 0.5
y = torch.randint(0, 1000, (B,), device=dev)
mixup = fm.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=1000, mode="batch")
cut = fm.CutMix(num_classes=1000)
calls = {}
for b in ("triton", "cuda"):
    calls[f"patch_swap {b}"] = (b, lambda: fastsd.patch_swap(x, partner, mask))
    calls[f"mix_unchecked {b}"] = (b, lambda: mix_unchecked(x, flip, boxes, lam, use_box))
    calls[f"mix (checked) {b}"] = (b, lambda: fm.mix(x, flip, boxes, lam, use_box))
    calls[f"Mixup batch {b}"] = (b, lambda: mixup(x, y))
    calls[f"CutMix {b}"] = (b, lambda: cut(x, y))
calls["torch.where"] = ("torch", lambda: torch.where(use_box[:, None, None, None], x, x[flip]))
res = {}
for name, (b, fn) in calls.items():
    with fastsd.use_backend(b):
        for _ in range(30): fn()
        torch.cuda.synchronize()
        ts = []
        for r in range(7):
            t0 = time.perf_counter()
            for _ in range(100): fn()
            ts.append((time.perf_counter() - t0) / 100 * 1e6)
            torch.cuda.synchronize()
        res[name] = statistics.median(ts)
for name, us in res.items():
    print(f"{name:28s} host {us:7.1f} us/call")
for name in ("patch_swap triton", "mix_unchecked triton", "Mixup batch cuda", "patch_swap cuda"):
    b, fn = calls[name]
    with fastsd.use_backend(b):
        pr = cProfile.Profile(); pr.enable()
        for _ in range(200): fn()
        pr.disable(); torch.cuda.synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    print(f"=== {name} (200 calls; tottime)"); print("\n".join(l[:150] for l in s.getvalue().splitlines()[6:24]))
