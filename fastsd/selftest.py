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
