"""``python -m fastsd.selftest``: parity of every backend available on this machine, in under a minute.

Runs the core cases of the parity suite (fastsd.bench.cases) for every backend that can run on
this machine's devices (a user's GPU box included) against the pure-PyTorch reference, and
prints one line per op, device and backend with the max error and PASS/FAIL. Exits 1 on any
failure, so it can sit in a user's CI. Needs no test files.

Each op adds a check below with ``@check(op)``: ``fn(backend, device) -> (max_err, tolerance)``.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch

from . import _backend
from .bench.cases import DTYPES, PATCH_SWAP_PARITY

Check = Callable[[str, str], Tuple[float, float]]
CHECKS: Dict[str, Check] = {}


def check(op: str):
    def deco(fn):
        CHECKS[op] = fn
        return fn

    return deco


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


@check("patch_swap")
def _patch_swap(backend: str, device: str) -> Tuple[float, float]:
    from . import reference
    from .patch_swap import patch_swap

    worst = 0.0
    for case in PATCH_SWAP_PARITY:
        for dtype in DTYPES.values():
            x, partner, mask = case.make(dtype, device)
            perm = torch.randperm(x.shape[0], device=device)
            own = torch.rand(mask.shape, device=device) < 0.5  # a pair's rows each under its own mask
            with _backend.use_backend(backend):
                out = patch_swap(x, partner, mask)  # patch_swap_mask's: one mask a pair
                out_own = patch_swap(x, partner, own)
                if dtype.is_floating_point:
                    xr = x.clone().requires_grad_()
                    g = torch.randn(x.shape, device=device).to(dtype)
                    patch_swap(xr, perm, mask).backward(g)
            worst = max(worst, _err(out, reference.patch_swap(x, partner, mask)))
            worst = max(worst, _err(out_own, reference.patch_swap(x, partner, own)))
            if dtype.is_floating_point:
                worst = max(worst, _err(xr.grad, reference.patch_swap_backward(g, perm, mask)))
    return worst, 0.0  # a gather: bit-exact


@check("icp_update")
def _icp_update(backend: str, device: str) -> Tuple[float, float]:
    from .icp import icp_update_, new_state
    from .reference import icp as ref

    worst = 0.0
    for method in ("sgd", "adam", "ademamix"):
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(3, 5, 7, 9, device=device).to(dtype)
            x_ref = x.clone()
            state, state_ref = new_state(x, method), new_state(x, method)
            for step in (1, 2, 3):
                g = torch.randn(x.shape, device=device).to(dtype)
                with _backend.use_backend(backend):
                    icp_update_(x, g, *state, method=method, step=step, step_size=0.01, clamp=(-2.0, 2.0))
                ref.icp_update_(x_ref, g, *state_ref, method, step, 0.01, 0.9, 0.999, 0.9999, 5.0, 1e-8, -2.0, 2.0)
            worst = max(worst, _err(x, x_ref))
    return worst, 1e-5  # |x| ~ 1: a few float32 ulps


# --- the parity criterion of the distillation losses (shared with tests/test_losses.py and
# tests/test_fuzz.py). A backend's result `got` and PyTorch's `same` (the reference formulas run in
# the input's dtype) are compared with the float64 reference `ref`, all three on the same
# dtype-rounded inputs; element by element,
#
#     |got - ref| <= 2 * e_torch + ulp + cond
#
# * e_torch = max |same - ref|: no worse than twice PyTorch's own error (the flash-attention
#   criterion);
# * ulp = one unit in the last place of the output dtype at max |ref| (rounding a correct result
#   costs up to half of it, and a gradient is rounded once in the kernel and once more when scaled
#   by grad_output);
# * cond = COND_ULPS ulps, in the precision the kernels compute in (float32; float64 for float64
#   inputs), of M: the magnitude of the intermediates that the computation subtracts, carried to
#   the output. It is the error floor of the computation itself, which no order of the same
#   operations beats by more than a constant. e_torch alone is a sample of that floor, not a bound:
#   it changes with things that are not the math (ATen's vector path, what ran before,
#   alignment), and where a result is a small difference of large terms (a softmax gradient q - p
#   with q, p near 1/2; a KL of nearly equal rows) torch can be 10x luckier than an equally correct
#   kernel. The *_conditioning functions below derive M per op, first order in eps.
#
# Where a result is well conditioned, M is at most a small multiple of |ref| and cond adds a few
# ulps: a kernel that is wrong by 1e-3 relative still fails (test_losses.py::test_checker_rejects_*).

# An fp32 (fp64) computation of each intermediate is a few roundings away from exact: one for the
# operation itself, one or two more for its operands' roundings. Two ulps (eps, i.e. 4 x the unit
# roundoff) per unit of M covers that with the derivations below (first order; each intermediate
# is weighted by how its relative error reaches the output).
COND_ULPS = 2.0


class Bound(NamedTuple):
    """The criterion at the element where error / tolerance is largest."""
    err: float  # |got - ref| there
    tol: float  # 2 * e_torch + ulp + cond there
    e_torch: float
    ulp: float
    cond: float

    @property
    def ok(self) -> bool:
        return self.err <= self.tol  # False for NaN


def parity_bound(got: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, cond=0.0) -> Bound:
    """The criterion above; cond is a float or a tensor that broadcasts to ref's shape."""
    got, same, ref = got.detach(), same.detach(), ref.detach()
    if got.shape != ref.shape:
        return Bound(float("inf"), 0.0, 0.0, 0.0, 0.0)
    if ref.numel() == 0:
        return Bound(0.0, 0.0, 0.0, 0.0, 0.0)
    e_torch = _err(same, ref)
    ulp = torch.finfo(got.dtype).eps * float(ref.abs().max()) + torch.finfo(got.dtype).tiny
    err = (got.double() - ref.double()).abs()
    cond = torch.as_tensor(cond, dtype=torch.float64, device=err.device).expand(ref.shape)
    tol = 2 * e_torch + ulp + cond
    k = int((err / tol).flatten().nan_to_num(nan=float("inf")).argmax())
    return Bound(float(err.flatten()[k]), float(tol.flatten()[k]), e_torch, ulp, float(cond.flatten()[k]))


