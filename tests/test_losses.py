"""Fused distillation losses (SPEC section 4, issue 3): every backend that runs here against a float64
reference, loss and gradients; torch.library registration, torch.compile, host syncs, memory
traffic under the Triton interpreter, bad input.

Tolerance: fastsd.selftest.parity_bound, element by element: a backend's error against the float64
reference is at most twice the error of the same computation done by the PyTorch reference in the
input's dtype (the flash-attention criterion), plus one unit in the last place of the output dtype
at the reference's magnitude, plus the error floor that the computation's conditioning gives (a few
ulps of the intermediates it subtracts, carried to the output: fastsd.selftest's *_conditioning,
derived there). torch's error alone is a sample of that floor, not a bound.
"""
import math
import os

import pytest
import torch

import fastsd
from fastsd import reference as R
from fastsd.losses import _KIND_CODE  # noqa: F401  (the C++ kind codes follow FEATURE_KINDS)
from fastsd.selftest import feature_conditioning, kd_conditioning, pair_kd_conditioning, parity_bound

from conftest import CPU_BACKENDS, NoHostSync, needs_cpp, torch_threads


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
COMPILED = [b for b in CPU_BACKENDS if b != "triton"]


def assert_within(name, got, same_dtype, ref, cond=0.0):
    """|got - ref| <= 2 max |same_dtype - ref| + one ulp of got's dtype at |ref|'s magnitude + cond,
    element by element (fastsd.selftest.parity_bound; cond from its *_conditioning functions)."""
    assert got.shape == ref.shape and got.dtype == same_dtype.dtype, (name, got.shape, ref.shape, got.dtype)
    b = parity_bound(got, same_dtype, ref, cond)
    assert b.ok, (f"{name}: error {b.err:.3g} > 2 x torch's {b.e_torch:.3g} + {b.ulp:.3g} "
                  f"+ conditioning {b.cond:.3g}")


def _leaf(x, dtype):
    return x.detach().to(dtype).requires_grad_()


# --- pair KD --------------------------------------------------------------------------------------

# (B, K, classes): labels from `classes` classes, so pairs and singletons both occur.
PAIR_CASES = [(1, 10, 1), (3, 1, 1), (3, 10, 2), (37, 10, 5), (37, 1000, 8), (3, 32001, 1)]
TRITON_PAIR_CASES = [c for c in PAIR_CASES if c[0] * c[1] <= 1000 or c[1] > 8192]


def pair_inputs(B, K, classes, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (B,), generator=g) % K
    partner = fastsd.intra_class_pairs(labels, generator=g)
    labels = labels.clone()
    if ignore and B >= 10:
        labels[5] = -100  # a pair (or singleton) with an ignored label: no KD, no CE
    return logits, labels, partner


PAIR_KW = dict(temperature=3.0, kd_weight=0.7, ce_weight=1.3)


def _pair_run(logits, labels, partner, grad_out, backend=None, fn=fastsd.pair_kd_loss, **kw):
    x = logits.detach().clone().requires_grad_()
    if backend is None:
        loss = fn(x, labels, partner, **kw)
    else:
        with fastsd.use_backend(backend):
            loss = fn(x, labels, partner, **kw)
    (g,) = torch.autograd.grad(loss, x, grad_out.to(loss.dtype))
    return loss, g


