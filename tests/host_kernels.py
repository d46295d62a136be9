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


def library(tmp_path_factory, harness: str) -> ctypes.CDLL:
    """tests/csrc/``harness`` compiled into a fresh folder and loaded (skips the calling test without a
    C++ compiler)."""
    if CXX is None:
        pytest.skip("no C++ compiler: CUDA kernel emulation skipped")
    source = os.path.join(ROOT, "tests", "csrc", harness)
    lib = str(tmp_path_factory.mktemp("cuda_emulation") / (os.path.splitext(harness)[0] + ".so"))
    cmd = [CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off", source, "-o", lib]
    cmd += [f"-I{d}" for d in cpp_extension.include_paths()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(lib)


def function(lib: ctypes.CDLL, symbol: str, argtypes, restype=ctypes.c_int):
    """The C function ``symbol`` of ``lib``, typed."""
    fn = getattr(lib, symbol)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn
