"""On CUDA: fastsd.mix's drop-ins vs timm / torchvision, bit for bit, on each CUDA backend; and the
host time per call of each, interleaved (median of 200, after warm-up)."""
import itertools, time, statistics
import numpy as np, torch, fastsd, fastsd.mix as fm
import timm.data.mixup as tm
from torchvision.transforms import v2
dev = "cuda"
bad = 0
for backend in ("triton", "cuda"):
    with fastsd.use_backend(backend):
        for mode, kw, dt in itertools.product(["batch", "pair", "elem"], [dict(mixup_alpha=0.8, cutmix_alpha=1.0), dict(mixup_alpha=1.0), dict(cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.8))], [torch.float32, torch.float16]):
            x = torch.randn(16, 3, 32, 24, device=dev).to(dt); y = torch.randint(0, 10, (16,), device=dev)
            for seed in range(3):
                np.random.seed(seed); w = tm.Mixup(num_classes=10, mode=mode, **kw)(x.clone(), y)
                np.random.seed(seed); g = fm.Mixup(num_classes=10, mode=mode, **kw)(x.clone(), y)
                ok = torch.equal(w[0], g[0]) and torch.equal(w[1], g[1]); bad += not ok
                if not ok: print("MISMATCH timm", backend, mode, kw, dt, seed)
        for name, ldt in itertools.product(["CutMix", "MixUp"], [None, torch.float32, torch.float16, torch.bfloat16, torch.float64]):
            x = torch.randn(8, 3, 20, 28, device=dev); y = torch.randint(0, 5, (8,), device=dev)
            lab = y if ldt is None else torch.rand(8, 5, device=dev).to(ldt)
            for seed in range(3):
                torch.manual_seed(seed); w = getattr(v2, name)(num_classes=5)(x.clone(), lab)
                torch.manual_seed(seed); g = getattr(fm, name)(num_classes=5)(x.clone(), lab)
                ok = torch.equal(w[0], g[0]) and torch.equal(w[1], g[1]); bad += not ok
                if not ok: print("MISMATCH tv", backend, name, ldt, seed)
print("drop-in parity on CUDA:", "OK" if not bad else f"{bad} MISMATCHES")
