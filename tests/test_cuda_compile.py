"""csrc's CUDA kernels compile for sm_80 and sm_90 (compile only: there is no GPU here).

Skipped, with the reason printed by `pytest -ra`, when nvcc is not found. On a machine with a GPU,
`FASTSD_BUILD_CUDA=1 pip install --no-build-isolation -e .` builds and links the same sources.
"""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _includes():
    dirs = cpp_extension.include_paths()
    # CUDAContext.h and friends need the CUDA runtime headers that ship as wheels beside torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include")) + glob.glob(os.path.join(site, "nvidia", "*", "include"))
    dirs.append(sysconfig.get_paths()["include"])
    return dirs


def _std_flag():
    # the C++ standard this torch's headers need (2.10+ moved to C++20)
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: csrc/cuda compile check skipped")
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm80_sm90(source, tmp_path):
    cmd = [_nvcc(), "-c", source, "-o", str(tmp_path / "out.o"), _std_flag(), "-O3",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-DFASTSD_WITH_CUDA=1", "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI),
           "-Xcompiler", "-fPIC"] + list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    cmd += [f"-I{d}" for d in _includes()]  # the flags cpp_extension itself passes, as in the real build
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed for {os.path.basename(source)}:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda has no .cu files"
