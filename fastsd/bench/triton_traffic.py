"""Counting the bytes Triton kernels move, under the interpreter (VERIFYING.md, check 3).

Every load and store of the Triton interpreter goes through
``triton.runtime.interpreter.InterpreterBuilder``; :func:`count_traffic` wraps its masked load /
store (and atomic) entry points to add up ``mask.sum() * itemsize`` per named tensor, matched by
address range. Only meaningful with ``TRITON_INTERPRET=1`` set before the kernels were imported.
``python -m fastsd.bench.triton_traffic`` prints, per op, these counts against the minimum traffic
and against eager PyTorch's dispatch count: the GPU-side figure of a CPU-only machine.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


def _address_range(t: torch.Tensor) -> Tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


class _Counter:
    """Adds up bytes per named address range; unmatched pointers are kept for naming later."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self.ranges = [(name,) + _address_range(t) for name, t in tensors.items()]
        self.bytes = {name: {"load": 0, "store": 0} for name in tensors}
        self.unmatched: List[Tuple[str, np.ndarray, int]] = []

    def add(self, kind: str, ptrs: np.ndarray, mask: Optional[np.ndarray], itemsize: int) -> None:
        ptrs = np.asarray(ptrs).astype(np.uint64)
        if mask is not None:
            ptrs = ptrs[np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)]
        ptrs = ptrs.ravel()
        rest = self._attribute(self.ranges, kind, ptrs, itemsize)
        if rest.size:
            self.unmatched.append((kind, rest, itemsize))

    def _attribute(self, ranges, kind, ptrs, itemsize) -> np.ndarray:
        for name, lo, hi in ranges:
            hit = (ptrs >= lo) & (ptrs < hi)
            n = int(hit.sum())
            if n:
                self.bytes.setdefault(name, {"load": 0, "store": 0})[kind] += n * itemsize
                ptrs = ptrs[~hit]
        return ptrs

    def finish(self, late: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, int]]:
        """Attribute the unmatched accesses to ``late`` tensors (e.g. outputs), the rest to "other"."""
        ranges = [(name,) + _address_range(t) for name, t in late.items()]
        for name in late:
            self.bytes.setdefault(name, {"load": 0, "store": 0})
        self.bytes["other"] = {"load": 0, "store": 0}
        for kind, ptrs, itemsize in self.unmatched:
            rest = self._attribute(ranges, kind, ptrs, itemsize)
            self.bytes["other"][kind] += int(rest.size) * itemsize
        self.unmatched = []
        return self.bytes


