"""``python -m fastsd.info``: versions, the compiled extension, its CPU vector path, and per op which
backends can run.

``--short`` prints the extension status, the vector path and one line per op.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from . import _backend, _ext


def _versions():
    rows = [("python", platform.python_version()), ("torch", torch.__version__)]
    for mod in ("triton", "torchvision", "numpy"):
        try:
            rows.append((mod, __import__(mod).__version__))
        except Exception as exc:  # pragma: no cover - environment dependent
            rows.append((mod, f"not importable ({exc.__class__.__name__})"))
    rows.append(("torch CUDA", f"{torch.version.cuda} (available: {torch.cuda.is_available()})"))
    if torch.cuda.is_available():
        rows.append(("device", torch.cuda.get_device_name()))
    rows.append(("CPU threads", str(torch.get_num_threads())))
    rows.append(("FASTSD_BACKEND", os.environ.get("FASTSD_BACKEND", "auto")))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0")))
    return rows


def cpu_vector_path() -> str:
    """The instruction set fastsd's C++ CPU kernels run (avx512, avx2 or default) and what capped it.

    The widest one that the CPU, ATen's capability (ATEN_CPU_CAPABILITY, which lowers PyTorch's own
    kernels too) and FASTSD_CPU_CAPABILITY (fastsd's alone) allow; csrc/cpu/capability.h."""
    if _ext.load_error() is not None:
        return "n/a (fastsd._C not loaded)"
    caps = ", ".join(f"{v}={os.environ[v]}" for v in ("ATEN_CPU_CAPABILITY", "FASTSD_CPU_CAPABILITY")
                     if os.environ.get(v))
    try:
        in_use, cpu = torch.ops.fastsd_C.cpu_capability()
    except (RuntimeError, ValueError) as exc:
        return f"error: {str(exc).splitlines()[0]}"
    aten = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    return f"{in_use} (this CPU: {cpu}; PyTorch's: {aten.lower()}{'; ' + caps if caps else ''})"


def _probe_tensors(device):
    # Representative inputs: what a backend needs is decided by device (and for some ops dtype).
    return (torch.empty(0, device=device),)


def backend_table():
    """[(op, device, {backend: reasons})] for CPU and, when present, CUDA tensors."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = []
    for op in _backend.ops():
        for dev in devices:
            tensors = _probe_tensors(dev)
            table.append((op, dev, {b: _backend.reasons(op, b, *tensors) for b in _backend.BACKENDS}))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastsd.info", description=__doc__)
    parser.add_argument("--short", action="store_true", help="extension status and one line per op")
    args = parser.parse_args(argv)

    err = _ext.load_error()
    ext = "loaded" + (" (with CUDA kernels)" if _ext.has_cuda() else " (CPU kernels)") if err is None else err
    if not args.short:
        print("fastsd", __import__("fastsd").__version__)
        for name, value in _versions():
            print(f"  {name:<16} {value}")
    print(f"fastsd._C: {ext}")
    print(f"CPU vector path: {cpu_vector_path()}")
    log = _ext.build_log().splitlines()
    if log and not args.short and (err is not None or not _ext.has_cuda()):
        # why the extension, or its CUDA kernels, are missing: the outcome line and the error's end
        excerpt = log if len(log) <= 16 else log[:2] + ["..."] + log[-13:]
        print("  build log:\n    " + "\n    ".join(excerpt))
    print("backends per op (available ones marked +):")
    for op, dev, reasons in backend_table():
        avail = [b for b in _backend.preference(op) if not reasons[b]]
        print(f"  {op:<28} {dev:<5} available: {', '.join(avail) or 'none'}")
        if not args.short:
            for b in _backend.BACKENDS:
                if reasons[b]:
                    print(f"      - {b}: " + "; ".join(reasons[b]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
