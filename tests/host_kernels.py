"""Builds a CUDA kernel's host harness (tests/csrc/*_host.cpp: the kernel body of csrc/cuda/*.cuh
compiled for the CPU, every thread of a launch run in order) as a shared library, for ctypes.

-ffp-contract=off: the GPU kernels round each product and sum on its own (_rn intrinsics), so the host
build must not fuse them into an FMA either."""
import ctypes
import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def build(tmp_path_factory, harness: str, symbol: str, argtypes):
    """The function ``symbol`` of tests/csrc/``harness``, compiled into a fresh folder (skips the
    calling test without a C++ compiler)."""
    if CXX is None:
        pytest.skip("no C++ compiler: CUDA kernel emulation skipped")
    source = os.path.join(ROOT, "tests", "csrc", harness)
    lib = str(tmp_path_factory.mktemp("cuda_emulation") / (os.path.splitext(harness)[0] + ".so"))
    cmd = [CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off", source, "-o", lib]
    cmd += [f"-I{d}" for d in cpp_extension.include_paths()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fn = getattr(ctypes.CDLL(lib), symbol)
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes
    return fn
