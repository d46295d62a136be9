"""Build script: the Python package plus the optional C++/CUDA extension ``fastsd._C``.

``fastsd._C`` is built from csrc/ with torch.utils.cpp_extension and ninja:

* the CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) always;
* the CUDA kernels (csrc/cuda/*.cu) when ``FASTSD_BUILD_CUDA=1``, or when a GPU is present
  (``FASTSD_BUILD_CUDA=0`` turns them off).

The extension is optional: when torch is missing at build time, or the compiler fails, the
package still installs, the pure-PyTorch (and Triton) paths work, and the reason is written to
``fastsd/_build_log.txt`` for ``python -m fastsd.info`` to print.
"""
import glob
import os
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_LOG = os.path.join(ROOT, "fastsd", "_build_log.txt")


def _write_log(text):
    with open(BUILD_LOG, "w") as f:
        f.write(text.rstrip() + "\n")


def _packages():
    return {
        "packages": ["fastsd", "fastsd.reference", "fastsd.bench", "fastsd.kernels"],
        # Triton kernels live in kernels/ and install as fastsd.kernels (no top-level import).
        "package_dir": {"fastsd.kernels": "kernels"},
    }


def _extension():
    """Return (ext_modules, cmdclass); empty when the extension cannot be built here."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch is not importable at build time
        _write_log(f"fastsd._C was not built: torch is not importable at build time ({exc!r})")
        return [], {}

    flag = os.environ.get("FASTSD_BUILD_CUDA", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FASTSD_BUILD_CUDA must be 0 or 1, got {flag!r}")
    with_cuda = flag == "1" or (flag == "" and torch.cuda.is_available() and CUDA_HOME is not None)

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: cpp_extension picks the C++ standard this torch needs (C++17 or C++20).
    cxx = ["-O3", "-fopenmp", "-fno-strict-aliasing"] if os.name != "nt" else ["/O2", "/openmp"]
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3"]
        define_macros.append(("FASTSD_WITH_CUDA", "1"))
        ext_cls = CUDAExtension

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, but never fail the install because of it; log the outcome."""

        def run(self):
            try:
                super().run()
                _write_log(f"fastsd._C built with torch {torch.__version__}"
                           f" ({'CPU + CUDA' if with_cuda else 'CPU only'} kernels)")
            except Exception:
                _write_log("fastsd._C failed to build; the torch/triton backends still work.\n"
                           + traceback.format_exc())
                print("WARNING: fastsd._C failed to build; see fastsd/_build_log.txt", flush=True)
            # build_py ran before us: put the log beside the package in the wheel too
            if not self.inplace:
                os.makedirs(os.path.join(self.build_lib, "fastsd"), exist_ok=True)
                self.copy_file(BUILD_LOG, os.path.join(self.build_lib, "fastsd", "_build_log.txt"))

    ext = ext_cls(
        name="fastsd._C",
        sources=sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if os.name != "nt" else [],
        define_macros=define_macros,
        py_limited_api=True,
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()
setup(
    **_packages(),
    package_data={"fastsd": ["_build_log.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
