"""The Triton backend of fastsd.mix under the interpreter (kernels/mix.py): bitwise parity with the
reference out of place and in place, the bytes it moves, and what only the compiled code shows (no
fused multiply-add in the MixUp path, 16-byte accesses) read from the AOT specs' SASS and PTX.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastsd
import fastsd.mix as fm
import triton_tools
from conftest import NoHostSync
from fastsd import _backend
from fastsd import _validate
from fastsd import reference as R
from mix_cases import LAYOUTS, bits as _bits, make

pytestmark = pytest.mark.skipif(bool(_backend.reasons("mix", "triton", torch.empty(0))),
                                reason="the Triton interpreter cannot run here")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8]
# Odd and non-square (1-element chunks), aligned (16-byte chunks), one sample, a 1-pixel-wide
# image, a CIFAR-sized one, lines whose length only 2 divides, and odd ones again: 3 pixels wide, and
# six rows (three pairs in place).
SHAPES = [(3, 3, 7, 23), (2, 4, 8, 16), (1, 2, 5, 32), (5, 1, 6, 1), (2, 3, 32, 32), (4, 2, 3, 6), (3, 1, 4, 3),
          (6, 3, 7, 9)]
ROWS = ("cutmix", "mixup", "mixed")


def _kernels():
    from fastsd.kernels import mix

    return mix


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_forward_matches_reference(dtype, layout):
    for seed, shape in enumerate(SHAPES):
        for rows in ROWS:
            lam_dtype = torch.float64 if seed % 3 == 0 else torch.float32
            x, *args = make(shape, dtype, layout, rows, seed, lam_dtype)
            x_before = x.clone()
            with fastsd.use_backend("triton"):
                out = fm.mix(x, *args)
            want = R.mix(x, *args)
            assert out.is_contiguous(memory_format=_validate.memory_format(x))
            assert torch.equal(_bits(out), _bits(want)), (shape, rows, lam_dtype)
            assert torch.equal(_bits(x), _bits(x_before))  # the input is not modified


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_in_place_matches_reference(dtype, layout):
    for seed, shape in enumerate(SHAPES):
        for rows in ROWS[seed % 2:]:
            x, *args = make(shape, dtype, layout, rows, seed, involution=True)
            want = R.mix(x, *args)
            ptr = x.data_ptr()
            with fastsd.use_backend("triton"):
                out = fm.mix_(x, *args)
            assert out is x and x.data_ptr() == ptr
            assert torch.equal(_bits(x), _bits(want)), (shape, rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.uint8], ids=lambda d: str(d).replace("torch.", ""))
def test_samples_of_several_programs_match_reference(dtype):
    """Samples longer than the interpreter's block (2**16 elements): several programs a sample, the
    last one partly outside it (its elements masked), on lines of odd length (1-element chunks) and
    on even ones (vector chunks), out of place, in place and (float16) the backward."""
    for layout in LAYOUTS:
        for shape in ((3, 1, 257, 257), (2, 1, 258, 256)):
            x, *args = make(shape, dtype, layout, "mixed", 3)
            with fastsd.use_backend("triton"):
                out = fm.mix(x, *args)
            assert torch.equal(_bits(out), _bits(R.mix(x, *args))), (layout, shape)
            y, *args = make(shape, dtype, layout, "mixed", 4, involution=True)
            want = R.mix(y, *args)
            with fastsd.use_backend("triton"):
                fm.mix_(y, *args)
            assert torch.equal(_bits(y), _bits(want)), (layout, shape)
            if dtype.is_floating_point:
                x, *args = make(shape, dtype, layout, "mixed", 5)
                grad, *_ = make(shape, dtype, layout, "mixed", 6)
                with fastsd.use_backend("triton"):
                    (gx,) = torch.autograd.grad(fm.mix(x.requires_grad_(True), *args), x, grad)
                assert torch.equal(_bits(gx), _bits(R.mix_backward(grad, *args))), (layout, shape)


def test_launchers_do_not_sync_with_the_host():
    k = _kernels()
    x, *args = make((3, 3, 17, 23), torch.float32, "nchw", "mixed", 1, involution=True)
    want = R.mix(x, *args)
    with NoHostSync():
        out = k.mix(x, *args)
        k.mix_(x, *args)
    assert torch.equal(out, want) and torch.equal(x, want)


_FLOAT_DTYPES = [d for d in DTYPES if d.is_floating_point]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", _FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_backward_matches_reference(dtype, layout):
    """Bit for bit, -0.0 in the gradient included (the reference adds +0.0 where a row sends nothing)."""
    for seed, shape in enumerate(SHAPES):
        for rows in ROWS[seed % 2:]:
            lam_dtype = torch.float64 if seed % 3 == 0 else torch.float32
            x, *args = make(shape, dtype, layout, rows, seed, lam_dtype)
            grad, *_ = make(shape, dtype, layout, rows, seed + 100)
            x.requires_grad_(True)
            with fastsd.use_backend("triton"):
                (gx,) = torch.autograd.grad(fm.mix(x, *args), x, grad)
            want = R.mix_backward(grad, *args)
            assert gx.is_contiguous(memory_format=_validate.memory_format(grad))
            assert torch.equal(_bits(gx), _bits(want)), (shape, rows, lam_dtype)


def test_backward_op_and_double_backward():
    x, partner, boxes, lam, use_box = make((2, 1, 2, 3), torch.float64, "nchw", "mixed", 1, torch.float64)
    with fastsd.use_backend("triton"):
        torch.library.opcheck(torch.ops.fastsd.mix_backward.default, (x, partner, boxes, lam, use_box))
    x, partner, boxes, lam, use_box = make((4, 2, 5, 6), torch.float64, "nchw", "mixed", 1, torch.float64)
    v, u = torch.randn_like(x).requires_grad_(True), torch.randn_like(x)
    with fastsd.use_backend("triton"):
        (gx,) = torch.autograd.grad(fm.mix(x.requires_grad_(True), partner, boxes, lam, use_box), x, v, create_graph=True)
        (ggv,) = torch.autograd.grad((gx * u).sum(), v)
    assert torch.equal(ggv, R.mix(u, partner, boxes, lam, use_box))  # the backward's adjoint: the forward
    k = _kernels()
    # the inverse permutation is used, not recomputed: a wrong one gives a wrong gradient
    want = R.mix_backward(x.detach(), partner, boxes, lam, use_box)
    assert torch.equal(k.mix_backward(x.detach(), partner, boxes, lam, use_box, torch.argsort(partner)), want)
    assert not torch.equal(k.mix_backward(x.detach(), partner, boxes, lam, use_box, partner.roll(1)), want)


_CHECK_ARGS = dict(partner=[1, 0, 3, 2], boxes=[[0, 4, 0, 4]] * 4, lam=[0.5, 0.0, 1.0, 0.25])
BAD_VALUES = {  # (the argument, its bad value, the assert's message)
    "duplicate partner": ("partner", [1, 1, 3, 2], "permutation"),
    "partner beyond B": ("partner", [4, 0, 3, 2], "permutation"),  # sorted: range(B) fails in row 3
    "negative partner": ("partner", [-1, 0, 3, 2], "permutation"),
    "box below the image": ("boxes", [[0, 4, 0, 4]] * 3 + [[2, 9, 0, 4]], "boxes must satisfy"),
    "inverted box": ("boxes", [[0, 4, 0, 4], [3, 2, 0, 4]] * 2, "boxes must satisfy"),
    "negative box": ("boxes", [[0, 4, -1, 4]] * 4, "boxes must satisfy"),
    "box right of the image": ("boxes", [[0, 4, 0, 8]] * 4, "boxes must satisfy"),
    "lam above 1": ("lam", [0.5, 1.5, 0.0, 0.0], "lam must be in"),
    "lam NaN": ("lam", [0.5, float("nan"), 0.0, 0.0], "lam must be in"),
}


def _check_args(**bad):
    a = {k: torch.tensor(v) for k, v in {**_CHECK_ARGS, **bad}.items()}
    return torch.randn(4, 3, 8, 7), a["partner"], a["boxes"], a["lam"], torch.tensor([True, False] * 2)


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_kernel_asserts_the_values_on_the_device(device_asserts, case):
    """On CUDA the public fastsd.mix / mix_ leave the value checks to the kernel (tl.device_assert,
    compiled in with debug=True; test_launches counts that path): here the interpreter runs them."""
    k = _kernels()
    name, value, message = BAD_VALUES[case]
    x, partner, boxes, lam, use_box = _check_args(**{name: value})
    with pytest.raises(Exception, match=message):
        k.mix(x, partner, boxes, lam, use_box, check=True)
    if name != "partner" or case == "duplicate partner":  # (an index out of range is not read unchecked)
        k.mix(x, partner, boxes, lam, use_box)  # the asserts are off without the check
    if name != "partner":  # in place: an involution instead of the sorted partner
        y = x.clone()
        with pytest.raises(Exception, match=message):
            k.mix_(y, partner, boxes, lam, use_box, check=True)


def test_kernel_asserts_an_involution_in_place(device_asserts):
    k = _kernels()
    x, partner, boxes, lam, use_box = _check_args()
    want = R.mix(x, partner, boxes, lam, use_box)
    assert torch.equal(k.mix(x, partner, boxes, lam, use_box, check=True), want)
    assert torch.equal(k.mix_(x.clone(), partner, boxes, lam, use_box, check=True), want)
    # a permutation but no involution; partners out of range (whichever row's assert comes first)
    for bad, message in (([1, 2, 3, 0], "involution"), ([1, 0, 3, 5], "permutation|involution"),
                         ([1, 0, 3, -2], "permutation|involution")):
        with pytest.raises(Exception, match=message):
            k.mix_(x.clone(), torch.tensor(bad), boxes, lam, use_box, check=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("W", [8, 7], ids=["vector_chunks", "odd_lines"])
def test_self_partnered_mixup_row_is_computed(W, layout):
    # x * lam + x * (1 - lam) differs from x in its last bit for some lam: a MixUp row that is its own
    # partner is computed in place, not skipped.
    x = torch.randn(1, 3, 8, W, dtype=torch.float64).float().contiguous(memory_format=LAYOUTS[layout])
    args = (torch.tensor([0]), torch.zeros(1, 4, dtype=torch.int64), torch.tensor([0.3]), torch.tensor([False]))
    want = R.mix(x, *args)
    assert not torch.equal(want, x)
    with fastsd.use_backend("triton"):
        assert torch.equal(fm.mix_(x.clone(), *args), want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_kind_of_pair_in_small_blocks(dtype, layout, monkeypatch):
    """Each kind of pair in place (MixUp with CutMix, the lower row MixUp; CutMix with CutMix;
    MixUp with MixUp; a MixUp and a CutMix row that are their own partners), out of place and the
    backward, on odd lines (1-element chunks) and even ones, in blocks of 32 elements: several
    programs a sample that start mid-line, the programs of rows p < b idle, a partial last one."""
    k = _kernels()
    monkeypatch.setattr(k, "_gpu_block", lambda dtype: 32)
    monkeypatch.setattr(k, "_INTERPRETER_MAX_BLOCK", 32)
    g = torch.Generator().manual_seed(7)
    partner = torch.tensor([1, 0, 3, 2, 5, 4, 6, 7])
    use_box = torch.tensor([False, True, True, True, False, False, False, True])
    for shape in ((8, 3, 4, 9), (8, 2, 3, 8)):  # 108 and 48 elements a sample: 4 and 2 programs
        B, C, H, W = shape
        x = torch.randn(shape, generator=g, dtype=torch.float64).mul(10)
        x = (x.abs().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)).contiguous(memory_format=LAYOUTS[layout])
        ys = torch.randint(0, H, (B, 1), generator=g)
        xs = torch.randint(0, W, (B, 1), generator=g)
        boxes = torch.cat([ys, ys + 1 + torch.randint(0, H, (B, 1), generator=g).clamp(max=H - 1 - ys),
                           xs, xs + 1 + torch.randint(0, W, (B, 1), generator=g).clamp(max=W - 1 - xs)], 1)
        lam = 0.1 + 0.8 * torch.rand(B, generator=g)
        args = (partner, boxes, lam, use_box)
        with fastsd.use_backend("triton"):
            assert torch.equal(_bits(fm.mix(x, *args)), _bits(R.mix(x, *args))), shape
            y = x.clone(memory_format=LAYOUTS[layout])
            fm.mix_(y, *args)
            assert torch.equal(_bits(y), _bits(R.mix(x, *args))), shape
            if dtype.is_floating_point:
                grad = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=LAYOUTS[layout])
                xr = x.clone().requires_grad_(True)
                (gx,) = torch.autograd.grad(fm.mix(xr, *args), xr, grad)
                assert torch.equal(_bits(gx), _bits(R.mix_backward(grad, *args))), shape


def test_rounding_is_exercised():
    """The data of the parity tests tells exact rounding from its shortcuts: uint8 ties (lam 0.5, an odd
    sum), bfloat16 sums halfway between two bfloat16 values (the interpreter's own float32 -> bfloat16
    conversion truncates), and float32 products a fused multiply-add would round once."""
    x, partner, boxes, lam, use_box = make((2, 3, 32, 32), torch.uint8, "nchw", "mixup", 1)
    v = x[0].float() * 0.5 + x[partner[0]].float() * 0.5
    assert ((v - v.floor()) == 0.5).any()
    with fastsd.use_backend("triton"):
        assert torch.equal(fm.mix(x, partner, boxes, lam, use_box), R.mix(x, partner, boxes, lam, use_box))
    x, partner, boxes, lam, use_box = make((2, 3, 32, 32), torch.bfloat16, "nchw", "mixup", 1)
    w1, w2 = (w[:, None, None, None] for w in R.mix_weights(lam, x.dtype))

    def truncate(t):  # float32 -> bfloat16 by dropping the low 16 bits
        return (t.view(torch.int32) & -65536).view(torch.float32)

    a, b = (truncate(x.float() * w1), truncate(x[partner].float() * w2))
    assert not torch.equal(truncate(a + b).to(torch.bfloat16), R.mix(x, partner, boxes, lam, use_box))
    with fastsd.use_backend("triton"):
        assert torch.equal(_bits(fm.mix(x, partner, boxes, lam, use_box)), _bits(R.mix(x, partner, boxes, lam, use_box)))


def test_non_contiguous_arguments_and_narrow_index_dtypes():
    x, partner, boxes, lam, use_box = make((4, 2, 6, 10), torch.float32, "nchw", "mixed", 2)
    pairs = torch.stack([partner, torch.zeros_like(partner)], 1)[:, 0]  # a strided view
    lam2 = torch.stack([lam, lam], 1)[:, 0]
    assert not pairs.is_contiguous() and not lam2.is_contiguous()
    with fastsd.use_backend("triton"):
        out = fm.mix(x, pairs.int(), boxes.t().contiguous().t(), lam2, use_box)
    assert torch.equal(out, R.mix(x, partner, boxes, lam, use_box))


def test_auto_picks_triton_on_cuda_tensors():
    if _backend.triton_import_error():
        pytest.skip("triton is not importable")
    for op in ("mix", "mix_"):
        assert _backend._auto_candidates(op, (torch.device("cuda", 0),), False)[0] == "triton"
        assert "triton" not in _backend._auto_candidates(op, (torch.device("cpu"),), True)


# --- memory traffic ----------------------------------------------------------------------------------


class _Accesses:
    """Element indices of x's storage that each load / store of the interpreter touches."""

    def __init__(self, x):
        self.base, self.size, self.itemsize = x.untyped_storage().data_ptr(), x.numel(), x.element_size()
        self.load, self.store, self.other = [], [], 0

    def add(self, kind, ptrs, mask, itemsize):
        ptrs = np.asarray(ptrs).astype(np.int64)
        if mask is not None:
            ptrs = ptrs[np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)]
        idx = (ptrs.ravel() - self.base) // self.itemsize
        hit = (idx >= 0) & (idx < self.size)
        getattr(self, kind).append(idx[hit])
        self.other += int((~hit).sum()) if kind == "store" else 0

    def counts(self, kind):
        return np.bincount(np.concatenate(getattr(self, kind) or [np.zeros(0, np.int64)]), minlength=self.size)