def _itemsize(handle) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def _wrapped_builder(counter: _Counter):
    from triton.runtime.interpreter import InterpreterBuilder as builder

    names = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    originals = {name: builder.__dict__[name] for name in names}

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        counter.add("load", ptrs.data, mask.data, _itemsize(ptrs))
        return originals["create_masked_load"](self, ptrs, mask, other, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        counter.add("store", ptrs.data, mask.data, _itemsize(ptrs))
        return originals["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, *args, **kwargs):
        for kind in ("load", "store"):
            counter.add(kind, ptr.data, mask.data, _itemsize(ptr))
        return originals["create_atomic_rmw"](self, rmw_op, ptr, val, mask, *args, **kwargs)

    def create_atomic_cas(self, ptr, cmp, val, *args, **kwargs):
        for kind in ("load", "store"):  # the store is counted even where the compare fails: an upper bound
            counter.add(kind, ptr.data, None, _itemsize(ptr))
        return originals["create_atomic_cas"](self, ptr, cmp, val, *args, **kwargs)

    wrappers = dict(create_masked_load=create_masked_load, create_masked_store=create_masked_store,
                    create_atomic_rmw=create_atomic_rmw, create_atomic_cas=create_atomic_cas)
    try:
        for name, fn in wrappers.items():
            setattr(builder, name, fn)
        yield
    finally:
        for name, fn in originals.items():
            setattr(builder, name, fn)


def _result_tensors(result) -> Dict[str, torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return {"out": result}
    if isinstance(result, (tuple, list)):
        return {f"out{i}": r for i, r in enumerate(result) if isinstance(r, torch.Tensor)}
    return {}


def count_traffic(fn, *args, tensors: Dict[str, torch.Tensor], **kwargs):
    """Run ``fn(*args, **kwargs)`` under the Triton interpreter, counting the bytes its kernels move.

    Returns ``(result, traffic)`` with ``traffic[name] == {"load": bytes, "store": bytes}`` for each
    entry of ``tensors`` (matched by address range: the tensor's whole storage), for the result
    (``"out"``, or ``"out0"``, ``"out1"``, ... for a tuple; matched after the call, since ops
    allocate their outputs), and ``"other"`` for bytes that hit none of them (temporaries such as
    an inverse permutation). A byte counts as ``mask.sum() * itemsize`` of each masked load/store.
    The interpreter's builder is restored on exit, also when ``fn`` raises.
    """
    counter = _Counter(tensors)
    with _wrapped_builder(counter):
        result = fn(*args, **kwargs)
    late = {k: v for k, v in _result_tensors(result).items() if k not in tensors}
    return result, counter.finish(late)


# --- the report: python -m fastsd.bench.triton_traffic -------------------------------------------------


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cases():
    """(op, case, setup, run, min_bytes): ``run(setup(), backend)`` is one call (forward + backward
    where the op is differentiable); setup makes fresh inputs, outside what is counted. Batches are
    cut to keep the interpreter quick: the ratios do not depend on the batch."""
    import fastsd
    from fastsd import reference as R
    from fastsd.icp import icp_update_, new_state
    from fastsd.reference import icp as ref_icp

    from .cases import PATCH_SWAP_BENCH

    def with_backend(backend, fn):
        if backend == "eager":
            return fn(eager=True)
        with fastsd.use_backend(backend):
            return fn(eager=False)

    out = []
    gen = torch.Generator().manual_seed(0)
    for case in PATCH_SWAP_BENCH:
        c = type(case)(case.name, (4,) + case.shape[1:], case.grid, case.channels_last, classes=2)
        x, partner, mask = c.make(torch.float32)
        g = torch.randn(x.shape, generator=gen)

        def run(xr, backend, partner=partner, mask=mask, g=g):
            op = R.patch_swap if backend == "eager" else fastsd.patch_swap
            with_backend(backend, lambda eager: op(xr, partner, mask).backward(g))

        # forward reads x and writes out; backward reads g and writes grad_x
        out.append(("patch_swap fwd+bwd", f"{case.name} (B=4)", lambda x=x: x.clone().requires_grad_(), run,
                    4 * _nbytes(x)))

    for B, K in ((256, 100), (256, 1000)):
        logits = torch.randn(B, K, generator=gen)
        labels = torch.randint(0, 8, (B,), generator=gen)
        partner = fastsd.intra_class_pairs(labels, generator=gen)

        def run(z, backend, labels=labels, partner=partner):
            op = R.pair_kd_loss if backend == "eager" else fastsd.pair_kd_loss
            with_backend(backend, lambda eager: op(z, labels, partner).backward())

        out.append(("pair_kd_loss fwd+bwd", f"{B}x{K}", lambda z=logits: z.clone().requires_grad_(), run,
                    2 * _nbytes(logits)))

    shapes = [(8, 64, 32, 32), (8, 128, 16, 16), (8, 256, 8, 8), (8, 512, 4, 4)]
    s = [torch.randn(sh, generator=gen) for sh in shapes]
    t = [torch.randn(sh, generator=gen) for sh in shapes]

    def run_features(ss, backend, t=t):
        op = R.feature_alignment_loss if backend == "eager" else fastsd.feature_alignment_loss
        with_backend(backend, lambda eager: op(ss, t).backward())

    out.append(("feature_alignment mse fwd+bwd", "CIFAR ResNet-18 maps, B=8",
                lambda: [a.clone().requires_grad_() for a in s], run_features, 3 * _nbytes(*s)))

    x = torch.randn(32, 3, 32, 32, generator=gen)
    g = torch.randn(x.shape, generator=gen)

    def run_update(state, backend, g=g):
        xc, m, v, m2 = state
        if backend == "eager":
            ref_icp.icp_update_(xc, g, m, v, m2, "adam", 1, 2e-3, 0.9, 0.999, 0.9999, 5.0, 1e-8, None, None)
        else:
            with fastsd.use_backend(backend):
                icp_update_(xc, g, m, v, m2, method="adam", step=1, step_size=2e-3)

    # reads x, g, m, v; writes x, m, v
    out.append(("icp_update adam", "32x3x32x32", lambda: (x.clone(),) + new_state(x, "adam"), run_update,
                7 * _nbytes(x)))
    return out


def report() -> List[dict]:
    """Counted bytes per op: the Triton kernels (interpreter) and eager PyTorch (dispatch count)."""
    from .traffic import count

    rows = []
    for op, case, setup, run, min_bytes in _cases():
        state = setup()
        _, traffic = count_traffic(lambda: run(state, "triton"), tensors={})
        triton_bytes = sum(v["load"] + v["store"] for v in traffic.values())
        state = setup()
        counted = count(lambda: run(state, "eager"))
        rows.append(dict(op=op, case=case, min_mb=min_bytes / 2**20, triton_mb=triton_bytes / 2**20,
                         eager_mb=counted.bytes_moved / 2**20, eager_kernels=counted.kernels))
    return rows


def format_rows(rows: List[dict]) -> str:
    """One section per op: per case, the minimum, Triton's and eager's counted MB and eager's kernels."""
    from .report import Col, render

    cols = [Col("", "case", "<"), Col("", "min MB"), Col("Triton", "MB"), Col("", "x min"), Col("eager", "MB"),
            Col("", "x min"), Col("", "kernels"), Col("eager /", "Triton")]
    sections = {}
    for r in rows:
        sections.setdefault(r["op"], []).append([
            r["case"], f"{r['min_mb']:.2f}", f"{r['triton_mb']:.2f}", f"{r['triton_mb'] / r['min_mb']:.2f}",
            f"{r['eager_mb']:.2f}", f"{r['eager_mb'] / r['min_mb']:.2f}", str(r["eager_kernels"]),
            f"{r['eager_mb'] / r['triton_mb']:.2f}"])
    return render(cols, [(f"{op}:", body) for op, body in sections.items()])


def main(argv=None) -> int:
    import argparse
    import json
    import os
    import sys

    p = argparse.ArgumentParser(prog="python -m fastsd.bench.triton_traffic", description=__doc__)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter must be on before triton and the kernels are imported: start again with it
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "fastsd.bench.triton_traffic"] + (argv or sys.argv[1:]), env=env)
    import warnings

    # masked-off lanes compute on placeholders (e.g. -inf - -inf) in numpy; harmless, and quiet on a GPU
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
    rows = report()
    print("bytes moved per call, counted (Triton: every load and store under the interpreter; eager: inputs and")
    print("outputs of every aten op dispatched); min = every input read once, every output written once")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