def _compute_eps(dtype: torch.dtype) -> float:
    """One ulp at 1 of the precision the loss kernels compute in (at::opmath_type)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _softmax_parts(x: torch.Tensor, temperature: float):
    """(p, lp, a, lse) of softmax(x / T) along dim 1, in float64.

    Every backend computes lp = d - lse with d = (x - max) / T and lse = log sum exp(d): the two
    intermediates that lp subtracts have magnitudes |d|, lse, so lp has an absolute error of a few
    eps * a, a = |d| + lse, and p = exp(lp) a relative one of a few eps * (1 + a)."""
    x = x.double()
    d = (x - x.max(1, keepdim=True).values) / temperature
    lse = d.logsumexp(1, keepdim=True)
    lp = d - lse
    return lp.exp(), lp, d.abs() + lse, lse


def _kl_magnitude(p, lp, ap, lq, aq):
    """M of sum_k p_k (lp_k - lq_k) per row: lp - lq subtracts lp and lq (a_p + a_q), and p's relative
    error (1 + a_p) multiplies the difference."""
    return (p * (ap + aq + (1 + ap) * (lp - lq).abs())).sum(1)


def _cond(dtype: torch.dtype, m: torch.Tensor) -> torch.Tensor:
    return (COND_ULPS * _compute_eps(dtype) * m).nan_to_num(nan=0.0, posinf=0.0)


def kd_conditioning(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str,
                    grad_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cond of kd_loss's loss and student gradient (see above), for the dtype-rounded inputs.

    loss = T^2 r sum_i sum_k p_ik (lp_ik - lq_ik), r the reduction's factor (1/B, 1/(B K), 1):
    M = T^2 r sum_k p_k (a_p + a_q + (1 + a_p) |lp - lq|), per row for "none".
    grad = g T r (q - p), g = grad_output: q and p (each <= 1) are subtracted, each with relative
    error ~ eps (1 + a): M_k = |g T r| (q_k (1 + a_q,k) + p_k (1 + a_p,k))."""
    B, K = student.shape
    r = {"batchmean": 1.0 / max(B, 1), "mean": 1.0 / max(B * K, 1), "sum": 1.0, "none": 1.0}[reduction]
    q, lq, aq, _ = _softmax_parts(student, temperature)
    p, lp, ap, _ = _softmax_parts(teacher, temperature)
    rows = temperature ** 2 * r * _kl_magnitude(p, lp, ap, lq, aq)
    g = (temperature * r * grad_output.double()).abs().reshape(-1, 1)
    grad = g * (q * (1 + aq) + p * (1 + ap))
    return _cond(student.dtype, rows if reduction == "none" else rows.sum()), _cond(student.dtype, grad)


