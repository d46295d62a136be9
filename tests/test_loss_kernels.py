"""The Triton loss kernels as a GPU runs them, checked here without one (issue 12 build 3, issue 11 section 2).

* AOT specs are the launches' own JIT specialisation: 16-byte aligned tensors give
  ``tt.divisibility`` 16 on every pointer, so the compiled code read below is what a GPU launch of
  aligned tensors gets (fastsd/kernels/_aot.py).
* The sm_90 code of every loss spec: no 64-bit division, no spills, occupancy >= 25 %, and 16-byte
  global loads wherever the data is 16-byte aligned (kernels/losses.py says where and why a narrower
  access is chosen).
* Long rows of pair KD / KD are split along K, so a batch of 64 rows still gives the GPU >= 2 x 132
  working programs; the split path against the reference with ignored labels and singletons.
* float64 never reaches the loss kernels (on a GPU the JIT would pass the Python-float temperature
  and weights to them as fp32): checked on the launch arguments and the AOT signatures.
"""
import os
import re
import subprocess
import tempfile

import pytest
import torch

import fastsd
import triton_tools
from fastsd import _backend
from fastsd.kernels import _aot
from fastsd.kernels import losses as K

from conftest import CPU_BACKENDS
from test_losses import PAIR_KW, _pair_run, assert_within, pair_inputs

SPECS = [s for s in triton_tools.all_aot_specs() if s["module"] == "fastsd.kernels.losses"]
ALIGNED = [s for s in SPECS if "unaligned" not in s["name"]]
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def _pointer_paths(signature):
    """(path, dtype) of every pointer argument; a tuple argument's elements are (index, element)."""
    out = []
    for i, ty in enumerate(signature.values()):
        for j, t in (enumerate(ty) if isinstance(ty, tuple) else [(None, ty)]):
            if isinstance(t, str) and t.startswith("*"):
                out.append(((i,) if j is None else (i, j), t[1:]))
    return out


def _data_dtype(spec):
    return next(t for _p, t in _pointer_paths(spec["signature"]) if t in ITEMSIZE)


def test_aligned_specs_carry_the_alignment_the_jit_specialises_on():
    assert len(ALIGNED) > 40 and len(SPECS) > len(ALIGNED)
    for spec in ALIGNED:
        for path, _t in _pointer_paths(spec["signature"]):
            assert spec["attrs"].get(path) == [["tt.divisibility", 16]], (spec["name"], path, spec["attrs"])


def test_launch_spec_is_the_jits_specialisation():
    # The same launch on an aligned CPU tensor and on one 4 bytes off: only the latter loses the attribute.
    x = torch.zeros(2 * 100 + 1)
    y = torch.zeros(2, dtype=torch.int64)
    for z, aligned in ((x[:200].view(2, 100), True), (x[1:].view(2, 100), False)):
        specs = _aot.specs_from_launches(K, K._KERNELS, [("t", lambda z=z: K.kd_loss(z, z, 2.0, 1.0, 1.0, False, True))])
        (spec,) = specs
        assert (spec["attrs"].get((0,)) == [["tt.divisibility", 16]]) == aligned, spec["attrs"]
        align = list(spec["signature"]).index("ALIGN")
        assert spec["constexprs"][(align,)] == 4  # rows of 100 floats start 16-byte aligned
    specs = _aot.specs_from_launches(K, K._KERNELS, [("t", lambda: K.pair_kd_loss(x[:200].view(2, 100), y, y, 2.0,
                                                                                  1.0, 1.0, False, -100, True))])
    assert [s["name"] for s in specs] == ["pair_counts_t", "pair_kd_t"]


# --- the compiled code (sm_90) -------------------------------------------------------------------

_BIN = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin")


@pytest.fixture(scope="module")
def compiled():
    return triton_tools.aot_compile_all([(s["name"], 90) for s in SPECS])


def _resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    reg, stack, shared, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out).groups())
    return reg, stack + local, shared


