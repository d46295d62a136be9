"""On a GPU: the compiled mix kernels (kernels/mix.py) against the reference on the same CUDA tensors,
bit for bit: out of place, in place and the backward, every dtype and layout, the shapes the AOT specs
read (CIFAR and ImageNet batches: 16-byte chunks) and odd ones (1-element chunks).

tests/test_mix_triton.py proves the same under the interpreter; what only the device shows is the
compiled rounding (no fused multiply-add, the GPU's bfloat16 conversion) and the vector accesses.
"""
import pytest
import torch

import fastsd
import fastsd.mix as fm
from fastsd import _backend
from fastsd import reference as R
from test_mix_triton import LAYOUTS, ROWS, _bits, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8]
SHAPES = [(256, 3, 32, 32), (16, 3, 224, 224), (5, 3, 17, 23), (3, 3, 299, 299)]


def _on_device(args):
    return [a.to(DEV) for a in args]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_compiled_kernels_are_the_reference(dtype, layout, shape):
    x = torch.empty(0, device=DEV)
    why = _backend.reasons("mix", "triton", x)
    if why:
        pytest.skip("; ".join(why))
    for seed, rows in enumerate(ROWS):
        x, *args = _on_device(make(shape, dtype, layout, rows, seed))
        want = R.mix(x, *args)
        with fastsd.use_backend("triton"):
            assert torch.equal(_bits(fm.mix(x, *args)), _bits(want)), rows
        y, *args = _on_device(make(shape, dtype, layout, rows, seed, involution=True))
        want = R.mix(y, *args)
        with fastsd.use_backend("triton"):
            fm.mix_(y, *args)
        assert torch.equal(_bits(y), _bits(want)), rows
        if dtype.is_floating_point:
            x, *args = _on_device(make(shape, dtype, layout, rows, seed))
            grad = torch.randn(x.shape, device=DEV).to(dtype).contiguous(memory_format=LAYOUTS[layout])
            with fastsd.use_backend("triton"):
                (gx,) = torch.autograd.grad(fm.mix(x.requires_grad_(True), *args), x, grad)
            assert torch.equal(_bits(gx), _bits(R.mix_backward(grad, *args))), rows
    torch.cuda.synchronize()