@pytest.mark.parametrize("teacher", ["confident", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: f"B{c[0]}xK{c[1]}")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_kd_parity(backend, case, dtype, teacher):
    if backend == "triton" and case not in TRITON_PAIR_CASES:
        pytest.skip("too large for the interpreter")
    for name, got, same, ref, cond in pair_parity(backend, case, dtype, teacher):
        assert got.dtype == dtype
        assert_within(name, got, same, ref, cond)


def pair_parity(backend, case, dtype, teacher):
    """[(name, got, same, ref, cond)] of the loss and the gradient of pair_kd_loss on a PAIR_CASES case:
    backend, the reference in dtype and in float64, and the conditioning term."""
    logits, labels, partner = pair_inputs(*case)
    go = torch.tensor(0.37)
    kw = dict(PAIR_KW, teacher=teacher)
    ref, ref_g = _pair_run(logits, labels, partner, go, fn=R.pair_kd_loss, **kw)
    same, same_g = _pair_run(logits.to(dtype), labels, partner, go, fn=R.pair_kd_loss, **kw)
    got, got_g = _pair_run(logits.to(dtype), labels, partner, go, backend=backend, **kw)
    cond, cond_g = pair_kd_conditioning(logits.to(dtype), labels, partner, ignore_index=-100, grad_output=go, **kw)
    return [("loss", got, same, ref, cond), ("grad", got_g, same_g, ref_g, cond_g)]


def test_pair_kd_reference_formulas():
    """The reference against a loop over pairs written from SPEC's words."""
    logits, labels, partner = pair_inputs(37, 10, 5)
    T = 2.5
    got = R.pair_kd_loss(logits, labels, partner, temperature=T, kd_weight=0.6, ce_weight=1.1)
    valid = [i for i in range(37) if labels[i] != -100]
    ce = sum(-torch.log_softmax(logits[i], 0)[labels[i]] for i in valid) / len(valid)
    kd, pairs = 0.0, 0
    for i in range(37):
        j = int(partner[i])
        if j <= i or labels[i] == -100 or labels[j] == -100:
            continue
        pi, pj = (torch.softmax(logits[k], 0)[labels[k]] for k in (i, j))
        t, s = (i, j) if pi >= pj else (j, i)
        p_t, log_p_s = torch.softmax(logits[t] / T, 0), torch.log_softmax(logits[s] / T, 0)
        kd = kd + (p_t * (p_t.log() - log_p_s)).sum()
        pairs += 1
    assert pairs > 3
    torch.testing.assert_close(got, 1.1 * ce + 0.6 * T * T * kd / pairs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_kd_teacher_gets_no_kd_gradient_and_no_pairs(backend):
    # Two rows, one pair, CE off: only the student row has a gradient.
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.5, 0.0, 1.0]], requires_grad=True)
    labels, partner = torch.tensor([0, 0]), torch.tensor([1, 0])
    with fastsd.use_backend(backend):
        loss = fastsd.pair_kd_loss(logits, labels, partner, ce_weight=0.0)
    loss.backward()
    assert logits.grad[0].abs().max() == 0 and logits.grad[1].abs().max() > 0
    # No pairs at all (all singletons): KD term 0; everything ignored: 0 (not NaN).
    with fastsd.use_backend(backend):
        only_ce = fastsd.pair_kd_loss(logits.detach(), labels, torch.tensor([0, 1]))
        nothing = fastsd.pair_kd_loss(logits.detach(), torch.tensor([-100, -100]), partner)
    torch.testing.assert_close(only_ce, torch.nn.functional.cross_entropy(logits.detach(), labels))
    assert nothing.item() == 0.0


# --- classic KD -----------------------------------------------------------------------------------

KD_CASES = [(1, 10), (3, 1), (37, 10), (37, 1000), (3, 32001)]
TRITON_KD_CASES = [(1, 10), (3, 1), (37, 10), (3, 32001)]


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KD_CASES, ids=lambda c: f"B{c[0]}xK{c[1]}")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kd_parity(backend, case, dtype, reduction):
    if backend == "triton" and case not in TRITON_KD_CASES:
        pytest.skip("too large for the interpreter")
    for name, got, same, ref, cond in kd_parity(backend, case, dtype, reduction):
        assert got.dtype == dtype
        assert_within(name, got, same, ref, cond)