def _occupancy(reg: int, warps: int) -> float:
    """Warps resident per SM / 64, from registers (allocated per warp in units of 256, 64 K per SM)."""
    per_warp = -(-reg * 32 // 256) * 256
    ctas = min(65536 // (per_warp * warps), 64 // warps, 32)
    return ctas * warps / 64


def _widest_load(ptx: str) -> int:
    widths = [int(v or 1) * int(b) // 8 for v, b in re.findall(r"ld\.global[.\w]*?(?:\.v(\d))?\.[bsuf](\d+)\b", ptx)]
    return max(widths)


def _expected_load(spec) -> int:
    """Bytes of the widest global load a launch of aligned tensors should get."""
    size = ITEMSIZE[_data_dtype(spec)]
    names = list(spec["signature"])
    const = {names[p[0]]: v for p, v in spec["constexprs"].items() if len(p) == 1}
    if "ALIGN" in const and not isinstance(const["ALIGN"], tuple):  # rows start ALIGN elements aligned
        return const["ALIGN"] * size
    if spec["name"].startswith("feature_cosine"):
        # channels-last: the channels' alignment; contiguous maps: VEC positions a thread (16 bytes)
        # as far as the rows' alignment allows (S, or without the gradient a row of GROUP channels)
        return max(min(a if cl else min(const["VEC"], a, bs), 16 // size) * size
                   for cl, a, bs in zip(const["CHANNELS_LAST"], const["ALIGN"], const["BLOCK_S"]))
    return 16


def test_compiled_loss_kernels_meet_the_budgets(compiled):
    """No 64-bit division anywhere, no spills, occupancy >= 25 %, 16-byte loads where aligned."""
    bad = []
    for spec in SPECS:
        result = compiled[(spec["name"], 90)]
        assert result.error is None, (spec["name"], result.error)
        if re.search(r"\b(?:div|rem)\.[su]64\b", result.ptx):
            bad.append((spec["name"], "64-bit division"))
        reg, spill, _shared = _resources(result.cubin)
        warps = spec.get("options", {}).get("num_warps", 4)
        if spill:
            bad.append((spec["name"], f"{spill} bytes of spills"))
        if _occupancy(reg, warps) < 0.25:
            bad.append((spec["name"], f"{reg} registers x {warps} warps: occupancy {_occupancy(reg, warps):.0%}"))
        if spec in ALIGNED and not spec["name"].startswith("pair_counts"):  # (counts: labels only)
            want = _expected_load(spec)
            if _widest_load(result.ptx) < want:
                bad.append((spec["name"], f"widest load {_widest_load(result.ptx)} bytes, expected {want}"))
    assert not bad, bad


def test_index_checks_are_compiled_in_where_asked(compiled):
    # check_indices: the counting asserts labels and partner on the device (the glue's checks, no launch)
    checked = [s["name"] for s in SPECS if s["name"].endswith("_checked")]
    assert {re.sub(r"_(fp32|fp16|bf16)_.*", "", n) for n in checked} == {"pair_counts", "pair_kd_stats"}
    for spec in SPECS:
        ptx = compiled[(spec["name"], 90)].ptx
        asserts = ptx.count("__assertfail")
        assert (asserts > 0) == (spec["name"] in checked), (spec["name"], asserts)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("classes", [10, 9000])
def test_checked_launch_gives_the_same_result(classes):
    logits, labels, partner = pair_inputs(12, classes, 4)
    z = logits.float()
    plain = K.pair_kd_loss(z, labels, partner, 3.0, 0.7, 1.3, False, -100, True)
    checked = K.pair_kd_loss(z, labels, partner, 3.0, 0.7, 1.3, False, -100, True, check_indices=True)
    assert torch.equal(plain[0], checked[0]) and torch.equal(plain[1], checked[1])


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("classes", [10, 9000])
def test_checked_launch_asserts_bad_indices(device_asserts, classes):
    # The device-side checks themselves, run by the interpreter with debug on (as on a GPU).
    logits, labels, partner = pair_inputs(12, classes, 4)
    z = logits.float()
    K.pair_kd_loss(z, labels, partner, 3.0, 0.7, 1.3, False, -100, True, check_indices=True)
    bad_labels = labels.clone()
    bad_labels[5] = classes
    with pytest.raises(Exception, match="labels must be in"):
        K.pair_kd_loss(z, bad_labels, partner, 3.0, 0.7, 1.3, False, -100, True, check_indices=True)
    for bad in (partner.roll(1), torch.where(partner == partner[0], 12, partner)):  # no pairing; beyond B
        with pytest.raises(Exception, match="partner must pair rows"):
            K.pair_kd_loss(z, labels, bad, 3.0, 0.7, 1.3, False, -100, True, check_indices=True)


def test_cosine_kernel_has_no_per_element_division(compiled):
    # One scalar int32 division per program and layer (the sample of a program), none per element.
    for spec in SPECS:
        if spec["name"].startswith("feature_cosine"):
            ptx = compiled[(spec["name"], 90)].ptx
            layers = len(spec["signature"]["channels"])
            assert len(re.findall(r"\b(?:div|rem)\.[su]32\b", ptx)) <= layers, spec["name"]


# The no-gradient cosine path loops over the channels (kernels/losses.py, _cosine_rows): maps whose
# positions a 16-byte vector does not divide are read as rows of GROUP channels (7 x 7: 4 in float32,
# 8 in 16-bit; 14 x 14 in 16-bit: 2) and folded back to positions at the end; C not a multiple of
# GROUP falls back to one channel a row; rows and columns masked, several samples a program.
COSINE_ROW_SHAPES = [(3, 8, 7, 7), (2, 6, 14, 14), (2, 5, 7, 7), (3, 3, 5, 5), (2, 40, 3, 3), (2, 4, 37, 29),
                     (5, 3, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cosine_row_layout_groups_channels_where_vectors_straddle_rows(dtype):
    x = [torch.empty(s, dtype=dtype, device="meta") for s in COSINE_ROW_SHAPES]
    C, S, N = zip(*[(t.shape[1], t[0, 0].numel(), t.shape[0]) for t in x])
    _w, _r, vec, config = K._cosine_config(C, S, N, (False,) * len(x), dtype.itemsize, False)
    group = [c[3] for c in config]
    assert vec == 16 // dtype.itemsize
    want = [4, 1, 1, 1, 4, 1, 1] if dtype == torch.float32 else [8, 2, 1, 1, 8, 1, 1]
    assert group == want, group
    for (bn, bc, bs, g, align, full, programs), c, s, n in zip(config, C, S, N):
        assert align == (vec if g > 1 else K._align(s, dtype.itemsize)) and programs >= 1
        assert bc * bn * bs <= vec * 32 * _w and (full == ((c // g) % bc == 0))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cosine_without_gradient_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in COSINE_ROW_SHAPES]
    t = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in COSINE_ROW_SHAPES]
    s[0][1, :, 2, 3] = 0  # a zero channel vector (cos 0)
    scales = [0.5 + 0.25 * l for l in range(len(s))]
    named = {f"s{l}": x for l, x in enumerate(s)} | {f"t{l}": x for l, x in enumerate(t)}
    (loss, grad), traffic = triton_tools.count_traffic(K.feature_alignment_loss, s, t, [False] * len(s), "cosine",
                                                       scales, True, False, tensors=named)
    assert grad.numel() == 0
    for name, x in named.items():  # every element read once (the fold works on the column sums)
        assert traffic[name] == {"load": x.nbytes, "store": 0}, (name, traffic[name])
    want = torch.stack([w * (1 - fastsd.reference.losses.cosine_similarity(a.double(), b.double())).sum()
                        for w, a, b in zip(scales, s, t)])
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # the loss is stored in dtype
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=0)
    # the same launch with the gradient (whole channel vectors in registers) gives the same losses
    loss_g, _ = K.feature_alignment_loss(s, t, [False] * len(s), "cosine", scales, True, True)
    torch.testing.assert_close(loss_g.double(), want, rtol=rtol, atol=0)


# --- programs against SMs ---------------------------------------------------------------------------


def _grids(fn):
    with _aot.recorded(K, K._KERNELS) as launches:
        fn()
    return {name: grid for name, _k, grid, _a, _kw in launches}


@pytest.mark.parametrize("B, K_", [(64, 32768), (16, 100000), (256, 1000)])
def test_row_kernels_give_every_sm_work(B, K_):
    """At least 132 working programs (an H100's SMs): half of pair KD's programs lead a pair."""
    z = torch.empty(B, K_, device="meta")
    y = torch.empty(B, dtype=torch.int64, device="meta")
    pair = _grids(lambda: K.pair_kd_loss(z, y, y, 4.0, 1.0, 1.0, False, -100, True))["_pair_kd_kernel"]
    kd = _grids(lambda: K.kd_loss(z, z, 4.0, 1.0, 1.0, False, True))["_kd_kernel"]
    assert pair[0] * pair[1] // 2 >= 128 and kd[0] * kd[1] >= 132, (pair, kd)
    if K_ > K.MAX_SINGLE_BLOCK:  # split rows: two waves
        assert pair[0] * pair[1] // 2 >= K.SPLIT_TARGET and kd[0] * kd[1] >= K.SPLIT_TARGET, (pair, kd)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("teacher", ["confident", "symmetric"])
def test_split_rows_match_the_reference(teacher):
    # 12 rows of 8200 logits: 5 chunks a row, an ignored label, pairs and singletons
    logits, labels, partner = pair_inputs(12, 8200, 4)
    go = torch.tensor(0.37)
    kw = dict(PAIR_KW, teacher=teacher)
    ref, ref_g = _pair_run(logits, labels, partner, go, fn=fastsd.reference.pair_kd_loss, **kw)
    same, same_g = _pair_run(logits.float(), labels, partner, go, fn=fastsd.reference.pair_kd_loss, **kw)
    got, got_g = _pair_run(logits.float(), labels, partner, go, backend="triton", **kw)
    assert_within("loss", got, same, ref)
    assert_within("grad", got_g, same_g, ref_g)
    assert got_g[5].abs().max() == 0  # the ignored row (no kernel has atomics: test_aot)


# --- float64 (issue 11 section 2) ---------------------------------------------------------------------


def test_float64_never_reaches_the_loss_kernels():
    """On a GPU the JIT passes Python floats (temperature, weights, scales) as fp32 scalars: a float64
    loss kernel would run with fp32 scalars. None exists: the launchers refuse float64 before
    launching, the Triton backend declines it (the C++ / torch backends keep float64), and no AOT
    signature pairs float64 data with a scalar."""
    z = torch.zeros(4, 10, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.int64)
    calls = [lambda: K.pair_kd_loss(z, y, y, 4.0, 1.0, 1.0, False, -100, True),
             lambda: K.kd_loss(z, z, 4.0, 1.0, 1.0, False, True),
             lambda: K.feature_alignment_loss([z], [z], [False], "cosine", [0.1], False, True)]
    for call in calls:
        with _aot.recorded(K, K._KERNELS) as launches, pytest.raises(TypeError, match="float64"):
            call()
        assert launches == []
    for op, args in (("pair_kd_loss", (z, y, y)), ("kd_loss", (z, z)), ("feature_alignment_loss", (z, z))):
        assert any("float64" in r for r in _backend.reasons(op, "triton", *args)), op
    for spec in SPECS:
        types = [t for t in spec["signature"].values() for t in (t if isinstance(t, tuple) else (t,))]
        assert "*fp64" not in types and "fp64" not in types, spec["name"]
