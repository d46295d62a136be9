"""fastsd.mix: the fused mix op, out of place and in place (reference against timm's row-by-row expression, backends against the
reference, gradient, registration, bad input) and the drop-ins against the libraries' own code
(timm's Mixup / FastCollateMixup, torchvision's v2 CutMix / MixUp): same seed, bit-identical images,
targets and RNG state afterwards.
"""
import functools
import importlib.util
import itertools

import numpy as np
import pytest
import torch

import fastsd
import fastsd.mix as fm
from fastsd import _backend
from fastsd import reference as R
from fastsd.mix._numpy_rng import RawWords, consumes_word
from fastsd.mix.op import mix_unchecked

from conftest import NoHostSync

BACKENDS = [b for b in ("triton", "cpp", "torch") if not _backend.reasons("mix", b, torch.empty(0))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8]
SHAPES = [(2, 3, 5, 7), (6, 3, 17, 23), (5, 4, 32, 32), (4, 1, 9, 1)]


def make_case(shape, dtype, seed, lam_dtype=torch.float32, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64).mul(10).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    partner = torch.randperm(B, generator=g)
    y = torch.randint(0, H + 1, (B, 2), generator=g).sort(1).values
    xx = torch.randint(0, W + 1, (B, 2), generator=g).sort(1).values
    boxes = torch.cat([y, xx], 1)
    boxes[0] = torch.tensor([0, H, 0, W])  # a full box
    boxes[-1] = torch.tensor([1, 1, 0, W])  # an empty one
    lam = torch.rand(B, generator=g, dtype=torch.float64).to(lam_dtype)
    lam[0], lam[-1] = 0.0, 1.0
    use_box = torch.rand(B, generator=g) < 0.5
    return x, partner, boxes, lam, use_box


def timm_rows(x, partner, boxes, lam, use_box):
    """The op as timm writes it, row by row: ``x[i] * lam + x[j] * (1 - lam)`` with a numpy float32
    (or Python float) lambda, uint8 as FastCollateMixup rounds it, and box rows by slicing."""
    out = x.clone()
    for i in range(x.shape[0]):
        j = int(partner[i])
        if use_box[i]:
            y0, y1, x0, x1 = boxes[i].tolist()
            out[i][:, y0:y1, x0:x1] = x[j][:, y0:y1, x0:x1]
            continue
        # 1 - lam in lam's dtype (numpy float32 arithmetic; NumPy 1 would make 1 - np.float32 a float64,
        # which the timm drop-in follows by passing the op a float64 lambda: test_timm_mixup)
        lm, rest = (np.float32(lam[i]), np.float32(1) - np.float32(lam[i])) if lam.dtype == torch.float32 else (
            float(lam[i]), 1 - float(lam[i]))
        if x.dtype == torch.uint8:
            out[i] = torch.round(x[i].float() * lm + x[j].float() * rest).byte()
        else:
            out[i] = x[i] * lm + x[j] * rest
    return out