def kd_parity(backend, case, dtype, reduction):
    """[(name, got, same, ref, cond)] of the loss and the student gradient of kd_loss on a KD_CASES case."""
    g = torch.Generator().manual_seed(1)
    s64, t64 = (torch.randn(case, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    go = torch.rand(case[0] if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5

    def run(s, t, fn, backend=None):
        s = s.clone().requires_grad_()
        t = t.clone().requires_grad_()  # the teacher requires grad: it must get none
        with fastsd.use_backend(backend):
            loss = fn(s, t, temperature=3.0, reduction=reduction)
        gs, gt = torch.autograd.grad(loss, (s, t), go.to(loss.dtype), allow_unused=True)
        assert gt is None or gt.abs().max() == 0
        return loss, gs

    ref, ref_g = run(s64, t64, R.kd_loss)
    same, same_g = run(s64.to(dtype), t64.to(dtype), R.kd_loss)
    got, got_g = run(s64.to(dtype), t64.to(dtype), fastsd.kd_loss, backend)
    cond, cond_g = kd_conditioning(s64.to(dtype), t64.to(dtype), 3.0, reduction, go)
    return [("loss", got, same, ref, cond), ("grad", got_g, same_g, ref_g, cond_g)]


def test_kd_reference_matches_kl_div():
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    want = 16 * torch.nn.functional.kl_div(torch.log_softmax(s / 4, 1), torch.softmax(t / 4, 1), reduction="batchmean")
    torch.testing.assert_close(R.kd_loss(s, t), want)
    torch.testing.assert_close(fastsd.kd_loss(s, t), want)


# --- feature alignment ------------------------------------------------------------------------------

# Layers of awkward shapes: a ResNet-like list with one channels_last map, a 2-D and a 3-D one.
FEATURE_SHAPES = [((5, 7, 3, 9), False), ((3, 16, 5, 5), True), ((3, 10), False), ((2, 3, 5), False),
                  ((2, 6, 3, 2, 2), False)]


def feature_inputs(dtype, seed=0, layers=FEATURE_SHAPES):
    g = torch.Generator().manual_seed(seed)
    out_s, out_t = [], []
    for shape, cl in layers:
        s = torch.randn(shape, generator=g, dtype=torch.float64)
        t = s + 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)  # |d| on both sides of 1
        if cl:
            s, t = (x.contiguous(memory_format=torch.channels_last) for x in (s, t))
        out_s.append(s.to(dtype))
        out_t.append(t.to(dtype))
    return out_s, out_t


def _feature_go(layers, reduction="mean"):
    """grad_output of a feature loss: 0.6 (0.6, 0.7, ... per layer for reduction="none")."""
    return torch.tensor([0.6 + 0.1 * l for l in range(layers)] if reduction == "none" else 0.6, dtype=torch.float64)


def _feature_run(students, targets, fn, backend=None, go=None, **kw):
    xs = [s.detach().clone().requires_grad_() for s in students]
    ts = [t.detach().clone().requires_grad_() for t in targets]  # targets require grad: they get none
    with fastsd.use_backend(backend):
        loss = fn(xs, ts, **kw)
    go = go if go is not None else _feature_go(len(xs), kw.get("reduction", "mean"))
    grads = torch.autograd.grad(loss, xs + ts, go.to(loss.dtype), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads[len(xs):])
    return loss, grads[:len(xs)]


FEATURE_OPTIONS = [  # (weights, reduction), one per kind and dtype below
    (None, "mean"), ("cosine", "sum"), ([0.5, 1.0, 2.0, 0.25, 1.5], "none"), ("cosine", "mean"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1", "cosine"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_feature_alignment_parity(backend, kind, dtype):
    for k in range(len(FEATURE_OPTIONS)):
        if (DTYPES.index(dtype) + k) % 2:  # half of the option grid per dtype keeps the test short
            continue
        for name, got, same, ref, cond in feature_parity(backend, kind, dtype, k):
            assert got.dtype == dtype
            assert_within(name, got, same, ref, cond)


def feature_parity(backend, kind, dtype, k):
    """[(name, got, same, ref, cond)] of the loss and every layer's gradient of feature_alignment_loss
    on FEATURE_SHAPES with FEATURE_OPTIONS[k]."""
    weights, reduction = FEATURE_OPTIONS[k]
    s, t = feature_inputs(torch.float64, seed=k)
    kw = dict(kind=kind, weights=weights, reduction=reduction)
    ref, ref_g = _feature_run(s, t, R.feature_alignment_loss, **kw)
    sd, td = [x.to(dtype) for x in s], [x.to(dtype) for x in t]
    same, same_g = _feature_run(sd, td, R.feature_alignment_loss, **kw)
    got, got_g = _feature_run(sd, td, fastsd.feature_alignment_loss, backend, **kw)
    cond, cond_g = feature_conditioning(sd, td, grad_output=_feature_go(len(sd), reduction), **kw)
    for l, a in enumerate(got_g):
        assert a.stride() == sd[l].stride() or a.shape[1] == 1, f"layer {l} grad layout"
    return [(f"loss {weights} {reduction}", got, same, ref, cond)] + [
        (f"grad[{l}] {weights} {reduction}", *r) for l, r in enumerate(zip(got_g, same_g, ref_g, cond_g))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_feature_alignment_single_tensor_and_layouts(backend):
    s = torch.randn(5, 7, 3, 9, dtype=torch.float64)
    t = torch.randn(5, 7, 3, 9, dtype=torch.float64)
    dt = torch.float64 if backend != "triton" else torch.float32
    for kind in ("mse", "cosine"):
        ref = R.feature_alignment_loss(s, t, kind)
        # a channels_last student with a contiguous target, and a non-dense (sliced) student
        s_cl = s.to(dt).contiguous(memory_format=torch.channels_last).requires_grad_()
        wide = torch.randn(5, 14, 3, 9, dtype=dt)
        wide[:, ::2] = s.to(dt)
        s_nd = wide[:, ::2].requires_grad_()
        with fastsd.use_backend(backend):
            for x in (s_cl, s_nd):
                loss = fastsd.feature_alignment_loss(x, t.to(dt), kind=kind)
                torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
                (g,) = torch.autograd.grad(loss, x)
                assert g.shape == x.shape
        with fastsd.use_backend(backend), torch.no_grad():
            torch.testing.assert_close(fastsd.feature_alignment_loss(s_cl, t.to(dt), kind=kind).double(), ref,
                                       rtol=1e-5, atol=1e-6)


def test_layer_weights():
    assert R.layer_weights("cosine", 1) == [1.0]
    w = R.layer_weights("cosine", 4)
    assert [round(x, 3) for x in w] == [1.0, 0.966, 0.866, 0.707]
    assert R.layer_weights(None, 3) == [1.0, 1.0, 1.0]


def test_cosine_reference_matches_torch():
    a, b = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    a[0, :, 0] = 0
    torch.testing.assert_close(R.cosine_similarity(a, b), torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8))


# --- the C++ backend's vectorised kernels ---------------------------------------------------------------
# csrc/cpu/losses.cpp has one copy of its float/half/bfloat16 kernels per instruction set (16 or 8
# float lanes); these cases reach the paths the shapes above do not: float rows of whole vectors
# (no staging copy), several summation blocks, cosine tasks of whole samples and runs that cross
# samples.


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(6, 64, 2), (9, 16, 3), (4, 8200, 2)], ids=lambda c: f"B{c[0]}xK{c[1]}")
def test_cpp_vector_paths_pair_kd_and_kd(case, dtype):
    logits, labels, partner = pair_inputs(*case, ignore=False)
    go = torch.tensor(0.37)
    ref, ref_g = _pair_run(logits, labels, partner, go, fn=R.pair_kd_loss, **PAIR_KW)
    same, same_g = _pair_run(logits.to(dtype), labels, partner, go, fn=R.pair_kd_loss, **PAIR_KW)
    got, got_g = _pair_run(logits.to(dtype), labels, partner, go, backend="cpp", **PAIR_KW)
    cond, cond_g = pair_kd_conditioning(logits.to(dtype), labels, partner, teacher="confident", ignore_index=-100,
                                        grad_output=go, **PAIR_KW)
    assert_within("loss", got, same, ref, cond)
    assert_within("grad", got_g, same_g, ref_g, cond_g)
    teacher = logits.flip(0).contiguous()

    def kd(x, fn, backend=None):
        x = x.clone().requires_grad_()
        with fastsd.use_backend(backend):
            loss = fn(x, teacher.to(x.dtype), 3.0)
        return loss, torch.autograd.grad(loss, x, go.to(loss.dtype))[0]

    ref, ref_g = kd(logits, R.kd_loss)
    same, same_g = kd(logits.to(dtype), R.kd_loss)
    got, got_g = kd(logits.to(dtype), fastsd.kd_loss, "cpp")
    cond, cond_g = kd_conditioning(logits.to(dtype), teacher.to(dtype), 3.0, "batchmean", go)
    assert_within("kd loss", got, same, ref, cond)
    assert_within("kd grad", got_g, same_g, ref_g, cond_g)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_cpp_vector_paths_feature_alignment(kind, dtype):
    layers = [((20, 8, 7, 7), False), ((2, 5, 20, 20), False), ((3, 24, 9, 11), True), ((70000, 3), False)]
    s, t = feature_inputs(torch.float64, seed=3, layers=layers)
    ref, ref_g = _feature_run(s, t, R.feature_alignment_loss, kind=kind)
    sd, td = [x.to(dtype) for x in s], [x.to(dtype) for x in t]
    same, same_g = _feature_run(sd, td, R.feature_alignment_loss, kind=kind)
    got, got_g = _feature_run(sd, td, fastsd.feature_alignment_loss, "cpp", kind=kind)
    cond, cond_g = feature_conditioning(sd, td, kind, None, "mean", _feature_go(len(sd)))
    assert_within("loss", got, same, ref, cond)
    for l, (a, b, c, d) in enumerate(zip(got_g, same_g, ref_g, cond_g)):
        assert_within(f"grad[{l}]", a, b, c, d)


@needs_cpp
def test_cpp_results_do_not_depend_on_thread_count():
    logits, labels, partner = pair_inputs(64, 1000, 8)
    s, t = feature_inputs(torch.float32, layers=[((16, 64, 16, 16), False), ((8, 32, 9, 9), True)])
    threads = torch.get_num_threads()

    def run():
        out = []
        with fastsd.use_backend("cpp"):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):  # float64: the scalar loops
                z = logits.to(dtype).requires_grad_()
                loss = fastsd.pair_kd_loss(z, labels, partner) + fastsd.kd_loss(z, z.detach().flip(0))
                out += [loss, *torch.autograd.grad(loss, z)]
            for dtype in (torch.float32, torch.float64):
                for kind in ("mse", "l1", "smooth_l1", "cosine"):
                    xs = [x.to(dtype).clone().requires_grad_() for x in s]
                    loss = fastsd.feature_alignment_loss(xs, [y.to(dtype) for y in t], kind=kind)
                    out += [loss, *torch.autograd.grad(loss, xs)]
        return out

    with torch_threads(1):
        one = run()
    with torch_threads(max(threads, 3)):
        many = run()
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# --- the criterion still fails a wrong kernel ---------------------------------------------------------


@pytest.mark.parametrize("op", ["pair_kd_loss", "kd_loss", "feature_alignment_loss"])
def test_checker_rejects_a_kernel_off_by_1e_3(op):
    """With the conditioning term, every float32 case of the parity tests above still fails a loss or
    a gradient that is 1e-3 too large (a wrong constant; the conditioning floor is ~1e-6 relative
    here: it is large only where a result is a tiny difference of large terms)."""
    dtype = torch.float32
    if op == "pair_kd_loss":
        runs = [pair_parity("torch", c, dtype, t) for c in PAIR_CASES for t in ("confident", "symmetric")]
    elif op == "kd_loss":
        runs = [kd_parity("torch", c, dtype, r) for c in KD_CASES for r in ("batchmean", "sum", "mean", "none")]
    else:
        runs = [feature_parity("torch", kind, dtype, k) for kind in ("mse", "l1", "smooth_l1", "cosine")
                for k in range(len(FEATURE_OPTIONS))]
    checked = 0
    for results in runs:
        for name, got, same, ref, cond in results:
            assert_within(name, got, same, ref, cond)  # the right result passes
            if ref.abs().max() > 0:  # (K = 1: everything is exactly 0, and so is 1e-3 of it)
                wrong = (got.double() * (1 + 1e-3)).to(dtype)
                assert not parity_bound(wrong, same, ref, cond).ok, f"{name}: a result off by 1e-3 passes"
                checked += 1
    assert checked >= 16


ISAS = ("default", "avx2", "avx512")  # narrowest first, as ATEN_CPU_CAPABILITY spells them


def _capped_env(variable=None, value=None):
    """os.environ without either cap, plus variable=value."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "FASTSD_CPU_CAPABILITY")}
    if variable is not None:
        env[variable] = value
    return env


@needs_cpp
@pytest.mark.parametrize("variable", ["ATEN_CPU_CAPABILITY", "FASTSD_CPU_CAPABILITY"])
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpp_narrower_instruction_sets(variable, capability):
    """A cap on the vector path (ATen's, which lowers PyTorch's kernels too, or fastsd's own) picks
    fastsd's narrower kernels (csrc/cpu/capability.h): `python -m fastsd.info` reports the path, and
    the selftest's parity checks of the C++ ops pass on it, and the KL of equal rows is exactly zero
    on it (tests/exact_zero.py; the in-process test of test_fuzz runs the widest path), in a fresh
    process."""
    import subprocess
    import sys

    code = ("import sys, torch, fastsd._C; from fastsd import info; from fastsd.selftest import CHECKS\n"
            "print('capability', *torch.ops.fastsd_C.cpu_capability())\n"
            "info.main(['--short'])\n"
            "for op in ('patch_swap', 'pair_kd_loss', 'kd_loss', 'feature_alignment_loss'):\n"
            "    err, tol = CHECKS[op]('cpp', 'cpu')\n"
            "    print(op, err, tol)\n"
            "    assert err <= tol, op\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "from exact_zero import equal_rows_are_exactly_zero\n"
            "equal_rows_are_exactly_zero('cpp', (torch.float32, torch.float16, torch.bfloat16, torch.float64))\n"
            "print('equal rows: exactly zero')\n")
    r = subprocess.run([sys.executable, "-c", code], env=_capped_env(variable, capability), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    in_use, cpu = r.stdout.split("capability ", 1)[1].split()[:2]
    assert in_use == ISAS[min(ISAS.index(capability), ISAS.index(cpu))], r.stdout
    assert f"CPU vector path: {in_use} (this CPU: {cpu}" in r.stdout and f"{variable}={capability}" in r.stdout
    assert "equal rows: exactly zero" in r.stdout


@needs_cpp
def test_cpu_capability_bad_value():
    import subprocess
    import sys

    code = "import torch, fastsd._C; torch.ops.fastsd_C.cpu_capability()"
    r = subprocess.run([sys.executable, "-c", code], env=_capped_env("FASTSD_CPU_CAPABILITY", "avx3"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ValueError: FASTSD_CPU_CAPABILITY must be one of default, avx2, avx512" in r.stderr


# --- inputs that do not require grad, gradcheck, opcheck, compile ----------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_inputs_give_the_same_loss(backend):
    logits, labels, partner = pair_inputs(37, 10, 5)
    s, t = feature_inputs(torch.float32)
    x = logits.float()
    with fastsd.use_backend(backend):
        a = fastsd.pair_kd_loss(x, labels, partner)
        b = fastsd.pair_kd_loss(x.clone().requires_grad_(), labels, partner)
        c = fastsd.feature_alignment_loss(s, t, kind="smooth_l1")
        d = fastsd.feature_alignment_loss([v.clone().requires_grad_() for v in s], t, kind="smooth_l1")
        e = fastsd.kd_loss(x, x.flip(0))
        f = fastsd.kd_loss(x.clone().requires_grad_(), x.flip(0))
    assert not a.requires_grad and b.requires_grad and not c.requires_grad and not e.requires_grad
    torch.testing.assert_close(a, b.detach())
    torch.testing.assert_close(c, d.detach())
    torch.testing.assert_close(e, f.detach())


def test_gradcheck_float64_cpp():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("fastsd._C not built")
    logits, labels, partner = pair_inputs(9, 6, 3)
    labels[4] = -100
    # The teacher side is detached, so the KD gradient is not the derivative of the loss in the
    # teacher's logits: check the CE part on every row, and the KD part on the student rows with
    # the teacher rows held fixed (symmetric mode is covered by the parity tests).
    z0 = logits.clone().requires_grad_()
    R.pair_kd_loss(z0, labels, partner, ce_weight=0.0).backward()
    students = z0.grad.abs().sum(1) > 0
    assert 0 < students.sum() < 9

    def students_only(zs):
        return fastsd.pair_kd_loss(logits.masked_scatter(students[:, None], zs), labels, partner, **PAIR_KW)

    with fastsd.use_backend("cpp"):
        torch.autograd.gradcheck(lambda z: fastsd.pair_kd_loss(z, labels, partner, kd_weight=0.0),
                                 (logits.clone().requires_grad_(),))
        torch.autograd.gradcheck(students_only, (logits[students].clone().requires_grad_(),))
        t = torch.randn(4, 6, dtype=torch.float64)
        for reduction in ("batchmean", "none"):
            torch.autograd.gradcheck(lambda z: fastsd.kd_loss(z, t, 2.0, reduction),
                                     (torch.randn(4, 6, dtype=torch.float64, requires_grad=True),))
        s, tg = feature_inputs(torch.float64, layers=[((2, 3, 2, 3), False), ((2, 4, 2, 2), True), ((3, 4), False)])
        for kind, reduction in (("mse", "mean"), ("l1", "sum"), ("smooth_l1", "none"), ("cosine", "mean")):
            torch.autograd.gradcheck(
                lambda *xs: fastsd.feature_alignment_loss(list(xs), tg, kind, "cosine", reduction),
                tuple(x.clone().requires_grad_() for x in s))


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    logits, labels, partner = pair_inputs(6, 5, 2)
    s, t = feature_inputs(torch.float32, layers=FEATURE_SHAPES[:2])
    z = logits.float().requires_grad_()
    with fastsd.use_backend(backend):
        torch.library.opcheck(torch.ops.fastsd.pair_kd_loss.default, (z, labels, partner, 3.0, 1.0, 1.0, False, -100, True))
        torch.library.opcheck(torch.ops.fastsd.kd_loss.default, (z, logits.float().flip(0), 3.0, "batchmean", True))
        torch.library.opcheck(torch.ops.fastsd.kd_loss.default, (z.detach(), logits.float().flip(0), 3.0, "none", False))
        for kind in ("mse", "cosine"):
            torch.library.opcheck(torch.ops.fastsd.feature_alignment_loss.default,
                                  ([x.clone().requires_grad_() for x in s], t, [False, True], kind, [0.5, 0.25],
                                   "mean", True))


def test_torch_compile_fullgraph_matches_eager():
    import torch._dynamo

    torch.manual_seed(0)
    w1 = torch.randn(12, 16, requires_grad=True)
    w2 = torch.randn(16, 10, requires_grad=True)
    x = torch.randn(8, 12)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    partner = torch.tensor([2, 3, 0, 1, 5, 4, 7, 6])

    def step(x, refined):
        h = torch.relu(x @ w1)
        logits = h @ w2
        with torch.no_grad():
            target = torch.relu(refined @ w1)
        loss = fastsd.pair_kd_loss(logits, labels, partner) + 0.5 * fastsd.kd_loss(logits, logits.detach().flip(0))
        loss = loss + fastsd.feature_alignment_loss([h, logits], [target, target @ w2], kind="mse", weights="cosine")
        return loss

    refined = x + 0.01 * torch.randn_like(x)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, refined)
    gc = torch.autograd.grad(loss_c, (w1, w2))
    loss_e = step(x, refined)
    ge = torch.autograd.grad(loss_e, (w1, w2))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_host_sync(backend):
    logits, labels, partner = pair_inputs(12, 10, 3)
    z = logits.float().requires_grad_()
    s, t = feature_inputs(torch.float32, layers=FEATURE_SHAPES[:3])
    s = [x.requires_grad_() for x in s]
    with fastsd.use_backend(backend), NoHostSync():
        loss = fastsd.pair_kd_loss(z, labels, partner, teacher="symmetric") + fastsd.kd_loss(z, z.detach().flip(0))
        for kind in ("mse", "cosine"):
            loss = loss + fastsd.feature_alignment_loss(s, t, kind=kind, weights="cosine")
        loss = loss + fastsd.feature_alignment_loss(s, t, reduction="none").sum()
        loss.backward(torch.tensor(1.7))
    assert z.grad is not None and all(x.grad is not None for x in s)
    with pytest.raises(AssertionError), NoHostSync():
        torch.ones(1).item()


# --- memory traffic (Triton interpreter) -------------------------------------------------------------


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("K", [10, 1000, 8192, 9000])
def test_pair_kd_and_kd_traffic(K):
    import triton_tools
    from fastsd.kernels import losses as k

    B = 4 if K > 1000 else 9
    logits, labels, partner = pair_inputs(B, K, 2)
    z = logits.half()
    limit = 1.05 if K <= k.MAX_SINGLE_BLOCK else 2.05
    for grad in (False, True):
        (loss, g), traffic = triton_tools.count_traffic(
            k.pair_kd_loss, z, labels, partner, 3.0, 1.0, 1.0, False, -100, grad, tensors={"logits": z})
        assert traffic["logits"]["store"] == 0
        assert traffic["logits"]["load"] <= limit * z.nbytes, (K, traffic)
        assert traffic["logits"]["load"] >= z.nbytes
        if grad:
            assert traffic["out1"]["store"] == g.nbytes and traffic["out1"]["load"] == 0
    t = z.flip(0).contiguous()
    (loss, g), traffic = triton_tools.count_traffic(k.kd_loss, z, t, 3.0, 1.0, 1.0, False, True,
                                                    tensors={"student": z, "teacher": t})
    for name in ("student", "teacher"):
        assert z.nbytes <= traffic[name]["load"] <= limit * z.nbytes and traffic[name]["store"] == 0
    assert traffic["out1"]["store"] == g.nbytes


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton interpreter unavailable")
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_alignment_traffic_and_one_launch(kind, monkeypatch):
    import triton_tools
    from fastsd.kernels import losses as k

    s, t = feature_inputs(torch.bfloat16)
    launches = []
    for name in ("_feature_elementwise_kernel", "_feature_cosine_kernel"):
        kernel = getattr(k, name)
        monkeypatch.setattr(k, name, _CountLaunches(kernel, launches))
    named = {f"s{l}": x for l, x in enumerate(s)} | {f"t{l}": x for l, x in enumerate(t)}
    cl = [x.dim() == 4 and not x.is_contiguous() for x in s]
    scales = [1.0 / x.numel() for x in s]
    (loss, g), traffic = triton_tools.count_traffic(k.feature_alignment_loss, s, t, cl, kind, scales, False, True,
                                                    tensors=named)
    assert len(launches) == 1  # every layer in one launch
    for name, x in named.items():
        assert x.nbytes <= traffic[name]["load"] <= 1.05 * x.nbytes and traffic[name]["store"] == 0, (name, traffic)
    assert traffic["out1"]["store"] == g.nbytes == sum(x.nbytes for x in s) and traffic["out1"]["load"] == 0


class _CountLaunches:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


# --- nn modules -------------------------------------------------------------------------------------


def test_nn_modules():
    logits, labels, partner = pair_inputs(12, 10, 3)
    m = fastsd.nn.PairKDLoss(temperature=3.0, kd_weight=0.7, ce_weight=1.3, teacher="symmetric")
    torch.testing.assert_close(m(logits, labels, partner),
                               fastsd.pair_kd_loss(logits, labels, partner, teacher="symmetric", **PAIR_KW))
    kd = fastsd.nn.KDLoss(temperature=2.0, reduction="sum")
    torch.testing.assert_close(kd(logits, logits.flip(0)), fastsd.kd_loss(logits, logits.flip(0), 2.0, "sum"))
    s, t = feature_inputs(torch.float64, layers=FEATURE_SHAPES[:2])
    fa = fastsd.nn.FeatureAlignmentLoss(kind="l1", weights="cosine")
    torch.testing.assert_close(fa(s, t), fastsd.feature_alignment_loss(s, t, "l1", "cosine"))
    assert "temperature=3.0" in repr(m)


# --- bad input ----------------------------------------------------------------------------------------

Z = torch.randn(4, 5)
Y = torch.tensor([0, 1, 0, 1])
P = torch.tensor([2, 3, 0, 1])
S = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]

BAD = [
    ("logits 1-D", lambda: fastsd.pair_kd_loss(Z[0], Y, P), ValueError, "logits"),
    ("logits int", lambda: fastsd.pair_kd_loss(Z.long(), Y, P), TypeError, "logits"),
    ("labels float", lambda: fastsd.pair_kd_loss(Z, Y.float(), P), TypeError, "labels"),
    ("labels length", lambda: fastsd.pair_kd_loss(Z, Y[:3], P), ValueError, "labels"),
    ("labels out of range", lambda: fastsd.pair_kd_loss(Z, torch.tensor([0, 5, 0, 1]), P), ValueError, "labels"),
    ("labels negative", lambda: fastsd.pair_kd_loss(Z, torch.tensor([0, -1, 0, 1]), P), ValueError, "labels"),
    ("partner not pairs", lambda: fastsd.pair_kd_loss(Z, Y, torch.tensor([1, 2, 3, 0])), ValueError, "partner"),
    ("partner out of range", lambda: fastsd.pair_kd_loss(Z, Y, torch.tensor([2, 3, 0, 9])), ValueError, "partner"),
    ("partner length", lambda: fastsd.pair_kd_loss(Z, Y, P[:2]), ValueError, "partner"),
    ("temperature 0", lambda: fastsd.pair_kd_loss(Z, Y, P, temperature=0), ValueError, "temperature"),
    ("temperature < 0", lambda: fastsd.kd_loss(Z, Z, temperature=-1.0), ValueError, "temperature"),
    ("temperature str", lambda: fastsd.kd_loss(Z, Z, temperature="4"), TypeError, "temperature"),
    ("kd_weight nan", lambda: fastsd.pair_kd_loss(Z, Y, P, kd_weight=math.nan), TypeError, "kd_weight"),
    ("unknown teacher", lambda: fastsd.pair_kd_loss(Z, Y, P, teacher="best"), ValueError, "teacher"),
    ("ignore_index float", lambda: fastsd.pair_kd_loss(Z, Y, P, ignore_index=1.5), TypeError, "ignore_index"),
    ("kd shapes", lambda: fastsd.kd_loss(Z, Z[:, :4]), ValueError, "teacher_logits"),
    ("kd dtypes", lambda: fastsd.kd_loss(Z, Z.double()), TypeError, "teacher_logits"),
    ("kd reduction", lambda: fastsd.kd_loss(Z, Z, reduction="avg"), ValueError, "reduction"),
    ("layer shape mismatch", lambda: fastsd.feature_alignment_loss(S, [S[0], S[0]]), ValueError, "target[1]"),
    ("layer count", lambda: fastsd.feature_alignment_loss(S, S[:1]), ValueError, "target"),
    ("tensor vs list", lambda: fastsd.feature_alignment_loss(S[0], S), TypeError, "target"),
    ("no layers", lambda: fastsd.feature_alignment_loss([], []), ValueError, "student"),
    ("rank 1", lambda: fastsd.feature_alignment_loss(Z[0], Z[0]), ValueError, "student"),
    ("mixed dtypes", lambda: fastsd.feature_alignment_loss(S, [S[0], S[1].double()]), TypeError, "target[1]"),
    ("int features", lambda: fastsd.feature_alignment_loss(Z.long(), Z.long()), TypeError, "student"),
    ("unknown kind", lambda: fastsd.feature_alignment_loss(S, S, kind="kl"), ValueError, "kind"),
    ("weights length", lambda: fastsd.feature_alignment_loss(S, S, weights=[1.0]), ValueError, "weights"),
    ("weights name", lambda: fastsd.feature_alignment_loss(S, S, weights="linear"), ValueError, "weights"),
    ("weights values", lambda: fastsd.feature_alignment_loss(S, S, weights=[1.0, "a"]), TypeError, "weights[1]"),
    ("feature reduction", lambda: fastsd.feature_alignment_loss(S, S, reduction="batchmean"), ValueError, "reduction"),
    ("empty layer", lambda: fastsd.feature_alignment_loss(S[0][:0], S[0][:0]), ValueError, "student"),
]


@pytest.mark.parametrize("call, exc, word", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word.replace("[", r"\[").replace("]", r"\]")):
        call()
