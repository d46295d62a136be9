"""Arguments of fastsd.mix for the parity tests of its kernels (tests/test_mix_triton.py, the Triton
kernels under the interpreter; tests/test_cuda_mix_emulation.py, the CUDA kernels on the host):
random rows of every kind, boxes full, empty and at the corners, lam at 0, 0.5 and 1."""
import torch

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64, torch.uint8: torch.uint8}


def bits(t):
    """t's bit patterns (an integer view of the same width): -0.0 and NaN payloads compare as bits."""
    return t.view(_BITS[t.dtype])


def pairs(B, g):
    """Random pairs; with B odd one sample is its own partner."""
    order, partner = torch.randperm(B, generator=g), torch.arange(B)
    for k in range(0, B - 1, 2):
        a, b = order[k], order[k + 1]
        partner[a], partner[b] = b, a
    return partner


def make(shape, dtype, layout, rows, seed, lam_dtype=torch.float32, involution=False):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:  # finite: MixUp rows compare bit for bit (a NaN's payload is not the op's business)
        x = torch.randn(shape, generator=g, dtype=torch.float64).mul(10).to(dtype)
        x.view(-1)[::7] = -0.0  # copied as it is by CutMix rows
    x = x.contiguous(memory_format=LAYOUTS[layout])
    partner = pairs(B, g) if involution else torch.randperm(B, generator=g)
    ys = torch.randint(0, H + 1, (B, 2), generator=g).sort(1).values
    xs = torch.randint(0, W + 1, (B, 2), generator=g).sort(1).values
    boxes = torch.cat([ys, xs], 1)
    boxes[0] = torch.tensor([0, H, 0, W]) if seed % 2 else torch.tensor([1, 1, 0, W])  # full / empty
    if B > 3:  # boxes at the top left and bottom right corners: lines that start or end in the box
        boxes[1] = torch.tensor([0, H // 2 + 1, 0, W // 2 + 1])
        boxes[2] = torch.tensor([H // 2, H, W // 2, W])
    if B > 1:
        boxes[-1] = torch.tensor([0, H, W, W])  # empty
    lam = torch.rand(B, generator=g, dtype=torch.float64).to(lam_dtype)
    lam[0] = 0.5  # uint8: ties, rounded half to even
    if B > 2:
        lam[1], lam[2] = 0.0, 1.0
    if involution:  # a MixUp row that is its own partner changes (x * lam + x * (1 - lam)): not 0 or 1
        lam[partner == torch.arange(B)] = 0.3
    use_box = {"cutmix": torch.ones(B, dtype=torch.bool), "mixup": torch.zeros(B, dtype=torch.bool),
               "mixed": torch.rand(B, generator=g) < 0.5}[rows]
    if rows == "mixed" and B > 1:
        use_box[0], use_box[-1] = True, False
    return x, partner, boxes, lam, use_box
