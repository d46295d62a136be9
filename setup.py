"""Build script: the Python package plus the optional C++/CUDA extension ``fastsd._C``.

``fastsd._C`` is built from csrc/ with torch.utils.cpp_extension and ninja:

* the CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) always, the small sources through csrc/unity.cpp
  (:func:`translation_units`);
* the CUDA kernels (csrc/cuda/*.cu, *.cpp) when ``FASTSD_BUILD_CUDA=1``, or when a GPU is present
  (``FASTSD_BUILD_CUDA=0`` turns them off). With no ``TORCH_CUDA_ARCH_LIST`` and no GPU to take the
  architectures from, they are built for :data:`DEFAULT_CUDA_ARCHS` (those this nvcc and torch know).

The extension is optional: when torch is missing at build time, or the compiler fails, the
package still installs and the pure-PyTorch (and Triton) paths work. When the CUDA kernels fail to
build, the same extension is built again with the CPU kernels only. Every outcome (and why CUDA
kernels are missing) is written to ``fastsd/_build_log.txt``, which ``python -m fastsd.info`` prints.

The functions above ``main()`` are imported by tests/test_build.py; setup() runs only as a script.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_LOG = os.path.join(ROOT, "fastsd", "_build_log.txt")

# Built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: one cubin per GPU family in use
# (a cubin also runs on later minor versions of its major: 8.0 on 8.6 / 8.9, 10.0 on 10.3, 12.0 on
# 12.1), and PTX of the newest for GPUs after it (compiled by the driver on first use). Each entry
# is kept only where this nvcc and this torch know it (nvcc 13 dropped everything before 7.5;
# 10.0 and 12.0 need CUDA 12.8 and torch 2.7).
DEFAULT_CUDA_ARCHS = ("7.5", "8.0", "9.0", "10.0", "12.0")

# What `pip install` needs to make a wheel, and what to do when a user's environment lacks it.
WHEEL_COMMANDS = ("bdist_wheel", "editable_wheel", "dist_info")
WHEEL_HELP = (
    "fastsd: building a wheel needs setuptools' `bdist_wheel` command, and this environment has none "
    "(setuptools {setuptools} is older than 70.1 and the `wheel` package is not installed).\n"
    "With --no-build-isolation pip uses the environment's own build tools; install them first:\n"
    "    pip install 'setuptools>=70.1' ninja\n"
    "    pip install --no-build-isolation .\n"
    "(or drop --no-build-isolation: pip then builds against a second copy of torch; see the README)."
)


def write_log(text):
    with open(BUILD_LOG, "w") as f:
        f.write(text.rstrip() + "\n")


def packages():
    return {
        "packages": ["fastsd", "fastsd.reference", "fastsd.bench", "fastsd.kernels"],
        # Triton kernels live in kernels/ and install as fastsd.kernels (no top-level import).
        "package_dir": {"fastsd.kernels": "kernels"},
    }


def wheel_build_problem(argv, command_available):
    """The message to stop with when argv builds a wheel and no `bdist_wheel` command exists, else None.

    pip's build backend runs ``setup.py bdist_wheel`` (``editable_wheel`` for ``-e``, ``dist_info`` for
    the metadata, which also needs it before setuptools 70.1); without the command it fails with
    "invalid command 'bdist_wheel'", which does not say what to install.
    """
    if not any(cmd in argv[1:] for cmd in WHEEL_COMMANDS) or command_available("bdist_wheel"):
        return None
    try:
        import setuptools

        version = setuptools.__version__
    except Exception:  # pragma: no cover - setup.py runs under setuptools
        version = "?"
    return WHEEL_HELP.format(setuptools=version)


def setuptools_has_command(name):
    from setuptools.dist import Distribution

    try:
        Distribution().get_command_class(name)
        return True
    except Exception:  # DistutilsModuleError: "invalid command"
        return False


def cxx_flags(environ, os_name):
    """The C++ compiler's flags for fastsd._C (after the ones setuptools takes from Python's build).

    Python's own CFLAGS, which come first, carry ``-g`` on most Linux builds: debug info for
    torch's templates made each object 20 to 60 times larger and its compile 2.5 times slower (here,
    csrc/cpu/scale_grad.cpp: 50 s of CPU with it, 18 s without). ``-g0`` after them drops it;
    ``FASTSD_DEBUG_INFO=1`` keeps it (a debugger or a profiler reading line numbers; ``build_ext
    --debug`` alone does not, its ``-g`` comes before this one)."""
    flag = environ.get("FASTSD_DEBUG_INFO", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FASTSD_DEBUG_INFO must be 0 or 1, got {flag!r}")
    if os_name == "nt":
        return ["/O2", "/openmp"]
    return ["-O3", "-fopenmp", "-fno-strict-aliasing"] + ([] if flag == "1" else ["-g0"])


def nvcc_arches(nvcc):
    """The virtual architectures ("8.0", ...) that `nvcc --list-gpu-arch` names; None if it cannot say."""
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)", out)}
    return found or None


def torch_knows_arch(arch):
    """Whether this torch's cpp_extension accepts `arch` in TORCH_CUDA_ARCH_LIST (newer ones know more)."""
    from torch.utils import cpp_extension

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        cpp_extension._get_cuda_arch_flags()
        return True
    except ValueError:  # "Unknown CUDA arch"
        return False
    except Exception:  # a private function: if it changed, let the build itself decide
        return True
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def default_cuda_arch_list(nvcc_known=None, torch_knows=lambda arch: True):
    """DEFAULT_CUDA_ARCHS that nvcc (a set, None = unknown) and torch know, the newest with +PTX."""
    arches = [a for a in DEFAULT_CUDA_ARCHS if (nvcc_known is None or a in nvcc_known) and torch_knows(a)]
    if not arches:
        return None
    return ";".join(arches[:-1] + [arches[-1] + "+PTX"])