def _record(x, fn):
    from fastsd.bench.triton_traffic import _wrapped_builder

    acc = _Accesses(x)
    with _wrapped_builder(acc):
        out = fn()
    return out, acc


def _storage_order(x, per_sample):
    """A [B, C, H, W] tensor of per-element values -> [B, C*H*W] in x's memory order."""
    if _validate.memory_format(x) == torch.channels_last:
        return per_sample.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return per_sample.reshape(x.shape[0], -1)


def _inside(x, boxes, use_box):
    inside = R.box_mask(boxes, x.shape[2], x.shape[3])[:, None].expand(x.shape) & use_box[:, None, None, None]
    return _storage_order(x, inside)


def _chunks(x, flags):
    """[B, n] per-element flags -> per chunk (any, all), each [B, n / VEC], VEC the launcher's chunk."""
    unit = x.shape[1] if _validate.memory_format(x) == torch.channels_last else 1
    k = _kernels()
    vec = k._vec(x.shape[3], 1, unit, k._vec_sizes(x.dtype)[-1])
    c = flags.view(x.shape[0], -1, vec)
    return c.any(2), c.all(2), vec


TRAFFIC = [((4, 3, 32, 32), torch.float32, "nchw"), ((4, 3, 32, 32), torch.uint8, "channels_last"),
           ((3, 3, 17, 23), torch.float16, "nchw"), ((4, 2, 10, 12), torch.bfloat16, "channels_last")]


