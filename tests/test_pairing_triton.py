"""The Triton backend of pairing and cell masks under the interpreter: bit-for-bit parity with the
reference (fastsd/reference/pairing.py) from the same generator, on every edge the kernels have
(kernels/pairing.py).
"""
import re

import pytest
import torch

import fastsd
import triton_tools
from fastsd import _backend
from fastsd.kernels import pairing as kernels
from fastsd.reference import pairing as R

pytestmark = pytest.mark.skipif(bool(_backend.reasons("intra_class_pairs", "triton", torch.empty(0))),
                                reason="the Triton backend cannot run here")

SEEDS = range(4)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


LABELS = {
    "empty": torch.empty(0, dtype=torch.long),
    "one": torch.tensor([5]),
    "two of a class": torch.tensor([3, 3]),
    "two classes": torch.tensor([1, 0]),
    "one odd class": torch.zeros(7, dtype=torch.long),
    "odd classes": torch.tensor([3, 1, 3, 3, 1, 2, 2, 2, 2, 0, 3]),
    "all singletons": torch.randperm(37, generator=_gen(9)),
    "many classes": torch.randint(0, 300, (513,), generator=_gen(1)),  # several blocks of the kernel
    "few classes, large": torch.randint(0, 3, (700,), generator=_gen(2)),
    "negative int32": torch.tensor([-3, 7, -3, 7, 7], dtype=torch.int32),
    "uint8": torch.randint(0, 255, (40,), generator=_gen(3)).to(torch.uint8),
    "int16": torch.randint(-5, 5, (33,), generator=_gen(4)).to(torch.int16),
    "wide int64": torch.tensor([2 ** 40, -2 ** 40, 2 ** 40, 1, -2 ** 40, 2 ** 40 + 1]),
}


@pytest.mark.parametrize("name", list(LABELS))
def test_pairs_bitwise_as_reference(name):
    labels = LABELS[name]
    for seed in SEEDS:
        got = {}
        for backend in ("torch", "triton"):
            with fastsd.use_backend(backend):
                got[backend] = fastsd.intra_class_pairs(labels, generator=_gen(seed))
        assert got["triton"].dtype == torch.int64
        assert torch.equal(got["triton"], got["torch"]), (seed, got)


# (gh, gw, ratio, prob)
MASKS = [
    (1, 1, 1.0, 1.0), (1, 1, 0.0, 1.0), (3, 5, 0.4, 0.7), (8, 8, 0.5, 1.0), (7, 7, 0.5, 0.5),
    (2, 3, 1.0, 0.0), (4, 4, 0.0, 0.3), (5, 1, 0.25, 1.0),
    (16, 16, 0.5, 1.0),  # a full-resolution mask of a 16 x 16 image (256 cells, two tiles a row)
    (32, 32, 0.3, 0.9),  # the largest grid the kernel ranks (MAX_CELLS)
    (33, 33, 0.5, 1.0),  # past it: the reference's sort
]


@pytest.mark.parametrize("gh, gw, ratio, prob", MASKS)
@pytest.mark.parametrize("B", [0, 1, 2, 9])
def test_masks_bitwise_as_reference(B, gh, gw, ratio, prob):
    labels = torch.randint(0, 3, (B,), generator=_gen(B))
    for seed in SEEDS if gh * gw <= 64 else SEEDS[:1]:
        got = {}
        for backend in ("torch", "triton"):
            with fastsd.use_backend(backend):
                partner = fastsd.intra_class_pairs(labels, generator=_gen(seed))
                got[backend] = fastsd.patch_swap_mask(partner, (gh, gw), ratio, prob, generator=_gen(seed + 10))
        assert got["triton"].dtype == torch.bool and got["triton"].shape == (B, gh, gw)
        assert torch.equal(got["triton"], got["torch"]), seed


def test_intra_class_patch_swap_bitwise_as_reference():
    g = _gen(0)
    x = torch.randn(9, 2, 12, 10, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1])
    for patch_size in (None, 1, (4, 5), (12, 10)):  # full resolution and 1 x 1 grids included
        got = {}
        for backend in ("torch", "triton"):
            with fastsd.use_backend(backend):
                got[backend] = fastsd.intra_class_patch_swap(x, labels, patch_size=patch_size, ratio=0.5, prob=0.8,
                                                             generator=_gen(5))
        for a, b in zip(got["triton"], got["torch"]):
            assert torch.equal(a, b), patch_size