def cuda_arch_list(environ, gpu_visible, nvcc_known=None, torch_knows=lambda arch: True):
    """(TORCH_CUDA_ARCH_LIST to set or None to leave as is, why) for a CUDA build.

    A user's list is kept. With a GPU visible cpp_extension builds for it. With neither, it fails
    with an IndexError (an empty list of visible GPUs), so the default list is set instead.
    """
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return None, f"TORCH_CUDA_ARCH_LIST={environ['TORCH_CUDA_ARCH_LIST']} (set by you)"
    if gpu_visible:
        return None, "the visible GPUs' architectures (set TORCH_CUDA_ARCH_LIST to build for others)"
    arches = default_cuda_arch_list(nvcc_known, torch_knows)
    if arches is None:
        return None, f"no GPU visible and nvcc knows none of {', '.join(DEFAULT_CUDA_ARCHS)}"
    return arches, f"{arches} (the default with no GPU visible; set TORCH_CUDA_ARCH_LIST to choose)"


_INCLUDED_SOURCE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+\.(?:cpp|cu))"', re.M)


def included_sources(sources):
    """The sources that another of ``sources`` #includes (normalised paths). A source that includes
    itself (csrc/cpu/losses.cpp, once an instruction set) is not among them."""
    included = set()
    for source in sources:
        with open(source) as f:
            text = f.read()
        for name in _INCLUDED_SOURCE.findall(text):
            path = os.path.normpath(os.path.join(os.path.dirname(source), name))
            if path != os.path.normpath(source):
                included.add(path)
    return included


def translation_units(sources):
    """``sources`` less :func:`included_sources`, which the compiler meets through the source that
    includes them: csrc/unity.cpp (csrc/cuda/unity.cpp) compiles the small sources as one translation
    unit, whose compile time is torch's headers, read once instead of once a file. The extension lists
    the included ones as ``depends``, so that editing one alone rebuilds it."""
    included = included_sources(sources)
    return [s for s in sources if os.path.normpath(s) not in included]