@pytest.mark.parametrize("case", TRAFFIC, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}")
def test_out_of_place_reads_each_element_from_one_source(case, record_property):
    """A CutMix row reads each element from the one source it takes; a chunk that straddles a box edge
    reads both sides (one vector load each: VEC extra elements, inside the 32-byte sectors that hold
    the elements it needs); a MixUp row reads both rows. The output is written once, x never."""
    shape, dtype, layout = case
    x, partner, boxes, lam, use_box = make(shape, dtype, layout, "mixed", 3)
    out, acc = _record(x, lambda: _kernels().mix(x, partner, boxes, lam, use_box))
    assert torch.equal(_bits(out), _bits(R.mix(x, partner, boxes, lam, use_box)))
    B, n = x.shape[0], x[0].numel()
    meets, within, vec = _chunks(x, _inside(x, boxes, use_box))
    straddling = int((meets & ~within).sum()) * vec
    mixup_rows = int((~use_box).sum())
    needed = B * n + mixup_rows * n  # elements: one source each, two for MixUp
    loads = acc.counts("load")
    report = (f"{shape} {dtype} {layout}: loaded {loads.sum()} elements of x for {needed} needed "
              f"({loads.sum() / needed:.3f}x; {straddling} in chunks straddling a box edge), stored {acc.other}")
    record_property("traffic", report)
    print(report)
    assert loads.sum() == needed + straddling, report
    assert acc.counts("store").sum() == 0 and acc.other == B * n, report
    # Every element an output takes is read: row i's own outside its box, its partner's inside it.
    inside = _inside(x, boxes, use_box)
    needed = ~inside
    needed[partner] |= inside | ~use_box[:, None]
    assert (loads[needed.reshape(-1).numpy()] >= 1).all(), report