def test_masks_of_any_permutation_as_reference():
    # patch_swap_mask takes any permutation (not only fastsd's involutions): each row reads its own
    # leader, min(b, partner[b]), as the reference does
    partner = torch.tensor([1, 2, 0, 3, 5, 6, 4])
    for seed in SEEDS:
        got = {}
        for backend in ("torch", "triton"):
            with fastsd.use_backend(backend):
                got[backend] = fastsd.patch_swap_mask(partner, (3, 3), 0.5, 1.0, generator=_gen(seed))
        assert torch.equal(got["triton"], got["torch"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_kernel_ties_and_prob_rounding(dtype):
    """Ties among a row's keys (float32 numbers tie at full resolution) go by cell index, as the
    stable argsort; the activation draw compares with prob rounded to the noise's dtype, as torch
    compares a tensor with a Python float (0.7 rounds down in float32: a draw equal to it is not
    below it)."""
    B, gh, gw = 6, 4, 5
    cells = gh * gw
    partner = torch.tensor([1, 0, 3, 2, 4, 5])
    noise = (torch.randint(0, 4, (B, cells + 1), generator=_gen(0)) / 4).to(dtype)  # many ties
    noise[:, cells] = torch.tensor(0.7, dtype=dtype)
    noise[2, cells] = torch.tensor(0.69, dtype=dtype)
    for k, prob in ((7, 0.7), (7, 1.0), (cells, 0.7), (0, 1.0), (13, 0.0)):
        expected = R.cell_mask(partner, noise, gh, gw, k, prob)
        got = kernels.cell_mask(partner, noise, gh, gw, k, prob)
        assert torch.equal(got, expected), (k, prob)
    active = kernels.cell_mask(partner, noise, gh, gw, 7, 0.7).flatten(1).any(1)
    assert active.tolist() == [False, False, True, True, False, False]  # draw == prob is not below it


def test_pair_kernel_from_given_order():
    # the kernel against the reference on hand-made permutations: identity, reversal, random
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0])
    n = labels.shape[0]
    for order in (torch.arange(n), torch.arange(n).flip(0), torch.randperm(n, generator=_gen(3))):
        got = kernels.pair_by_label(*R.sorted_by_label(labels, order), order)
        assert torch.equal(got, R.pair_by_label(labels, order)), order


def test_ops_have_fake_kernels():
    labels, order = torch.tensor([0, 1, 0, 1, 1]), torch.tensor([4, 2, 0, 1, 3])
    partner = torch.tensor([2, 3, 0, 1, 4])
    noise = torch.rand(5, 7, generator=_gen(0))
    for backend in ("torch", "triton"):
        with fastsd.use_backend(backend):
            torch.library.opcheck(torch.ops.fastsd.intra_class_pairs.default, (labels, order))
            torch.library.opcheck(torch.ops.fastsd.patch_swap_mask.default, (partner, noise, 2, 3, 3, 0.5))


def test_activation_draw_compares_in_the_noise_dtype():
    """On a GPU prob arrives as a float64 parameter and a float32 draw compared with it would be
    promoted (0.7 > float32(0.7)); torch compares in the tensor's dtype. The interpreter compares a
    Python float in the tensor's dtype whatever the kernel does, so this reads the compiled code."""
    names = [s["name"] for s in kernels.AOT_SPECS if s["name"].startswith("pair_mask_")]
    compiled = triton_tools.aot_compile_all([(n, 90) for n in names])
    for name in names:
        ttir = compiled[(name, 90)].ttir
        if "_fp32_" in name:
            rounded = re.search(r"%(\w+) = arith\.truncf %prob : f64 to f32", ttir)
            assert rounded and re.search(rf"arith\.cmpf olt, %draw\w*, %{rounded[1]} : f32", ttir), name
        else:
            assert re.search(r"arith\.cmpf olt, %draw\w*, %prob : f64", ttir), name


def test_aot_specs_of_interpreted_kernels_keep_do_not_specialize():
    """kernels/_aot.py rebuilds an interpreted kernel's JITFunction for its specs: with the decorator's
    do_not_specialize, as on a GPU (else cells % 16 == 0 and k == 1 would make variants the GPU
    never compiles, named differently here than in the AOT worker, which does not interpret)."""
    from fastsd.kernels import _aot

    meta = dict(device="meta")
    args = (torch.empty(4, dtype=torch.int64, **meta), torch.empty(4, 33, **meta),
            torch.empty(4, 32, dtype=torch.bool, **meta), 32, 1, 0.5)
    spec = _aot.launch_spec("t", kernels._mask_kernel, args, dict(TI=32, TJ=32))
    assert spec["signature"]["cells"] == "i32" and spec["signature"]["k"] == "i32"
    assert (3,) not in spec["attrs"]