def build_with_fallback(build, with_cuda, torch_version, arch_note=""):
    """Build the extension, with CUDA kernels first when asked; on failure, again with CPU kernels only.

    `build(cuda)` builds (raises on failure). Returns the log text: its first line is the outcome
    (fastsd._ext shows it), then the CUDA architectures and, after a failure, its traceback.
    """
    cuda_error = ""
    if with_cuda:
        try:
            build(True)
            return f"fastsd._C built with torch {torch_version} (CPU + CUDA kernels)\nCUDA architectures: {arch_note}"
        except Exception:
            cuda_error = traceback.format_exc()
            print("WARNING: fastsd._C: the CUDA kernels failed to build; building the CPU kernels only "
                  "(see fastsd/_build_log.txt)", flush=True)
    try:
        build(False)
    except Exception:
        log = "fastsd._C failed to build; the torch/triton backends still work.\n" + traceback.format_exc()
        if cuda_error:
            log += "\nThe CUDA build had failed first:\n" + cuda_error
        print("WARNING: fastsd._C failed to build; see fastsd/_build_log.txt", flush=True)
        return log
    if cuda_error:
        return (f"fastsd._C built with torch {torch_version} (CPU kernels only: the CUDA kernels failed to "
                f"build; the cause is below)\nCUDA architectures: {arch_note}\n\n{cuda_error}")
    return f"fastsd._C built with torch {torch_version} (CPU kernels only)"


def extension():
    """Return (ext_modules, cmdclass); empty when the extension cannot be built here."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch is not importable at build time
        write_log(f"fastsd._C was not built: torch is not importable at build time ({exc!r})")
        return [], {}

    flag = os.environ.get("FASTSD_BUILD_CUDA", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FASTSD_BUILD_CUDA must be 0 or 1, got {flag!r}")
    gpu_visible = torch.cuda.is_available()
    with_cuda = flag == "1" or (flag == "" and gpu_visible and CUDA_HOME is not None)

    all_cpu = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    all_cuda = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    cpu_sources, cuda_sources = translation_units(all_cpu), translation_units(all_cuda)
    # No -std flag: cpp_extension picks the C++ standard this torch needs (C++17 or C++20).
    cxx = cxx_flags(os.environ, os.name)

    def make(cuda):
        # CUDAExtension itself fails (OSError) without a CUDA toolkit, so it is made at build time
        kwargs = dict(
            name="fastsd._C",
            sources=cpu_sources + (cuda_sources if cuda else []),
            depends=sorted(included_sources(all_cpu + (all_cuda if cuda else []))),
            extra_compile_args={"cxx": cxx, **({"nvcc": ["-O3"]} if cuda else {})},
            extra_link_args=["-fopenmp"] if os.name != "nt" else [],
            define_macros=[("FASTSD_WITH_CUDA", "1")] if cuda else [],
            py_limited_api=True,
        )
        return CUDAExtension(**kwargs) if cuda else CppExtension(**kwargs)

    arch_note = ""
    if with_cuda:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
        value, arch_note = cuda_arch_list(os.environ, gpu_visible, nvcc_arches(nvcc), torch_knows_arch)
        if value is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = value  # read by cpp_extension at compile time

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, but never fail the install because of it; log the outcome."""

        def run(self):
            options = {"compiler": self.compiler, "inplace": self.inplace}

            def build(cuda):
                # a failed run leaves its compiler object and inplace=0 (setuptools' own) behind
                self.__dict__.update(options)
                # the extension setuptools finalised (it keeps private state on it) takes the fresh
                # one's public settings: sources, flags, include and library paths
                fresh = vars(make(cuda))
                for ext in self.extensions:
                    ext.__dict__.update({k: v for k, v in fresh.items() if not k.startswith("_")})
                BuildExtension.run(self)

            write_log(build_with_fallback(build, with_cuda, torch.__version__, arch_note))
            # build_py ran before us: put the log beside the package in the wheel too
            if not self.inplace:
                os.makedirs(os.path.join(self.build_lib, "fastsd"), exist_ok=True)
                self.copy_file(BUILD_LOG, os.path.join(self.build_lib, "fastsd", "_build_log.txt"))

    # setuptools needs the extension up front (a platform wheel, build_ext runs); run() sets what it builds
    return [make(False)], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


def main():
    problem = wheel_build_problem(sys.argv, setuptools_has_command)
    if problem:
        raise SystemExit(problem)
    from setuptools import setup

    ext_modules, cmdclass = extension()
    setup(
        **packages(),
        package_data={"fastsd": ["_build_log.txt"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    )


if __name__ == "__main__":
    main()