@pytest.mark.parametrize("lam_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_timms_expression(dtype, lam_dtype):
    for seed, shape in enumerate(SHAPES):
        args = make_case(shape, dtype, seed, lam_dtype)
        assert torch.equal(R.mix(*args), timm_rows(*args))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_parity(dtype, channels_last, backend):
    for seed, shape in enumerate(SHAPES):
        for lam_dtype in (torch.float32, torch.float64):
            x, *rest = make_case(shape, dtype, seed, lam_dtype, channels_last)
            x0 = x.clone()
            with fastsd.use_backend(backend):
                out = fm.mix(x, *rest)
            assert torch.equal(out, R.mix(x, *rest)), (shape, lam_dtype)
            assert torch.equal(x, x0)  # never modified
            assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def random_involution(B, g):
    """Disjoint random pairs, and a row that is its own partner when B is odd (or at random)."""
    perm = torch.randperm(B, generator=g)
    partner = torch.arange(B)
    for k in range(0, B - 1, 2):
        if torch.rand((), generator=g) < 0.85:
            a, b = perm[k], perm[k + 1]
            partner[a], partner[b] = b, a
    return partner


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_of_place_pairs(dtype, channels_last, backend):
    """Rows that are each other's partner (the C++ kernel writes both outputs of a pair from one read
    of both rows), rows in longer cycles and rows that are their own partner, in one batch; every
    kind of pair (MixUp/MixUp, CutMix/CutMix, either mixed); rows of under 64 bytes, of 64 to 256
    (one select pass for a CutMix pair) and over 256 (copies by segment, in chunks of image rows)."""
    # pairs (0, 1) (2, 3) (4, 5) (6, 7); 8 -> 9 -> 10 -> 8; 11 its own partner; 12 -> 0, a partner
    # that is not a permutation (0's partner is 1: 12 is in no pair)
    partner = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6, 9, 10, 8, 11, 0])
    use_box = torch.tensor([False, False, True, True, True, False, False, True, True, False, True, True, True])
    for seed, shape in enumerate([(13, 2, 9, 7), (13, 3, 17, 23), (13, 2, 34, 70), (13, 1, 70, 20)]):
        x, _, boxes, lam, _ = make_case(shape, dtype, seed, (torch.float32, torch.float64)[seed % 2], channels_last)
        H, W = shape[2:]
        boxes[2:4] = torch.tensor([[1, 5, 0, 3], [4, H, 2, W]])  # overlapping rows
        boxes[4] = torch.tensor([H // 4, H - 1, 1, W - 1])  # (70 rows: across a chunk of 4 KiB in float64)
        with fastsd.use_backend(backend):  # unchecked: the public function wants a permutation
            out = mix_unchecked(x, partner, boxes, lam, use_box)
        assert torch.equal(out, R.mix(x, partner, boxes, lam, use_box)), shape


@pytest.mark.skipif("cpp" not in BACKENDS, reason="fastsd._C is not built")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_of_place_mixed_pairs_under_every_box(dtype, channels_last):
    """The C++ kernel's one pass over a pair of one CutMix row and one MixUp row (rows of 64 to 256
    bytes), the CutMix row first or second, its box full, without rows, without columns, of whole
    image rows, the last pixel, or inside the image. The shapes give every dtype and layout such
    rows: (10, 8) float64 NCHW and float32 / float64 channels_last, (9, 40) float32 and 16-bit NCHW
    and 16-bit / uint8 channels_last, (7, 100) uint8 NCHW. (The Triton kernel has no pair path out
    of place: a program is one row's, as in test_out_of_place_pairs.)"""
    backend = "cpp"
    for seed, shape in enumerate([(24, 3, 10, 8), (24, 2, 9, 40), (24, 1, 7, 100)]):
        x, _, _, lam, _ = make_case(shape, dtype, seed, (torch.float32, torch.float64)[seed % 2], channels_last)
        H, W = shape[2:]
        partner = torch.arange(24).view(12, 2).flip(1).reshape(-1)  # pairs (0, 1), (2, 3), ...
        kinds = [[0, H, 0, W], [2, 2, 0, W], [0, H, 3, 3], [1, H - 1, 0, W], [H - 1, H, W - 1, W],
                 [1, H - 1, 1, W - 1]]
        boxes = torch.tensor([box for box in kinds + kinds for _ in range(2)])  # both rows of a pair
        use_box = torch.tensor([True, False] * 6 + [False, True] * 6)  # the CutMix row first, then second
        with fastsd.use_backend(backend):
            out = mix_unchecked(x, partner, boxes, lam, use_box)
        assert torch.equal(out, R.mix(x, partner, boxes, lam, use_box)), shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place(dtype, channels_last, backend):
    for seed, shape in enumerate(SHAPES + [(9, 2, 12, 10)]):
        for lam_dtype in (torch.float32, torch.float64):
            x, _, boxes, lam, use_box = make_case(shape, dtype, seed, lam_dtype, channels_last)
            g = torch.Generator().manual_seed(seed)
            partner = random_involution(shape[0], g)
            if seed % 2:  # every row a box row: pairs whose boxes overlap each other
                use_box[:] = True
            want = R.mix(x, partner, boxes, lam, use_box)
            ptr = x.data_ptr()
            with fastsd.use_backend(backend):
                out = fm.mix_(x, partner, boxes, lam, use_box)
            assert out is x and x.data_ptr() == ptr
            assert torch.equal(x, want), (shape, lam_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_pairs_with_boxes_of_the_same_columns(dtype, channels_last, backend):
    """timm's 'batch' mode: both rows of a pair take the same columns (a swap of their segments),
    over the same rows, overlapping rows, or whole image rows (one contiguous span)."""
    shape = (6, 3, 9, 10)
    x, _, _, lam, use_box = make_case(shape, dtype, 0, torch.float32, channels_last)
    partner = torch.tensor([5, 4, 3, 2, 1, 0])
    use_box[:] = True
    for cols in ((2, 7), (0, 10), (0, 1), (9, 10)):
        for rows in (((1, 6),) * 6, ((1, 6), (3, 9), (0, 9), (0, 9), (3, 9), (1, 6)), ((0, 9),) * 6):
            boxes = torch.tensor([[*r, *cols] for r in rows])
            y = x.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            want = R.mix(y, partner, boxes, lam, use_box)
            with fastsd.use_backend(backend):
                fm.mix_(y, partner, boxes, lam, use_box)
            assert torch.equal(y, want), (cols, rows)


def test_many_values_round_like_pytorch():
    """Enough elements that a fused multiply-add (one rounding where PyTorch rounds twice) would show."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 64, 64, generator=g)
    lam = torch.rand(8, generator=g)
    args = (torch.randperm(8, generator=g), torch.zeros(8, 4, dtype=torch.int64), lam, torch.zeros(8, dtype=torch.bool))
    want = timm_rows(x, *args)
    w1, w2 = (w[:, None, None, None].double() for w in R.mix_weights(lam, x.dtype))
    once = (x.double() * w1 + x[args[0]].double() * w2).float()  # one rounding, as a fused multiply-add
    assert not torch.equal(once, want)  # so the data tells the two apart
    for backend in BACKENDS:
        with fastsd.use_backend(backend):
            assert torch.equal(fm.mix(x, *args), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient(backend):
    x, partner, boxes, lam, use_box = make_case((6, 2, 7, 5), torch.float64, 3, torch.float64)
    x.requires_grad_(True)
    g = torch.randn_like(x)
    with fastsd.use_backend(backend):
        (gx,) = torch.autograd.grad(fm.mix(x, partner, boxes, lam, use_box), x, g)
    (want,) = torch.autograd.grad(R.mix(x, partner, boxes, lam, use_box), x, g)
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-12)
    x, *rest = make_case((4, 2, 4, 3), torch.float64, 4, torch.float64)
    # Under the interpreter the full Jacobian (a backward per output element) took 30 s; the op is
    # linear in x, so a random projection of it (fast_mode) checks as much, and the exact gradient
    # is compared with the reference's above.
    with fastsd.use_backend(backend):
        torch.autograd.gradcheck(lambda t: fm.mix(t, *rest), (x.requires_grad_(),), fast_mode=backend == "triton")


def test_registration():
    args = make_case((4, 2, 5, 6), torch.float32, 0)
    torch.library.opcheck(torch.ops.fastsd.mix.default, (args[0].requires_grad_(True), *args[1:]))
    x, partner, boxes, lam, use_box = make_case((4, 2, 5, 6), torch.float32, 0)
    torch.library.opcheck(torch.ops.fastsd.mix_.default, (x, torch.tensor([1, 0, 3, 2]), boxes, lam, use_box))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam_requiring_grad_gets_none_on_every_backend(backend):
    """As the registered op: the output is recorded by autograd, lam gets no gradient (the torch
    backend's aten ops used to build a graph through lam, the others did not)."""
    x, partner, boxes, lam, use_box = make_case((4, 2, 5, 6), torch.float32, 1)
    lam.requires_grad_(True)
    with fastsd.use_backend(backend):
        out = fm.mix(x, partner, boxes, lam, use_box)
    assert out.requires_grad
    out.sum().backward()
    assert lam.grad is None


def test_in_place_is_one_op_under_compile():
    """torch.compile sees fastsd::mix_ (functionalized), not the backend it would pick (on CUDA a raw
    Triton launch), and computes what eager does."""
    from fastsd.mix.op import mix_unchecked_

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, partner, boxes, lam, use_box = make_case((4, 2, 5, 6), torch.float32, 2)
    involution = torch.tensor([1, 0, 3, 2])
    want = mix_unchecked_(x.clone(), involution, boxes, lam, use_box)
    got = x.clone()
    torch.compile(mix_unchecked_, backend=backend, fullgraph=True)(got, involution, boxes, lam, use_box)
    assert torch.equal(got, want)
    assert len(graphs) == 1 and "fastsd.mix_" in graphs[0] and "fastsd_C" not in graphs[0], graphs


def test_no_host_sync():
    args = make_case((4, 2, 5, 6), torch.float32, 0)
    with fastsd.use_backend("torch"), NoHostSync():
        fm.mix(*args)


def test_empty_batch():
    x = torch.empty(0, 3, 4, 4)
    out = fm.mix(x, torch.empty(0, dtype=torch.int64), torch.empty(0, 4, dtype=torch.int64), torch.empty(0),
                 torch.empty(0, dtype=torch.bool))
    assert out.shape == x.shape


def test_bad_input():
    x, partner, boxes, lam, use_box = make_case((4, 2, 5, 6), torch.float32, 0)
    with pytest.raises(ValueError, match="boxes must have shape"):
        fm.mix(x, partner, boxes[:, :3], lam, use_box)
    bad = boxes.clone()
    bad[1] = torch.tensor([0, 6, 0, 2])  # y1 > H
    with pytest.raises(ValueError, match="boxes must satisfy"):
        fm.mix(x, partner, bad, lam, use_box)
    bad[1] = torch.tensor([3, 2, 0, 2])  # y0 > y1
    with pytest.raises(ValueError, match="boxes must satisfy"):
        fm.mix(x, partner, bad, lam, use_box)
    with pytest.raises(ValueError, match="lam must be in"):
        fm.mix(x, partner, boxes, lam + 1.5, use_box)
    with pytest.raises(ValueError, match="permutation"):
        fm.mix(x, torch.zeros(4, dtype=torch.int64), boxes, lam, use_box)
    with pytest.raises(TypeError, match="lam must have dtype"):
        fm.mix(x, partner, boxes, lam.half(), use_box)
    with pytest.raises(TypeError, match="use_box"):
        fm.mix(x, partner, boxes, lam, use_box.long())
    with pytest.raises(ValueError, match="lam must have length"):
        fm.mix(x, partner, boxes, lam[:3], use_box)
    if "cpp" in BACKENDS:  # the kernel checks what it reads, whatever the caller skipped
        from fastsd.mix.op import mix_unchecked

        bad[1] = torch.tensor([0, 6, 0, 2])
        with fastsd.use_backend("cpp"), pytest.raises(ValueError, match=r"boxes\[1\]"):
            mix_unchecked(x, partner, bad, lam, use_box)
    with pytest.raises(ValueError, match="involution"):
        fm.mix_(x.clone(), torch.tensor([1, 2, 3, 0]), boxes, lam, use_box)
    with pytest.raises(TypeError, match="requires grad"):
        fm.mix_(x.clone().requires_grad_(), torch.tensor([1, 0, 3, 2]), boxes, lam, use_box)
    with pytest.raises(ValueError, match="contiguous"):
        fm.mix_(x.transpose(2, 3), torch.tensor([1, 0, 3, 2]), boxes[:, [2, 3, 0, 1]], lam, use_box)
    if "cpp" in BACKENDS:
        from fastsd.mix.op import mix_unchecked_

        with fastsd.use_backend("cpp"), pytest.raises(ValueError, match="involution"):
            mix_unchecked_(x.clone(), torch.tensor([1, 2, 3, 0]), boxes, lam, use_box)
    with pytest.raises(ValueError, match="even"):
        fm.Mixup(num_classes=10)(x[:3], torch.zeros(3, dtype=torch.int64))
    for bad in ([0, 1, 2, 10], [0, -1, 2, 3]):
        y = x.clone()
        with pytest.raises(ValueError, match="num_classes=10"):
            fm.Mixup(num_classes=10)(y, torch.tensor(bad))
        assert torch.equal(y, x)  # checked before the in-place mix
    with pytest.raises(ValueError, match="num_classes=10"):
        fm.mixup_target(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="num_classes=10"):
        fm.FastCollateMixup(num_classes=10)([(torch.zeros(3, 4, 4, dtype=torch.uint8), t) for t in (0, 1, 2, 10)])
    with pytest.raises(ValueError, match="mode"):
        fm.Mixup(mode="rows")
    with pytest.raises(ValueError, match="prob"):
        fm.Mixup(prob=1.5)
    with pytest.raises(ValueError, match="cutmix_minmax"):
        fm.Mixup(cutmix_minmax=(0.9, 0.2))
    with pytest.raises(ValueError, match="mixup_alpha"):
        fm.Mixup(mixup_alpha=0.0, cutmix_alpha=0.0)(x, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_classes=7"):
        fm.CutMix(num_classes=7)(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(TypeError, match="uint8"):
        fm.MixUp(num_classes=7)(x.byte(), torch.tensor([0, 1, 2, 3]))


def test_numpy_randint_read_ahead():
    rs = np.random.RandomState(0)
    for seed in range(20):
        bounds = [(int(a), int(a) + int(b)) for a, b in zip(rs.randint(0, 50, size=30), rs.randint(1, 300, size=30))] + [(3, 4), (0, 2 ** 31)]
        np.random.seed(seed)
        np.random.randn()  # a cached Gaussian in the state
        want = [np.random.randint(lo, hi) for lo, hi in bounds]
        want_state = np.random.get_state()
        np.random.seed(seed)
        np.random.randn()
        words = RawWords(sum(consumes_word(lo, hi) for lo, hi in bounds))
        got = [words.randint(lo, hi) for lo, hi in bounds]
        assert got == want
        assert_same_numpy_state(np.random.get_state(), want_state)


def assert_same_numpy_state(a, b):
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


# --- parity with the libraries' own code ------------------------------------------------------------

TIMM_OPTIONS = [
    dict(mixup_alpha=1.0),
    dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3),
    dict(mixup_alpha=0.0, cutmix_alpha=0.5, correct_lam=False),
    dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
    dict(mixup_alpha=0.5, cutmix_minmax=(0.3, 0.9), label_smoothing=0.0),
]
TIMM_SHAPES = [(8, 3, 17, 23), (2, 3, 32, 24), (6, 1, 7, 40), (4, 3, 16, 16)]  # B = 2: one box (a scalar draw) on a non-square image


def timm_images(shape, dtype, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("options", TIMM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_timm_mixup(mode, options):
    tm = pytest.importorskip("timm.data.mixup")
    for k, (shape, seed) in enumerate(itertools.product(TIMM_SHAPES, range(3))):
        # float64 images: timm's 1 - lam is a float64 scalar in NumPy 1, a float32 one in NumPy 2
        dtype = {4: torch.float16, 7: torch.float64}.get(k, torch.float32)
        x = timm_images(shape, dtype, seed, channels_last=k % 3 == 1)
        target = torch.randint(0, 10, (shape[0],))
        np.random.seed(seed)
        want_x, want_t = tm.Mixup(num_classes=10, mode=mode, **options)(x.clone(), target.clone())
        want_state = np.random.get_state()
        np.random.seed(seed)
        got_x, got_t = fm.Mixup(num_classes=10, mode=mode, **options)(x, target)
        assert got_x is x  # mixed in place, as by timm
        assert torch.equal(got_x, want_x), (shape, seed)
        assert torch.equal(got_t, want_t), (shape, seed)
        assert_same_numpy_state(np.random.get_state(), want_state)


def test_timm_mixup_multi_label_and_disabled():
    tm = pytest.importorskip("timm.data.mixup")
    x = timm_images((4, 3, 9, 11), torch.float32, 0)
    target = (torch.rand(4, 5) < 0.3).float()
    for enabled in (True, False):
        a, b = tm.Mixup(num_classes=5, mode="elem", multi_label=True), fm.Mixup(num_classes=5, mode="elem", multi_label=True)
        a.mixup_enabled = b.mixup_enabled = enabled
        np.random.seed(1)
        want = a(x.clone(), target.clone())
        np.random.seed(1)
        got = b(x, target)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("numpy_images", [True, False])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem", "half"])
def test_timm_fast_collate_mixup(mode, numpy_images):
    tm = pytest.importorskip("timm.data.mixup")
    for options, seed in itertools.product(TIMM_OPTIONS[:5], range(2)):
        rs = np.random.RandomState(seed)
        images = [rs.randint(0, 256, (3, 13, 10)).astype(np.uint8) for _ in range(6)]
        labels = rs.randint(0, 10, 6).tolist()

        def batch():  # timm mixes torch images in place: a fresh batch per call
            return [(im.copy() if numpy_images else torch.from_numpy(im.copy()), t) for im, t in zip(images, labels)]

        np.random.seed(seed)
        want_x, want_t = tm.FastCollateMixup(num_classes=10, mode=mode, **options)(batch())
        want_state = np.random.get_state()
        np.random.seed(seed)
        got_x, got_t = fm.FastCollateMixup(num_classes=10, mode=mode, **options)(batch())
        assert torch.equal(got_x, want_x), (options, seed)
        assert torch.equal(got_t, want_t), (options, seed)
        assert_same_numpy_state(np.random.get_state(), want_state)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["CutMix", "MixUp"])
def test_torchvision(name, dtype, channels_last):
    from torchvision.transforms import v2

    if name == "MixUp" and dtype == torch.uint8:
        pytest.skip("torchvision's MixUp fails on uint8 images")
    for seed, (shape, alpha) in enumerate(itertools.product([(6, 3, 19, 13), (2, 1, 8, 8)], [1.0, 0.3])):
        x = timm_images(shape, torch.float32, seed, channels_last).mul(60).add(128).clamp(0, 255).to(dtype)
        labels = torch.randint(0, 7, (shape[0],))
        for lab in (labels, torch.nn.functional.one_hot(labels, 7).float()):
            torch.manual_seed(seed)
            want_x, want_t = getattr(v2, name)(alpha=alpha, num_classes=7)(x.clone(), lab.clone())
            want_state = torch.get_rng_state()
            torch.manual_seed(seed)
            got_x, got_t = getattr(fm, name)(alpha=alpha, num_classes=7)(x, lab)
            assert torch.equal(got_x, want_x) and torch.equal(got_t, want_t), (shape, alpha)
            assert torch.equal(torch.get_rng_state(), want_state)


def test_elem_boxes_follow_numpy_scalar_promotion():
    """timm draws an 'elem' row's box with ``rand_bbox(shape, lam_batch[i])``, a numpy float32 scalar,
    whose promotion differs by NumPy version (``1 - np.float32`` is float32 in NumPy 2, float64 in
    NumPy 1); fastsd's vectorised draw computes each step in the dtype the scalar step takes. On
    lambdas where the two dtypes cut different sizes (224: 201 vs 200 rows for the first), the boxes
    equal timm's own calls, with the installed NumPy (a NumPy 1 CI tells the two apart)."""
    tm = pytest.importorskip("timm.data.mixup")
    from fastsd.mix import _timm

    lam = np.array([0.1948143094778061, 0.3030731976032257, 0.1624482423067093, 0.41522493958473206,
                    0.24385641515254974, 0.5], dtype=np.float32)
    for shape in ((2, 3, 224, 224), (2, 3, 17, 23)):
        np.random.seed(7)
        want = [tm.rand_bbox(shape, lam[i]) for i in range(len(lam))]
        state = np.random.get_state()
        np.random.seed(7)
        got = _timm.draw_boxes(shape, lam, None)
        assert got.tolist() == [[yl, yh, xl, xh] for yl, yh, xl, xh in want], shape
        assert np.random.get_state()[1].tolist() == state[1].tolist()


def test_beta_draw_is_torchs():
    """The torchvision drop-ins draw lambda by the op Beta.sample runs (fastsd.mix._torchvision._beta_sample):
    the same values and generator state as ``float(dist.sample(()))`` (and torch's own path for
    another shape of Beta)."""
    from fastsd.mix import _torchvision as tv

    for alpha in (0.2, 1.0, 3.5):
        d = torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha]))
        torch.manual_seed(int(alpha * 10))
        want = [float(d.sample(())) for _ in range(4)]
        state = torch.get_rng_state()
        torch.manual_seed(int(alpha * 10))
        assert [tv._beta_sample(d) for _ in range(4)] == want
        assert torch.equal(torch.get_rng_state(), state)
    # another shape of Beta than torchvision's: torch's own path
    scalar = torch.distributions.Beta(torch.tensor(3.5), torch.tensor(3.5))
    torch.manual_seed(35)
    assert tv._beta_sample(scalar) == want[0]

    # a subclass of Beta may sample otherwise: its own sample() is what is called
    class Half(torch.distributions.Beta):
        def sample(self, sample_shape=torch.Size()):
            return super().sample(sample_shape) / 2

    torch.manual_seed(35)
    assert tv._beta_sample(Half(torch.tensor([3.5]), torch.tensor([3.5]))) == want[0] / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_targets_on_every_backend(backend):
    """The targets and labels are mixed by the fused op (fastsd.mix._rows.mix_rows) on whichever
    backend runs it: timm's per-row float32 lambda, its per-batch float64 one, multi-label, a float16
    batch per batch (the fused op) and per row (timm rounds lambda to float16: ATen ops), and
    torchvision's 2-D labels in each float dtype."""
    tm = pytest.importorskip("timm.data.mixup")
    from torchvision.transforms import v2

    with fastsd.use_backend(backend):
        for k, (mode, options) in enumerate(itertools.product(["elem", "batch"], TIMM_OPTIONS[2:4])):
            x = timm_images((6, 3, 9, 11), torch.float16 if k in (1, 3) else torch.float32, k)
            target = torch.randint(0, 10, (6,))
            np.random.seed(k)
            want = tm.Mixup(num_classes=10, mode=mode, **options)(x.clone(), target)
            np.random.seed(k)
            got = fm.Mixup(num_classes=10, mode=mode, **options)(x.clone(), target)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (mode, options)
        multi = (torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) < 0.3).float()
        np.random.seed(3)
        want = tm.Mixup(num_classes=10, mode="pair", multi_label=True)(x.float(), multi)
        np.random.seed(3)
        got = fm.Mixup(num_classes=10, mode="pair", multi_label=True)(x.float(), multi)
        assert torch.equal(got[1], want[1])
        x = timm_images((5, 3, 8, 9), torch.float32, 5)
        for name, dtype in itertools.product(["CutMix", "MixUp"], [torch.float32, torch.float16, torch.bfloat16,
                                                                    torch.float64]):
            labels = torch.rand(5, 7, generator=torch.Generator().manual_seed(2)).to(dtype)
            before = labels.clone()
            torch.manual_seed(4)
            want = getattr(v2, name)(alpha=0.7, num_classes=7)(x, labels)
            torch.manual_seed(4)
            got = getattr(fm, name)(alpha=0.7, num_classes=7)(x, labels)
            assert got[1].dtype == dtype and torch.equal(got[1], want[1]), (name, dtype)
            assert torch.equal(labels, before)  # the caller's labels are never mixed in place


def test_cuda_backend_passes_samples_its_int32_indexing_cannot_take(monkeypatch):
    """auto takes the CUDA C++ mix kernels first (fastsd._backend.CUDA_FIRST): they index a sample in
    int32, so a sample of 2**31 elements or more is a reason to pass them over (Triton's kernel has
    a 64-bit variant) rather than an error at the launch. Meta tensors: no memory."""
    from fastsd.mix import op

    monkeypatch.setattr(op, "_has_cuda_kernel", lambda name: True)
    B = 2
    args = (torch.zeros(B, dtype=torch.long), torch.zeros(B, 4, dtype=torch.long), torch.zeros(B),
            torch.zeros(B, dtype=torch.bool))
    assert op._cuda_reasons(torch.empty(B, 1, 2 ** 16, 2 ** 15 - 1, device="meta"), *args) == []
    why = op._cuda_reasons(torch.empty(B, 1, 2 ** 16, 2 ** 15, device="meta"), *args)
    assert len(why) == 1 and "2**31" in why[0]
    assert op._cuda_reasons(torch.empty(0, 1, 2 ** 16, 2 ** 15, device="meta"), *args[:0]) != []


def test_drop_in_targets_keep_the_libraries_layout_gradients_and_inputs():
    """Where the fused op would not give what the libraries' expression gives, the drop-ins use the
    expression (fastsd.mix._rows.fuses): a strided multi-label target keeps its layout, targets and
    labels that need a gradient get the libraries' gradient (autograd multiplies by lam in float32),
    and the caller's labels are never mixed in place, also where roll(1, 0) is an involution (B = 2)."""
    tm = pytest.importorskip("timm.data.mixup")
    from torchvision.transforms import v2

    x = timm_images((6, 3, 9, 11), torch.float32, 0)
    g = torch.Generator().manual_seed(3)
    dense = (torch.rand(10, 6, generator=g) < 0.3).float().t()  # [6, 10], strided
    for target in (dense, dense.contiguous().requires_grad_()):
        out = []
        for lib in (tm, fm):
            np.random.seed(2)
            t = target.detach().clone(memory_format=torch.preserve_format).requires_grad_(target.requires_grad)
            _, y = lib.Mixup(num_classes=10, mode="elem", multi_label=True)(x.clone(), t)
            grad = torch.autograd.grad(y, t, torch.rand(y.shape, generator=torch.Generator().manual_seed(4)))[0] \
                if t.requires_grad else None
            out.append((y, grad))
        (want, want_grad), (got, got_grad) = out
        assert torch.equal(got, want) and got.stride() == want.stride()
        assert (got_grad is None) == (want_grad is None) and (got_grad is None or torch.equal(got_grad, want_grad))
    for name, dtype in itertools.product(["CutMix", "MixUp"], [torch.float16, torch.bfloat16, torch.float32]):
        labels = torch.rand(6, 7, generator=g).to(dtype)
        grads = []
        for lib in (v2, fm):
            lab = labels.clone().requires_grad_()
            torch.manual_seed(5)
            _, y = getattr(lib, name)(alpha=0.7, num_classes=7)(x, lab)
            grads.append((y, torch.autograd.grad(y, lab, torch.ones_like(y))[0]))
        assert torch.equal(grads[1][0], grads[0][0]) and torch.equal(grads[1][1], grads[0][1]), (name, dtype)
        pair = labels[:2].clone()
        before = pair.clone()
        torch.manual_seed(6)
        _, y = getattr(fm, name)(alpha=0.7, num_classes=7)(x[:2], pair)
        assert torch.equal(pair, before) and y.data_ptr() != pair.data_ptr(), (name, dtype)
    with pytest.raises(TypeError, match="int64"):
        fm.CutMix(num_classes=7)(x, torch.arange(6, dtype=torch.int32))


@pytest.mark.parametrize("name", ["Mixup elem", "Mixup batch", "FastCollateMixup pair", "CutMix", "MixUp"])
def test_drop_in_targets_in_one_pass_on_the_cpu(name):
    """On the CPU the drop-ins mix the targets with the fused op (fastsd.mix._rows.mix_rows): after
    the labels' range check (here its CUDA branch: five ATen ops and an asynchronous assert), the
    images' pass, the one-hot targets (fill and scatter) and one more pass of the op, where timm and
    torchvision take four to six ATen ops. (On CUDA they keep the ATen expression: see _rows.)"""
    from fastsd.bench.launches import count_launches

    cls, _, mode = name.partition(" ")
    x = torch.randn(8, 3, 16, 16)
    labels = torch.randint(0, 10, (8,))
    if cls == "FastCollateMixup":
        batch = [(img, int(t)) for img, t in zip(x.mul(50).add(128).clamp(0, 255).byte(), labels)]
        call = functools.partial(fm.FastCollateMixup(num_classes=10, mode=mode), batch)
    elif cls == "Mixup":
        call = functools.partial(fm.Mixup(num_classes=10, mode=mode, cutmix_alpha=1.0), x, labels)
    else:
        call = functools.partial(getattr(fm, cls)(num_classes=10), x, labels)
    with fastsd.use_backend("triton" if "triton" in BACKENDS else "cpp"):
        n = count_launches(call, backward=False)
    ops = n["ops"]["forward"]
    if cls in ("CutMix", "MixUp"):  # torchvision's draws, on CPU tensors (reading them back is no GPU sync);
        # the box's clamps are Python integers (torchvision: eight one-element ops)
        ops = [op for op in ops if op not in ("aten._sample_dirichlet", "aten.randint")]
    else:
        assert n["host_syncs"] == 0, n["ops"]
    if cls == "FastCollateMixup":
        ops = [op for op in ops if op != "aten.stack"]  # the collate itself
    check = ["aten.ge", "aten.lt", "aten.bitwise_and", "aten.all", "aten._assert_async"]  # the labels' range
    kernel = ops[len(check)]
    assert ops == check + [kernel, "aten.zeros" if cls in ("CutMix", "MixUp") else "aten.full", "aten.scatter_",
                           kernel], n["ops"]


def test_constant_rows_made_once_and_never_written():
    """The libraries' partners (flip for timm, roll for torchvision) are made once per batch size and
    device (fastsd.mix._rows.constant_rows); no call writes them, in place or not."""
    from fastsd.mix import _rows

    _rows._constant_rows.cache_clear()
    for B in (1, 2, 5, 8):
        assert torch.equal(_rows.constant_rows("flip", B, torch.device("cpu")), torch.arange(B).flip(0))
        assert torch.equal(_rows.constant_rows("roll", B, torch.device("cpu")), torch.arange(B).roll(1, 0))
    flip, roll = _rows.constant_rows("flip", 8, torch.device("cpu")), _rows.constant_rows("roll", 8, torch.device("cpu"))
    assert _rows.constant_rows("flip", 8, torch.device("cpu")) is flip
    x, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    for call in (fm.Mixup(num_classes=5, cutmix_alpha=1.0, mode="elem"), fm.Mixup(num_classes=5, mode="batch"),
                 fm.CutMix(num_classes=5), fm.MixUp(num_classes=5)):
        for _ in range(3):
            call(x.clone(), labels)
    assert torch.equal(flip, torch.arange(8).flip(0)) and torch.equal(roll, torch.arange(8).roll(1, 0))
    assert _rows.constant_rows("flip", 8, torch.device("cpu")) is flip


class _FakeEvent:
    """torch.cuda.Event for the staging tests: a recorded copy stays in flight until ``finish``."""
    waited = 0

    def __init__(self):
        self.ready = True

    def record(self, stream=None):
        self.ready = False

    def query(self):
        return self.ready

    def synchronize(self):
        _FakeEvent.waited += 1
        self.ready = True


def _fake_staging(monkeypatch):
    from fastsd.mix import _rows

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(_rows._Staging, "_pinned", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8)))
    _FakeEvent.waited = 0
    return _rows


