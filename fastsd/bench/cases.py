"""The one table of cases shared by the tests, ``python -m fastsd.selftest``, ``python -m fastsd.bench``
and the pytest-benchmark suites in bench/.

PARITY cases are small and awkward (odd sizes, grids that do not divide the image, full-resolution
masks, B = 0 and 1): cheap enough for the Triton interpreter. BENCH cases are the issue's
realistic sizes, run on the compiled backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class PatchSwapCase:
    name: str
    shape: Tuple[int, int, int, int]  # B, C, H, W
    grid: Tuple[int, int]  # gh, gw
    channels_last: bool = False
    classes: Optional[int] = None  # labels drawn from this many classes (None: B // 4 + 1)

    def make(self, dtype=torch.float32, device="cpu", seed: int = 0):
        """(x, partner, mask) for this case: same-class pairs and a ratio-0.5 mask."""
        from ..pairing import intra_class_pairs, patch_swap_mask

        gen = torch.Generator(device=device).manual_seed(seed)
        B = self.shape[0]
        x = torch.randn(self.shape, generator=gen, device=device)
        if dtype == torch.uint8:
            x = (x * 40 + 128).clamp(0, 255)
        x = x.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, self.classes or B // 4 + 1, (B,), generator=gen, device=device)
        partner = intra_class_pairs(labels, generator=gen)
        mask = patch_swap_mask(partner, self.grid, ratio=0.5, generator=gen)
        return x, partner, mask

    def bytes(self, dtype=torch.float32) -> int:
        """Minimum traffic of one pass: x read once, the output written once."""
        n = 1
        for s in self.shape:
            n *= s
        return 2 * n * torch.empty((), dtype=dtype).element_size()


PATCH_SWAP_PARITY = [
    PatchSwapCase("awkward", (3, 5, 33, 47), (7, 6)),
    PatchSwapCase("awkward_cl", (3, 5, 33, 47), (7, 6), channels_last=True),
    PatchSwapCase("cifar", (8, 3, 32, 32), (8, 8), classes=2),
    PatchSwapCase("full_res_mask", (4, 2, 9, 11), (9, 11), classes=1),
    PatchSwapCase("grid_1x1", (5, 3, 7, 5), (1, 1), classes=2),
    PatchSwapCase("one", (1, 3, 6, 6), (2, 2)),
    PatchSwapCase("one_pixel", (2, 1, 1, 1), (1, 1), classes=1),
    PatchSwapCase("empty", (0, 3, 8, 8), (4, 4)),
]

PATCH_SWAP_BENCH = [
    PatchSwapCase("256x3x32x32 grid 8x8", (256, 3, 32, 32), (8, 8), classes=10),
    PatchSwapCase("64x3x224x224 grid 7x7", (64, 3, 224, 224), (7, 7), classes=10),
    PatchSwapCase("128x64x56x56 grid 7x7", (128, 64, 56, 56), (7, 7), classes=10),
]

# CUDA runs only (python -m fastsd.bench --device cuda, make gpu-report): the 32 px batch in cells of
# 2-3 px, which the Triton kernel takes in its EACH variant (a cell an element in 16-byte chunks),
# timed beside the 8x8 grid's whole 16-byte chunks. Not in the CPU run, whose README table it would
# change.
PATCH_SWAP_GPU_BENCH = [
    PatchSwapCase("256x3x32x32 grid 11x11", (256, 3, 32, 32), (11, 11), classes=10),
]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,
}
