"""fastsd.mix.RandomCutMixV2 against kornia's own RandomCutMixV2: same seed, bit-identical images,
class output and RNG state afterwards, on every backend of the mix op; the fused path is the one
that ran; gradients equal kornia's."""
import warnings

import pytest
import torch

import fastsd
import fastsd.mix as fm
from fastsd import _backend
from fastsd.mix._kornia import _half_open_boxes

kornia_aug = pytest.importorskip("kornia.augmentation")

BACKENDS = [b for b in ("cpp", "triton", "torch") if not _backend.reasons("mix", b, torch.empty(0))]

OPTIONS = [
    dict(),
    dict(use_correct_lambda=True),
    dict(p=0.5),
    dict(p=0.0),
    dict(same_on_batch=True),
    dict(cut_size=(0.3, 0.9), beta=0.5),
    dict(cut_size=(0.97, 1.0)),  # cuts of floor(sqrt(0.03) * side) px: empty on the small images
    dict(num_mix=2),  # kornia's own apply_transform
]


def _pair(shape, dtype, channels_last, seed, options, data_keys=("input", "class"), backend="cpp"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (shape[0],), generator=g)
    inputs = [x, labels][:len(data_keys)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kornia's use_correct_lambda=False notice
        lib = kornia_aug.RandomCutMixV2(data_keys=list(data_keys), **options)
        ours = fm.RandomCutMixV2(data_keys=list(data_keys), **options)
    torch.manual_seed(seed)
    expected = lib(*[t.clone() for t in inputs])
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with fastsd.use_backend(backend):
        got = ours(*inputs)
    return expected, got, state, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("shape,dtype,channels_last", [
    ((6, 3, 17, 23), torch.float32, False),
    ((2, 1, 9, 4), torch.float64, False),
    ((5, 4, 16, 16), torch.float32, True),
    ((3, 2, 7, 11), torch.float16, False),
    ((4, 3, 8, 8), torch.bfloat16, True),
])
def test_same_as_kornia(shape, dtype, channels_last, options, backend):
    for seed in range(3):
        expected, got, state, x = _pair(shape, dtype, channels_last, seed, options, backend=backend)
        assert len(got) == len(expected) == 2
        assert got[0].dtype == expected[0].dtype and torch.equal(got[0], expected[0]), seed
        assert torch.equal(got[1], expected[1]), seed
        assert torch.equal(torch.get_rng_state(), state), "a different number of draws"


def test_input_only_and_keepdim():
    for keepdim, shape in ((True, (3, 12, 10)), (False, (2, 3, 12, 10))):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=g)
        lib = kornia_aug.RandomCutMixV2(data_keys=["input"], keepdim=keepdim, use_correct_lambda=True)
        ours = fm.RandomCutMixV2(data_keys=["input"], keepdim=keepdim, use_correct_lambda=True)
        torch.manual_seed(5)
        expected = lib(x.clone())
        torch.manual_seed(5)
        got = ours(x)
        assert got.shape == expected.shape and torch.equal(got, expected)


def test_fused_pass_runs_once_and_input_is_kept(monkeypatch):
    import fastsd.mix._kornia as K

    calls = []
    real = K.mix_unchecked
    monkeypatch.setattr(K, "mix_unchecked", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(8, 3, 16, 16)
    before = x.clone()
    out, _ = fm.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)(x, torch.arange(8))
    assert len(calls) == 1 and calls[0][4].all()
    assert torch.equal(x, before) and not torch.equal(out, x)


def test_gradient_same_as_kornia():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 10, 12, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 10, 12, generator=g, dtype=torch.float64)
    grads = []
    for cls in (kornia_aug.RandomCutMixV2, fm.RandomCutMixV2):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        (cls(data_keys=["input"], use_correct_lambda=True)(xi) * w).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], w)  # some pixels were sent to their partner


def test_box_conversion_matches_kornias_mask():
    """The half-open boxes cover exactly kornia's bbox_to_mask pixels, inverted (empty) boxes
    included, on the integer vertices its generator makes."""
    from kornia.geometry.bbox import bbox_generator, bbox_to_mask

    from fastsd.reference.mix import box_mask

    H, W = 7, 9
    cases = [(x, y, w, h) for x in (0, 3, 8) for y in (0, 2, 6) for w in (0, 1, 4) for h in (0, 1, 5)
             if x + w <= W and y + h <= H]
    x, y, w, h = (torch.tensor([c[k] for c in cases], dtype=torch.float32) for k in range(4))
    crop = bbox_generator(x, y, w, h)
    assert torch.equal(box_mask(_half_open_boxes(crop, H, W), H, W), bbox_to_mask(crop, W, H).bool())


def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, fastsd.mix; a = 'kornia' in sys.modules; fastsd.mix.RandomCutMixV2; "
            "print(a, 'kornia' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