def test_draws_reach_a_device_in_one_non_blocking_copy(monkeypatch):
    """Off the CPU the draw arrays are packed into one pinned block and copied with non_blocking=True
    (fastsd.mix._rows._Staging: a pageable copy waits for the device's queue), each at a 16-byte
    offset, read back as the arrays they were; on the CPU they are the arrays' own memory. (Pinned
    memory and events need a driver: faked; the meta device stands in for CUDA.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    _rows = _fake_staging(monkeypatch)

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default:
                self.copies.append((args[0].device.type, kwargs.get("device"), kwargs.get("non_blocking", False)))
            return func(*args, **kwargs)

    a = np.arange(6, dtype=np.int64)
    assert np.shares_memory(_rows.to_device([a], torch.device("cpu"))[0].numpy(), a)
    rs = np.random.RandomState(0)
    arrays = [rs.randint(0, 99, (5, 4)), rs.rand(5).astype(np.float32), rs.rand(5) < 0.5, rs.rand(5),
              rs.rand(3, 1).astype(np.float32)]
    staging = _rows._Staging()
    got = staging.copy(arrays, torch.device("cpu"))  # (a copy to the CPU is the block itself: readable)
    for t, want in zip(got, arrays):
        assert t.dtype == torch.from_numpy(want).dtype and torch.equal(t, torch.from_numpy(want))
        assert (t.data_ptr() - got[0].data_ptr()) % 16 == 0
    _rows._constant_rows.cache_clear()
    _rows._STAGING.clear()
    plain = _rows.rows(torch.device("meta"), "flip", np.zeros((4, 4), dtype=np.int64), np.full(4, 0.5, np.float32),
                       np.ones(4, dtype=bool), np.full(4, 0.5, np.float32))  # a device other than CUDA: plain copies
    assert all(t.device.type == "meta" for t in plain[:4]) and not _rows._STAGING
    monkeypatch.setattr(_rows, "_staged", lambda device: device.type in ("cuda", "meta"))
    _rows._constant_rows.cache_clear()
    for call in range(2):  # the partner is made on the first call only (and waited for, fastsd.mix._rows)
        with Copies() as mode:
            r = _rows.rows(torch.device("meta"), "flip", np.zeros((4, 4), dtype=np.int64),
                           np.full(4, 0.5, np.float32), np.ones(4, dtype=bool), np.full(4, 0.5, np.float32))
        assert all(t.device.type == "meta" for t in r[:4]) and r.label_lam is None
        assert (r.boxes.shape, r.lam.dtype, r.use_box.dtype) == ((4, 4), torch.float32, torch.bool)
        assert mode.copies == [("cpu", torch.device("meta"), True)] + \
            [("cpu", torch.device("meta"), False)] * (call == 0), mode.copies
        for b in _rows._STAGING[torch.device("meta")].blocks:
            b.done.ready = True  # the copy done


def test_staging_blocks_are_reused_only_when_their_copy_is_done(monkeypatch):
    _rows = _fake_staging(monkeypatch)
    staging = _rows._Staging()
    a = [np.arange(8, dtype=np.int64)]
    staging.copy(a, torch.device("cpu"))
    staging.copy(a, torch.device("cpu"))  # the first block's copy still in flight: a second block
    assert len(staging.blocks) == 2 and _FakeEvent.waited == 0
    staging.blocks[0].done.ready = True
    staging.copy(a, torch.device("cpu"))  # the first is free again
    assert len(staging.blocks) == 2 and not staging.blocks[0].done.ready
    for _ in range(_rows._Staging.MAX_BLOCKS + 3):
        staging.copy(a, torch.device("cpu"))
    # six more blocks, then the oldest waited for, five times
    assert len(staging.blocks) == _rows._Staging.MAX_BLOCKS and _FakeEvent.waited == 5
    big = [np.zeros(2 * 4096, dtype=np.uint8)]  # larger than every block: a new one in place of the oldest
    staging.copy(big, torch.device("cpu"))
    assert len(staging.blocks) == _rows._Staging.MAX_BLOCKS and max(b.host.numel() for b in staging.blocks) == 8192


def test_constant_rows_made_under_inference_mode_serve_a_training_call():
    from fastsd.mix import _rows

    _rows._constant_rows.cache_clear()
    x, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    with torch.inference_mode():
        fm.MixUp(num_classes=5)(x, labels)
    assert not _rows.constant_rows("roll", 4, torch.device("cpu")).is_inference()
    xg = x.clone().requires_grad_()
    out, _ = fm.MixUp(num_classes=5)(xg, labels)
    out.sum().backward()
    assert xg.grad is not None


def test_targets_leave_the_fused_op_where_its_cuda_kernels_cannot_run(monkeypatch):
    """fastsd.mix._rows.fuses_on: on CUDA the targets go through the fused op only where the mix op's
    CUDA C++ kernels run; a fastsd._C that failed to load (or was built without CUDA), a forced
    Triton backend, or a GPU the build has no image for keeps the ATen expression, without an error.
    A bare "cuda" device is the current one."""
    from fastsd import _backend, _ext
    from fastsd.mix import _rows

    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(_ext, "has_cuda", lambda: False)
    monkeypatch.setattr(_ext, "ops", lambda: (_ for _ in ()).throw(RuntimeError("fastsd._C is not available")))
    _backend.clear_caches()
    try:
        assert _rows.fuses_on(cuda0) is False
        assert _rows.fuses_on(torch.device("cpu")) is True and _rows.fuses_on(torch.device("meta")) is False
        monkeypatch.setattr(_ext, "has_cuda", lambda: True)
        monkeypatch.setattr(_rows, "_has_cuda_kernel", lambda name: True)
        images = []
        monkeypatch.setattr(_rows, "_kernel_image", lambda index: images.append(index) or index == 0)
        assert _rows.fuses_on(cuda0) is True and _rows.fuses_on(torch.device("cuda", 1)) is False
        with fastsd.use_backend("triton"):
            assert _rows.fuses_on(cuda0) is False
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        assert _rows._indexed(torch.device("cuda")) == torch.device("cuda", 1)
        assert _rows.fuses_on(torch.device("cuda")) is False and images == [0, 1, 1]
    finally:
        _backend.clear_caches()


def test_torchvision_image_type_kept():
    from torchvision import tv_tensors

    img = tv_tensors.Image(torch.rand(4, 3, 8, 8))
    out, _ = fm.CutMix(num_classes=3)(img, torch.tensor([0, 1, 2, 0]))
    assert isinstance(out, tv_tensors.Image)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, fastsd.mix; print(any(m in sys.modules for m in ('timm', 'kornia', 'torchvision')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_bench_suite_cases():
    """The bench suite builds its cases (the libraries it finds) and its fastsd rows run."""
    from fastsd.bench import mix as bench

    cases = bench.benches("cpu", torch.float32, quick=True)
    names = [c.case for c in cases]
    assert "256x3x32x32 op out of place" in names and "128x3x224x224 op in place" in names
    if importlib.util.find_spec("timm") is not None:
        assert "256x3x32x32 timm elem mixup" in names and "128x3x224x224 timm pair cutmix" in names
    small = next(c for c in cases if c.case == "256x3x32x32 torchvision CutMix")
    inputs = small.setup()
    for run in small.backends.values():
        out, labels = run(inputs)
        assert out.shape == inputs[0].shape and labels.shape == (256, bench.NUM_CLASSES)
