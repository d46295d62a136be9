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
from typing import Callable, Dict, List, Tuple

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
            with _backend.use_backend(backend):
                out = patch_swap(x, partner, mask)
                if dtype.is_floating_point:
                    xr = x.clone().requires_grad_()
                    g = torch.randn(x.shape, device=device).to(dtype)
                    patch_swap(xr, perm, mask).backward(g)
            worst = max(worst, _err(out, reference.patch_swap(x, partner, mask)))
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


# --- distillation losses: loss and gradient against the float64 reference, with the parity tests'
# criterion: error <= 2 x the same-dtype PyTorch reference's error + one ulp of the output dtype at
# the reference's magnitude. A check returns the (error, tolerance) of its worst case.

LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _within(got: torch.Tensor, same: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    got, same, ref = got.detach(), same.detach(), ref.detach()
    if got.shape != ref.shape:
        return float("inf"), 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    ulp = torch.finfo(got.dtype).eps * scale + torch.finfo(got.dtype).tiny
    return _err(got, ref), 2 * _err(same, ref) + ulp


def _worst(results: List[Tuple[float, float]]) -> Tuple[float, float]:
    return max(results, key=lambda r: r[0] / r[1] if r[1] > 0 else (float("inf") if r[0] > 0 else 0.0))


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


def _parity(fn, ref_fn, inputs64, backend, dtype, grad_out, *args, **kw) -> List[Tuple[float, float]]:
    ref, ref_g = _loss_and_grads(ref_fn, inputs64, None, grad_out, *args, **kw)
    low = [x.to(dtype) for x in inputs64]
    same, same_g = _loss_and_grads(ref_fn, low, None, grad_out, *args, **kw)
    got, got_g = _loss_and_grads(fn, low, backend, grad_out, *args, **kw)
    out = [_within(got, same, ref)] + [_within(a, b, c) for a, b, c in zip(got_g, same_g, ref_g)]
    if got.dtype != dtype:
        out.append((float("inf"), 0.0))
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
        for teacher in ("confident", "symmetric"):
            for dtype in LOSS_DTYPES:
                results += _parity(pair_kd_loss, R.pair_kd_loss, [logits], backend, dtype,
                                   torch.tensor(0.37, device=device), labels, partner, temperature=3.0,
                                   kd_weight=0.7, ce_weight=1.3, teacher=teacher)
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