@pytest.mark.parametrize("case", TRAFFIC, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{c[2]}")
def test_in_place_moves_only_the_mixed_pixels(case, record_property):
    """In place, the stores are the chunks that meet a CutMix row's box (its partner not itself) and
    the MixUp rows whole, each once; the loads are those chunks of the pair's two rows, nothing else."""
    shape, dtype, layout = case
    x, partner, _, lam, _ = make(shape, dtype, layout, "mixed", 4, involution=True)
    B, n = x.shape[0], x[0].numel()
    H, W = shape[2:]  # boxes that straddle chunks, CutMix rows paired with CutMix and MixUp rows
    boxes = torch.tensor([[i % 3, H - 1 - i % 2, (3 * i) % (W // 2), W - 1 - i % 3] for i in range(B)])
    boxes[1] = torch.tensor([0, H, W // 2 + 1, W // 2 + 1])  # no columns: a CutMix row left as it is
    use_box = torch.arange(B) % 3 != 2
    want = R.mix(x, partner, boxes, lam, use_box)
    inside = _inside(x, boxes, use_box) & (partner != torch.arange(B))[:, None]
    meets, within, vec = _chunks(x, inside)
    changed = meets | ~use_box[:, None]  # per chunk of each row
    stored_chunks = changed.repeat_interleave(vec, 1)
    _, acc = _record(x, lambda: _kernels().mix_(x, partner, boxes, lam, use_box))
    assert torch.equal(_bits(x), _bits(want))
    stores, loads = acc.counts("store"), acc.counts("load")
    report = (f"{shape} {dtype} {layout}: {B * n} elements, {int(inside.sum())} inside boxes, "
              f"{int((~use_box).sum()) * n} in MixUp rows; stored {stores.sum()}, loaded {loads.sum()}")
    record_property("traffic", report)
    print(report)
    assert (stores <= 1).all() and np.array_equal(stores.astype(bool), stored_chunks.reshape(-1).numpy()), report
    # A chunk is read where its row or the partner's row writes that chunk.
    pair_chunks = stored_chunks | stored_chunks[partner]
    assert not loads[~pair_chunks.reshape(-1).numpy()].any(), report
    # Exactly those its row's output needs (a MixUp row's, a CutMix row's chunk not wholly inside
    # the box) and those its partner's output takes (everywhere that one is stored).
    read = (changed & (~use_box[:, None] | ~within)) | changed[partner]
    assert np.array_equal(loads.astype(bool), read.repeat_interleave(vec, 1).reshape(-1).numpy()), report
    assert (loads <= 1).all(), report  # a pair's program reads each element once
    assert acc.other == 0
    assert inside.any() and ((meets & ~within).any() or vec == 1)  # box pixels, and chunks straddling a box edge


# --- the compiled code (AOT specs, VERIFYING.md check 2) -----------------------------------------------

_SASS_SCRIPT = r"""
import json, sys
from fastsd.bench import sass
from fastsd.kernels import mix
compiled = {}
for name, fusion in json.loads(sys.argv[1]):
    spec = next(s for s in mix.AOT_SPECS if s["name"] == name)
    spec = {**spec, "options": {**spec["options"], "enable_fp_fusion": fusion}}
    compiled[f"{name}:{fusion}"] = sass.compile_spec(spec)
texts = sass.disassemble_many([c.cubin for c in compiled.values()])  # one nvdisasm run
json.dump({key: {"ptx": c.ptx, "sass": t["sass"]} for (key, c), t in zip(compiled.items(), texts)}, sys.stdout)
"""


@pytest.fixture(scope="module")
def fused_and_unfused():
    names = [f"mix_{m}_{t}_nchw_cifar" for m in ("forward", "inplace", "backward")
             for t in ("fp32", "fp16", "bf16", "fp64", "u8") if not (m == "backward" and t == "u8")]
    requests = [(n, False) for n in names] + [("mix_forward_fp32_nchw_cifar", True), ("mix_forward_fp64_nchw_cifar", True)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SASS_SCRIPT, json.dumps(requests)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _fma(sass_text):
    """Fused multiply-adds of the SASS, but those whose multiplier is the constant 1: ptxas writes the
    16-bit sum (a 16-bit add: widened, added in float32 and rounded once is the same, exactly) as
    ``HFMA2 d, a, 1, 1, c``, one rounding of a + c."""
    fmas = re.findall(r"\b(?:FFMA|DFMA|HFMA2)(?:\.\w+)*\s+[^;]*;", sass_text)
    return [f for f in fmas if not re.search(r"^\S+\s+R\d+, -?R\w+, 1, 1, R\w+ ;$", f)]


def test_mixup_path_has_no_fused_multiply_add(fused_and_unfused):
    """The launch's enable_fp_fusion=False keeps each product rounded (PyTorch's eager rounding); the
    same spec compiled with fusion on contracts them into FFMA/DFMA, so this check can fail."""
    for key, asm in fused_and_unfused.items():
        name, fusion = key.rsplit(":", 1)
        if fusion == "False":
            assert _fma(asm["sass"]) == [], name
    assert _fma(fused_and_unfused["mix_forward_fp32_nchw_cifar:True"]["sass"])
    assert _fma(fused_and_unfused["mix_forward_fp64_nchw_cifar:True"]["sass"])
    # bfloat16 rounds with the GPU's round-to-nearest-even conversion (the interpreter's integer one
    # is what the parity tests run).
    assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", fused_and_unfused["mix_forward_bf16_nchw_cifar:False"]["ptx"])


def test_check_specs_compile_the_value_asserts():
    # The device-side value checks are compiled in (debug=True): every message in the PTX.
    checks = [s for s in _kernels().AOT_SPECS if s["name"].startswith("mix_check_")]
    results = triton_tools.aot_compile_all([(s["name"], 90) for s in checks])
    for s in checks:
        ptx = results[(s["name"], 90)].ptx
        messages = {name: bytes(int(v) for v in data.split(",")).rstrip(b"\0").decode()  # (byte arrays in the PTX)
                    for name, data in re.findall(r"\.global \.align 1 \.b8 (assertMessage_\d+)\[\d+\] = \{([\d, ]+)\}", ptx)}
        assert sorted(m.split(": ")[1].split(" must")[0] for m in messages.values()) == (
            ["boxes", "lam", "partner", "partner"] if "involution" in s["name"] else ["boxes", "lam", "partner"]), messages
        assert ("involution" in " ".join(messages.values())) == ("involution" in s["name"]), messages


def test_aligned_specs_move_16_bytes_an_access(fused_and_unfused):
    for key, asm in fused_and_unfused.items():
        if key.endswith(":False"):
            assert re.search(r"LDG\.E\.128", asm["sass"]) and re.search(r"STG\.E\.128", asm["sass"]), key


def test_specs_cover_the_launcher_variants():
    """256x3x32x32 and 128x3x224x224 launches (every dtype, layout and mode) take 16-byte chunks with
    the alignment the JIT specialises on; an odd image 1-element chunks. Each variant is an AOT spec."""
    from fastsd.kernels import _aot

    k = _kernels()
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8, "u8": 1}
    keys = {repr((s["signature"], s["constexprs"], s["attrs"])) for s in k.AOT_SPECS}
    cases = k._aot_cases()
    assert any("imagenet" in tag for tag, _ in cases)
    for tag, thunk in cases:
        (spec,) = _aot.specs_from_launches(k, k._KERNELS, [(tag, thunk)])
        assert repr((spec["signature"], spec["constexprs"], spec["attrs"])) in keys, tag
        names = list(spec["signature"])
        if spec["name"].startswith("mix_check_"):
            continue
        vec = spec["constexprs"][(names.index("VEC"),)]
        width = vec * itemsize[spec["signature"][names[0]][1:]]  # x (forward) or the gradient (backward)
        aligned = {names[i[0]] for i in spec["attrs"]}
        if "odd" in tag or "huge" in tag:
            assert vec == 1, tag
        else:
            assert width == 16 and {names[0], "out_ptr", "sample_numel"} <= aligned, tag
    assert {s["name"] for s in k.AOT_SPECS} >= {f"mix_backward_{ty}_{layout}_{shape}" for ty in ("fp32", "fp16", "bf16", "fp64")
                                                for layout in ("nchw", "channels_last") for shape in ("cifar", "odd")}
    assert {s["name"] for s in k.AOT_SPECS} >= {f"mix_check_{mode}{lam}" for mode in ("permutation", "involution")
                                                for lam in ("", "_lam64")}