def pair_kd_conditioning(logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, temperature: float,
                         kd_weight: float, ce_weight: float, teacher: str, ignore_index: int,
                         grad_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cond of pair_kd_loss's loss and gradient (see above), for the dtype-rounded logits.

    CE of a valid row: lse1 - z_y = (m + log S1) - z_y subtracts |m| + log S1 + |z_y|; its gradient
    c (softmax(z)_k - [k = y]), c = g ce_weight / n_valid, is bounded as the KD gradient:
    |c| s_k (1 + a1_k). KD of a paired row i as the student of j = partner[i]: the KD bound of
    kd_loss with teacher row j, scaled by kd_weight T^2 w / n_pairs (loss) and g kd_weight T w /
    n_pairs (gradient), w = 1/2 for "symmetric". For "confident" the loss takes the larger of the
    two members' M per pair (the teacher choice is not recomputed here), and both members' gradient
    rows get the student's bound: a teacher row's tolerance grows by a few ulps of the KD scale,
    never by a relative amount."""
    x = logits.double()
    B = x.shape[0]
    labels, partner = labels.long(), partner.long()
    valid = labels != ignore_index
    paired = (partner != torch.arange(B, device=x.device)) & valid & valid[partner]
    n_valid = max(int(valid.sum()), 1)
    n_pairs = max(int(paired.sum()) / 2, 1.0)
    w = 0.5 if teacher == "symmetric" else 1.0
    g = float(grad_output.abs())
    s1, _, a1, log_s1 = _softmax_parts(x, 1.0)
    zy = x.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    ce_rows = torch.where(valid, x.max(1).values.abs() + log_s1[:, 0] + zy.abs(), 0)
    q, lq, a, _ = _softmax_parts(x, temperature)
    kd_rows = _kl_magnitude(q[partner], lq[partner], a[partner], lq, a)
    if teacher != "symmetric":  # either member may be the student: the larger M, once per pair
        kd_rows = torch.maximum(kd_rows, kd_rows[partner])
    # per pair: both members at weight 1/2 (symmetric) or the larger M once (confident)
    kd = 0.5 * torch.where(paired, kd_rows, 0).sum()
    loss = abs(ce_weight) / n_valid * ce_rows.sum() + abs(kd_weight) * temperature ** 2 / n_pairs * kd
    grad = torch.where(valid[:, None], abs(ce_weight) / n_valid * g * s1 * (1 + a1), 0)
    grad = grad + torch.where(paired[:, None], abs(kd_weight) * temperature * w / n_pairs * g
                              * (q * (1 + a) + q[partner] * (1 + a[partner])), 0)
    return _cond(logits.dtype, loss), _cond(logits.dtype, grad)


def feature_conditioning(students: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kind: str, weights,
                         reduction: str, grad_output: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """cond of feature_alignment_loss's loss and student gradients (see above), dtype-rounded inputs.

    Per layer, loss = s_l sum_k e(d_k), d = x - t (s_l = w_l, or w_l / n_l for the means):
    * elementwise kinds: d = x - t is rounded once (relative eps), so a term e(d) is off by
      eps (|e| + |d e'(d)|) and a gradient entry s_l e'(d) by eps (|e'| + |d e''|):
      mse 3 d^2 and 4 |d|; l1 2 |d| and [d != 0]; smooth_l1 (|d| < 1) 1.5 d^2 and 2 |d|, else
      (|d| - 1/2 subtracts |d| and 1/2) 2 |d| + 1/2 and 1;
    * cosine, per position over the C channels: cos = x.t / (|x| |t|) (norms clamped to 1e-8); the
      dot product subtracts terms of total size sum |x_c t_c|, so 1 - cos is off by eps times
      M = 1 + |cos| + sum |x_c t_c| / (|x| |t|) (<= 3); the gradient s_l (cos x_c / |x|^2 - t_c /
      (|x| |t|)) subtracts its two terms, the first with cos's error: M_c = |x_c| M / |x|^2 +
      |t_c| / (|x| |t|). These are the operands' magnitudes, not the (possibly tiny) result's.
    """
    from .reference import losses as R

    w = R.layer_weights(weights, len(students))
    go = grad_output.double().reshape(-1)
    losses, grads = [], []
    for l, (x, t, wl) in enumerate(zip(students, targets, w)):
        x, t = x.double(), t.double()
        if kind == "cosine":
            n = x.numel() // x.shape[1]
            dot = (x * t).sum(1, keepdim=True)
            nx, nt = x.norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
            axy = nx.clamp_min(R.COSINE_EPS) * nt.clamp_min(R.COSINE_EPS)
            m = 1 + (dot / axy).abs() + (x * t).abs().sum(1, keepdim=True) / axy
            loss_m = m.sum()
            inv_nx2 = torch.where(nx > R.COSINE_EPS, 1 / (nx * nx), 0)
            grad_m = x.abs() * m * inv_nx2 + t.abs() / axy
        else:
            n = x.numel()
            d = x - t
            a = d.abs()
            if kind == "mse":
                loss_m, grad_m = (3 * d * d).sum(), 4 * a
            elif kind == "l1":
                loss_m, grad_m = (2 * a).sum(), (d != 0).double()
            else:
                small = a < 1
                loss_m = torch.where(small, 1.5 * d * d, 2 * a + 0.5).sum()
                grad_m = torch.where(small, 2 * a, 1.0)
        scale = abs(wl if reduction == "sum" else wl / n)
        losses.append(scale * loss_m)
        grads.append(_cond(students[l].dtype, scale * abs(float(go[l if go.numel() > 1 else 0])) * grad_m))
    loss = torch.stack(losses)
    return _cond(students[0].dtype, loss if reduction == "none" else loss.sum()), grads


# --- distillation losses: loss and gradient against the float64 reference, with the criterion
# above. A check returns the (error, tolerance) of its worst case.

LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _worst(results: List[Bound]) -> Tuple[float, float]:
    worst = max(results, key=lambda r: r.err / r.tol if r.tol > 0 else (float("inf") if r.err > 0 else 0.0))
    return worst.err, worst.tol


def _loss_and_grads(fn, inputs: List[torch.Tensor], backend, grad_out: torch.Tensor, *args, **kw):
    """fn(*inputs, *args, **kw) under backend (None: call fn as is), and its gradients."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    if backend is None:
        loss = fn(xs if len(xs) > 1 else xs[0], *args, **kw)
    else:
        with _backend.use_backend(backend):
            loss = fn(xs if len(xs) > 1 else xs[0], *args, **kw)
    grads = torch.autograd.grad(loss, xs, grad_out.to(loss.dtype))
    return loss, list(grads)


def _parity(fn, ref_fn, conditioning, inputs64, backend, dtype, grad_out, *args, **kw) -> List[Bound]:
    """conditioning(inputs in dtype) -> (cond of the loss, cond of the gradient or a list, one per input)."""
    ref, ref_g = _loss_and_grads(ref_fn, inputs64, None, grad_out, *args, **kw)
    low = [x.to(dtype) for x in inputs64]
    same, same_g = _loss_and_grads(ref_fn, low, None, grad_out, *args, **kw)
    got, got_g = _loss_and_grads(fn, low, backend, grad_out, *args, **kw)
    loss_cond, grad_conds = conditioning(low)
    grad_conds = grad_conds if isinstance(grad_conds, list) else [grad_conds]
    out = [parity_bound(got, same, ref, loss_cond)]
    out += [parity_bound(a, b, c, d) for a, b, c, d in zip(got_g, same_g, ref_g, grad_conds)]
    if got.dtype != dtype:
        out.append(Bound(float("inf"), 0.0, 0.0, 0.0, 0.0))
    return out


@check("pair_kd_loss")
def _pair_kd_loss(backend: str, device: str) -> Tuple[float, float]:
    from .losses import pair_kd_loss
    from .pairing import intra_class_pairs
    from .reference import losses as R

    results = []
    for B, K, classes in ((37, 10, 5), (3, 1, 1), (16, 1000, 4), (5, 2053, 2)):
        gen = torch.Generator().manual_seed(B * K)
        logits = torch.randn(B, K, generator=gen, dtype=torch.float64) * 3
        labels = torch.randint(0, classes, (B,), generator=gen) % K
        partner = intra_class_pairs(labels, generator=gen)
        if B > 5:
            labels[5] = -100  # an ignored row
        logits, labels, partner = logits.to(device), labels.to(device), partner.to(device)
        go = torch.tensor(0.37, dtype=torch.float64, device=device)
        for teacher in ("confident", "symmetric"):
            kw = dict(temperature=3.0, kd_weight=0.7, ce_weight=1.3, teacher=teacher)
            for dtype in LOSS_DTYPES:
                results += _parity(pair_kd_loss, R.pair_kd_loss,
                                   lambda low: pair_kd_conditioning(low[0], labels, partner, ignore_index=-100,
                                                                    grad_output=go, **kw),
                                   [logits], backend, dtype, go, labels, partner, **kw)
    return _worst(results)


@check("kd_loss")
def _kd_loss(backend: str, device: str) -> Tuple[float, float]:
    from .losses import kd_loss
    from .reference import losses as R

    results = []
    for B, K in ((1, 10), (37, 1000), (3, 2053)):
        gen = torch.Generator().manual_seed(B * K)
        s, t = (torch.randn(B, K, generator=gen, dtype=torch.float64).mul(2).to(device) for _ in range(2))
        for reduction in ("batchmean", "none"):
            go = torch.rand(B if reduction == "none" else (), generator=gen, dtype=torch.float64).add(0.5).to(device)
            for dtype in LOSS_DTYPES:
                teacher = t.to(dtype)  # a constant: only the student's gradient is compared
                results += _parity(lambda x, *a, **k: kd_loss(x, teacher, *a, **k),
                                   lambda x, *a, **k: R.kd_loss(x, teacher.to(x.dtype), *a, **k),
                                   lambda low: kd_conditioning(low[0], teacher, 3.0, reduction, go),
                                   [s], backend, dtype, go, temperature=3.0, reduction=reduction)
    return _worst(results)


@check("feature_alignment_loss")
def _feature_alignment_loss(backend: str, device: str) -> Tuple[float, float]:
    from .losses import feature_alignment_loss
    from .reference import losses as R

    # (shape, channels_last): a channels_last map, a 2-D and a 3-D layer, one with long runs
    layers = [((5, 7, 3, 9), False), ((3, 16, 5, 5), True), ((3, 10), False), ((2, 3, 5), False),
              ((2, 5, 20, 20), False)]
    gen = torch.Generator().manual_seed(0)
    students, targets = [], []
    for shape, cl in layers:
        s = torch.randn(shape, generator=gen, dtype=torch.float64)
        t = s + 1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)  # |d| on both sides of 1
        if cl:
            s, t = (x.contiguous(memory_format=torch.channels_last) for x in (s, t))
        students.append(s.to(device))
        targets.append(t.to(device))
    results = []
    options = ((None, "mean"), ("cosine", "sum"), ([0.5, 1.0, 2.0, 0.25, 1.5], "none"))
    for kind in ("mse", "l1", "smooth_l1", "cosine"):
        for dtype in LOSS_DTYPES:
            for weights, reduction in options:
                go = torch.full((len(layers),) if reduction == "none" else (), 0.6, dtype=torch.float64, device=device)
                tgt = [t.to(dtype) for t in targets]  # constants
                results += _parity(lambda xs, **k: feature_alignment_loss(xs, tgt, **k),
                                   lambda xs, **k: R.feature_alignment_loss(xs, [t.to(xs[0].dtype) for t in tgt], **k),
                                   lambda low: feature_conditioning(low, tgt, kind, weights, reduction, go),
                                   students, backend, dtype, go, kind=kind, weights=weights, reduction=reduction)
    return _worst(results)


def _devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(include_interpreter: bool = False) -> int:
    failures = 0
    for op, fn in CHECKS.items():
        for device in _devices():
            for backend in _backend.available(op, torch.empty(0, device=device)):
                if backend == "triton" and device == "cpu" and not include_interpreter:
                    continue
                t0 = time.perf_counter()
                try:
                    err, tol = fn(backend, device)
                    ok = err <= tol
                    msg = f"max err {err:.3g} (tolerance {tol:.3g})"
                except Exception as exc:  # a crash is a failure, reported, not raised
                    ok, msg = False, f"raised {exc.__class__.__name__}: {exc}"
                failures += not ok
                print(f"{'PASS' if ok else 'FAIL'}  {op:<24} {device:<5} {backend:<7} {msg}  "
                      f"[{time.perf_counter() - t0:.1f}s]", flush=True)
    print(f"selftest: {'all passed' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsd.selftest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpreter", action="store_true",
                   help="also run Triton on CPU tensors (needs TRITON_INTERPRET=1 set before start; slow)")
    args = p.parse_args(argv)
    return run(include_interpreter=args.interpreter)


if __name__ == "__main__":
    sys.exit(main())
