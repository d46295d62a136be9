"""``python -m fastsd.bench.overhead``: how much of a public call is the C++ kernel, and how much the
Python layer around it, at the 32 px cases whose targets are against ``x.clone()``.

Per case three callables take turns in the bench's own rounds (:func:`fastsd.bench.core.interleave`,
one torch thread, CPU clock, 20 ms samples of back-to-back calls): ``x.clone()``, the C++ op alone
(``fastsd._ext.ops()``, no validation, no backend choice, no autograd or eager glue) and the public
call under ``use_backend("cpp")``, as the bench times it. It prints each median, each one's
clone/time ratio with its bootstrap 95 % interval (the targets: patch swap >= 0.67, mix's op out of
place >= 0.77), and the Python layer: the public call's median less the kernel's.

The cases are the bench's own: ``PATCH_SWAP_BENCH[0]`` (256x3x32x32, 8x8 grid) and mix's
``256x3x32x32 op out of place`` (timm 'elem' switch draws, flip partner).

Then the drop-ins' host time (:func:`measure_drop_ins`): on a GPU a drop-in call is host-bound (the
H100 runs in docs/gpu: 0.4-0.7 ms of host work a call, against 26-79 us of kernel), and that is where
it lost to timm's 'batch' mode and torchvision's one-box CutMix/MixUp. On a batch of 8x3x8x8 with 10
classes the CPU's pixels cost nothing either, so the same rounds give the Python and ATen host work
of each drop-in against its library's (timm's and torchvision's own calls, draws and targets
included; timm's mix their input in place, as fastsd's Mixup does): the library's time over
fastsd's, >= 1 where fastsd's call costs the host less.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import _backend, _ext
from . import core
from .cases import PATCH_SWAP_BENCH


def _cases(shape: Tuple[int, int, int, int]) -> List[Tuple[str, Callable[[], Dict[str, Callable[[], object]]]]]:
    """(name, make) per case; make() builds the inputs and returns the three callables."""
    swap_case = dataclasses.replace(PATCH_SWAP_BENCH[0], shape=shape)  # the bench's grid and classes

    def patch_swap():
        import fastsd

        x, partner, mask = swap_case.make()
        kernel = _ext.ops().patch_swap

        def public():
            with _backend.use_backend("cpp"):
                return fastsd.patch_swap(x, partner, mask)

        return {"clone": lambda: x.clone(), "kernel": lambda: kernel(x, partner, mask), "public": public}

    def mix():
        from ..mix.op import mix_unchecked
        from .mix import _op_cases

        case = next(c for c in _op_cases("op", shape, torch.float32, "cpu", 1) if c.case.endswith("out of place"))
        inputs = case.setup()
        kernel = _ext.ops().mix

        def public():
            with _backend.use_backend("cpp"):
                return mix_unchecked(*inputs)

        return {"clone": lambda: inputs[0].clone(), "kernel": lambda: kernel(*inputs), "public": public}

    size = "x".join(map(str, shape))
    gh, gw = swap_case.grid
    return [(f"patch_swap {size} grid {gh}x{gw}", patch_swap), (f"mix {size} op out of place", mix)]


def measure(shape=(256, 3, 32, 32), min_time: float = 0.25, min_sample: float = 0.02) -> List[dict]:
    """One row per case: medians (ms), clone/time ratios with their intervals, the Python layer (us)."""
    rows = []
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench on the CPU: one thread, on the process's CPU time
    try:
        for name, make in _cases(shape):
            fns = make()
            if not torch.equal(fns["kernel"](), fns["public"]()):  # the same work, or the difference means nothing
                raise RuntimeError(f"{name}: the C++ op and the public call disagree")
            times = core.interleave(fns, torch.device("cpu"), min_time=min_time, min_sample=min_sample,
                                    clock="cpu")
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "case": name, "rounds": len(times["clone"]),
                "ms": {k: v * 1e3 for k, v in med.items()},
                "clone_over": {k: core.paired_ratio(times["clone"], times[k]) for k in ("kernel", "public")},
                "python_us": (med["public"] - med["kernel"]) * 1e6,
            })
    finally:
        torch.set_num_threads(saved)
    return rows


def _drop_in_cases(shape: Tuple[int, int, int, int], num_classes: int):
    """(name, make) per drop-in case whose library is installed; make() returns {"library", "fastsd"}."""
    import importlib

    from .. import mix as fm

    def installed(name):
        # a library that is missing, or installed but broken, leaves its rows out (and says so)
        try:
            return importlib.import_module(name)
        except ImportError:
            return None
        except Exception as e:  # noqa: BLE001 - e.g. a torchvision built for another torch
            print(f"fastsd.bench.overhead: {name} does not import ({type(e).__name__}: {e}); its rows are left out")
            return None

    def inputs():
        g = torch.Generator().manual_seed(0)
        return torch.rand(shape, generator=g), torch.randint(0, num_classes, (shape[0],), generator=g)

    cases = []
    tm, tv = installed("timm.data.mixup"), installed("torchvision.transforms.v2")
    if tm is not None:
        for mode in ("batch", "elem"):
            kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=num_classes)

            def make(kw=kw):
                (x, y), (x2, _) = inputs(), inputs()  # each mixes its own batch in place
                lib, ours = tm.Mixup(**kw), fm.Mixup(**kw)
                return {"library": lambda: lib(x, y), "fastsd": lambda: ours(x2, y)}
            cases.append((f"timm Mixup {mode} switch", make))
    if tv is not None:
        for name in ("CutMix", "MixUp"):
            def make(name=name):
                x, y = inputs()
                lib, ours = getattr(tv, name)(num_classes=num_classes), getattr(fm, name)(num_classes=num_classes)
                return {"library": lambda: lib(x, y), "fastsd": lambda: ours(x, y)}
            cases.append((f"torchvision {name}", make))
    return cases


def measure_drop_ins(shape=(8, 3, 8, 8), num_classes: int = 10, min_time: float = 0.25,
                     min_sample: float = 0.02) -> List[dict]:
    """One row per drop-in: medians (us) of the library's call and fastsd's, taking turns in the
    bench's rounds (one torch thread, CPU clock), and the library's time over fastsd's with its
    bootstrap 95 % interval. The global RNGs the drop-ins draw from (torch's and numpy's) are left as
    they were."""
    import numpy as np

    rows = []
    saved = torch.get_num_threads()
    rng_states = torch.get_rng_state(), np.random.get_state()
    torch.set_num_threads(1)
    try:
        for name, make in _drop_in_cases(shape, num_classes):
            times = core.interleave(make(), torch.device("cpu"), min_time=min_time, min_sample=min_sample, clock="cpu")
            rows.append({"case": name, "shape": tuple(shape), "rounds": len(times["fastsd"]),
                         "us": {k: statistics.median(v) * 1e6 for k, v in times.items()},
                         "library_over_fastsd": core.paired_ratio(times["library"], times["fastsd"])})
    finally:
        torch.set_num_threads(saved)
        torch.set_rng_state(rng_states[0])
        np.random.set_state(rng_states[1])
    return rows


def format_drop_in_rows(rows: List[dict]) -> str:
    lines = ["drop-in (host time) | shape | rounds | library us | fastsd us | library/fastsd"]
    for r in rows:
        m, lo, hi = r["library_over_fastsd"]
        lines.append(f"{r['case']} | {'x'.join(map(str, r['shape']))} | {r['rounds']} | {r['us']['library']:.1f} | "
                     f"{r['us']['fastsd']:.1f} | {m:.2f} ({lo:.2f}-{hi:.2f})")
    return "\n".join(lines)


def format_rows(rows: List[dict]) -> str:
    lines = ["case | rounds | clone ms | kernel ms | public ms | clone/kernel | clone/public | Python layer us"]
    for r in rows:
        k, p = r["clone_over"]["kernel"], r["clone_over"]["public"]
        lines.append(f"{r['case']} | {r['rounds']} | {r['ms']['clone']:.4f} | {r['ms']['kernel']:.4f} | "
                     f"{r['ms']['public']:.4f} | {k[0]:.2f} ({k[1]:.2f}-{k[2]:.2f}) | "
                     f"{p[0]:.2f} ({p[1]:.2f}-{p[2]:.2f}) | {r['python_us']:.0f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsd.bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds of timed calls per callable, at least")
    args = parser.parse_args(argv)
    err = _ext.load_error()
    if err:
        print(f"fastsd.bench.overhead: the C++ extension is not available ({err})")
        return 1
    print(format_rows(measure(min_time=args.min_time)))
    print()
    print(format_drop_in_rows(measure_drop_ins(min_time=args.min_time)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
