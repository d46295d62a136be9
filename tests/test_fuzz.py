"""Property tests: on inputs nobody hand-picked, every backend gives the reference's answer.

Examples per op: FASTSD_FUZZ_EXAMPLES (default 200); the Triton interpreter gets a quarter of
them (it is slow). Hypothesis runs derandomized with no example database, so CI is reproducible.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsd
from fastsd import reference as R

from conftest import CPU_BACKENDS, backward_tolerance

EXAMPLES = int(os.environ.get("FASTSD_FUZZ_EXAMPLES", "200"))
SETTINGS = dict(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8]
SIZES = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 31, 32, 33]), st.integers(1, 40))


@st.composite
def patch_swap_inputs(draw):
    B = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 11]))
    C = draw(st.sampled_from([1, 2, 3, 5]))
    H, W = draw(SIZES), draw(SIZES)
    gh, gw = draw(st.integers(1, H)), draw(st.integers(1, W))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced"]))
    labels_kind = draw(st.sampled_from(["one_class", "distinct", "skewed", "random"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H + (layout == "sliced"), W, generator=g) * 30
    x = x.to(dtype) if dtype != torch.uint8 else (x + 128).clamp(0, 255).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, 1:]
    labels = {
        "one_class": torch.zeros(B, dtype=torch.long),
        "distinct": torch.arange(B),
        "skewed": (torch.rand(B, generator=g) < 0.2).long(),
        "random": torch.randint(0, 3, (B,), generator=g),
    }[labels_kind]
    partner = fastsd.intra_class_pairs(labels, generator=g)
    if draw(st.booleans()):
        mask = fastsd.patch_swap_mask(partner, (gh, gw), ratio=draw(st.floats(0, 1)),
                                      prob=draw(st.floats(0, 1)), generator=g)
    else:  # any permutation and independent masks: the backward's general case
        partner = torch.randperm(B, generator=g)
        mask = torch.rand(B, gh, gw, generator=g) < 0.5
    return x, labels, partner, mask


def _check(backend, x, labels, partner, mask):
    expected = R.patch_swap(x, partner, mask)
    with fastsd.use_backend(backend):
        out = fastsd.patch_swap(x, partner, mask)
        assert torch.equal(out, expected)
        if x.is_floating_point():
            xr = x.detach().clone().requires_grad_()
            g = torch.randn(x.shape).to(x.dtype)
            fastsd.patch_swap(xr, partner, mask).backward(g)
            torch.testing.assert_close(xr.grad, R.patch_swap_backward(g, partner, mask), **backward_tolerance(backend, x.dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patch_swap_matches_reference(backend):
    n = EXAMPLES if backend != "triton" else max(10, EXAMPLES // 4)

    @settings(max_examples=n, **SETTINGS)
    @given(patch_swap_inputs())
    def run(inputs):
        _check(backend, *inputs)

    run()


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(labels=st.lists(st.integers(-3, 4), min_size=0, max_size=60), seed=st.integers(0, 2**31 - 1),
       grid=st.tuples(st.integers(1, 9), st.integers(1, 9)), ratio=st.floats(0, 1), prob=st.floats(0, 1))
def test_pairs_and_masks_properties(labels, seed, grid, ratio, prob):
    labels = torch.tensor(labels, dtype=torch.long)
    B = len(labels)
    g = torch.Generator().manual_seed(seed)
    partner = fastsd.intra_class_pairs(labels, generator=g)
    assert torch.equal(partner[partner], torch.arange(B))
    assert torch.equal(labels[partner], labels)
    n_single = int((partner == torch.arange(B)).sum())
    assert n_single == sum(int((labels == c).sum()) % 2 for c in labels.unique())
    mask = fastsd.patch_swap_mask(partner, grid, ratio=ratio, prob=prob, generator=g)
    k = round(ratio * grid[0] * grid[1])
    sums = mask.flatten(1).sum(1)
    assert bool(((sums == k) | (sums == 0)).all())
    assert torch.equal(mask, mask[partner])
    assert not mask[partner == torch.arange(B)].any()
