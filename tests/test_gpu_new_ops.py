"""On a GPU: the compiled pairing/mask kernels and the mix drop-ins on CUDA tensors.

The CPU tests prove them under the interpreter (tests/test_pairing_triton.py) and on CPU tensors
(tests/test_mix.py); here the same comparisons run on the device: Triton's compiled pairing and mask
kernels bit for bit against the reference backend from one CUDA generator, and fastsd.mix against
timm's Mixup and torchvision's CutMix/MixUp on CUDA batches (timm draws on the host with numpy, so
the same seed gives the same boxes and lambdas on any device).
"""
import pytest
import torch

import fastsd
from fastsd import _backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"


def _cuda_gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _needs_triton(op, *tensors):
    why = _backend.reasons(op, "triton", *tensors)
    if why:
        pytest.skip("; ".join(why))


@pytest.mark.parametrize("B, classes", [(1, 1), (2, 1), (7, 3), (256, 10), (513, 300)])
@pytest.mark.parametrize("grid, ratio, prob", [((1, 1), 1.0, 1.0), ((8, 8), 0.5, 1.0), ((7, 7), 0.5, 0.5),
                                               ((32, 32), 0.3, 0.9)])
def test_intra_class_patch_swap_triton_is_the_reference(B, classes, grid, ratio, prob):
    labels = torch.randint(0, classes, (B,), device=DEV, generator=_cuda_gen(B))
    x = torch.randn(B, 3, 2 * grid[0], 2 * grid[1], device=DEV, generator=_cuda_gen(1))
    _needs_triton("intra_class_pairs", labels)
    out = {}
    for backend in ("torch", "triton"):
        with fastsd.use_backend(backend):
            out[backend] = fastsd.intra_class_patch_swap(x, labels, patch_size=2, ratio=ratio, prob=prob,
                                                         generator=_cuda_gen(7))
    for got, want in zip(out["triton"], out["torch"]):
        assert got.device == x.device
        assert torch.equal(got, want)


def _timm():
    return pytest.importorskip("timm.data")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("kwargs", [dict(mixup_alpha=0.8, cutmix_alpha=1.0), dict(cutmix_alpha=1.0),
                                    dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.8),
                                                                correct_lam=False)])
def test_mix_matches_timm_on_cuda(mode, kwargs, dtype):
    """(float16: timm rounds the per-row lambdas of the targets to x's dtype on the host, fastsd casts
    the rows' float32 lambdas on the device)"""
    import numpy as np
    import fastsd.mix

    timm_data = _timm()
    args = dict(mode=mode, num_classes=10, label_smoothing=0.1, **kwargs)
    x = torch.randn(16, 3, 32, 24, device=DEV, generator=_cuda_gen(3)).to(dtype)
    y = torch.randint(0, 10, (16,), device=DEV, generator=_cuda_gen(4))
    np.random.seed(0)
    want_x, want_y = timm_data.Mixup(**args)(x.clone(), y)
    state = np.random.get_state()
    np.random.seed(0)
    got_x, got_y = fastsd.mix.Mixup(**args)(x.clone(), y)
    assert got_x.device == x.device and torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    after = np.random.get_state()
    assert np.array_equal(after[1], state[1]) and after[2] == state[2]  # the same draws taken


@pytest.mark.parametrize("name", ["CutMix", "MixUp"])
def test_mix_matches_torchvision_on_cuda(name):
    v2 = pytest.importorskip("torchvision.transforms.v2")
    import fastsd.mix

    x = torch.randn(8, 3, 20, 28, device=DEV, generator=_cuda_gen(5))
    y = torch.randint(0, 5, (8,), device=DEV, generator=_cuda_gen(6))
    torch.manual_seed(0)
    want = getattr(v2, name)(num_classes=5)(x.clone(), y)
    torch.manual_seed(0)
    got = getattr(fastsd.mix, name)(num_classes=5)(x.clone(), y)
    assert got[0].device == x.device
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_drop_ins_never_wait_for_the_gpu():
    """The drop-ins' per-row arguments reach the GPU through pinned memory without blocking
    (fastsd.mix._rows._Staging): no call waits for the work queued before it (torch's sync debug
    mode raises on a synchronising call, e.g. a copy from pageable memory)."""
    import fastsd.mix as fm

    x = torch.randn(16, 3, 32, 32, device=DEV, generator=_cuda_gen(7))
    y = torch.randint(0, 10, (16,), device=DEV, generator=_cuda_gen(8))
    calls = [fm.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=10) for mode in ("batch", "pair", "elem")]
    calls += [fm.CutMix(num_classes=10), fm.MixUp(num_classes=10)]
    for call in calls:  # the first call of a batch size makes its partner rows (waited for once)
        call(x.clone(), y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            for _ in range(4):
                call(x.clone(), y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
