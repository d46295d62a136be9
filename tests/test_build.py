"""Building fastsd._C (setup.py): CUDA architectures, the CPU-only fallback, and missing build tools.

The unit tests import setup.py's functions. The subprocess tests run the real setup.py on a copy of
csrc/ with cpp_extension's compile step replaced by a fake that records what it was asked to build
(and calls cpp_extension's own architecture choice, which is what raised IndexError with no GPU and
no TORCH_CUDA_ARCH_LIST), so they take seconds, not the minutes of a real build.
"""
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
from torch.utils import cpp_extension

from fastsd import _ext, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastsd_setup_under_test", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: setup() runs as a script
    return module


setup_py = _load_setup()


def _arch_flags(monkeypatch, arch_list):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    return cpp_extension._get_cuda_arch_flags()


# --- the default CUDA architectures -------------------------------------------------------------

def test_default_arches_cover_current_gpus_with_ptx_for_later_ones(monkeypatch):
    arches = setup_py.default_cuda_arch_list()
    assert arches == "7.5;8.0;9.0;10.0;12.0+PTX"
    flags = _arch_flags(monkeypatch, arches)  # this torch accepts the list
    for sm in ("75", "80", "90", "100", "120"):
        assert f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags
    assert "-gencode=arch=compute_120,code=compute_120" in flags  # PTX: GPUs newer than 12.x


def test_default_arches_keep_only_what_nvcc_and_torch_know():
    old_nvcc = {"5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"}  # CUDA 12.0 knows no 10.0 / 12.0
    assert setup_py.default_cuda_arch_list(old_nvcc) == "7.5;8.0;9.0+PTX"
    old_torch = lambda arch: arch not in ("10.0", "12.0")  # noqa: E731  (torch < 2.7)
    assert setup_py.default_cuda_arch_list(None, old_torch) == "7.5;8.0;9.0+PTX"
    assert setup_py.default_cuda_arch_list({"3.5"}) is None


@pytest.mark.skipif(setup_py.nvcc_arches(os.path.join(cpp_extension.CUDA_HOME or "/nonexistent", "bin", "nvcc"))
                    is None, reason="no nvcc to list its architectures")
def test_default_arches_with_this_nvcc_and_torch(monkeypatch):
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    arches = setup_py.default_cuda_arch_list(setup_py.nvcc_arches(nvcc), setup_py.torch_knows_arch)
    assert "8.0" in arches.split(";") and "9.0" in arches.replace("+PTX", "").split(";")
    assert arches.endswith("+PTX")
    _arch_flags(monkeypatch, arches)


def test_torch_knows_arch_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert setup_py.torch_knows_arch("9.0") and not setup_py.torch_knows_arch("1.0")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    setup_py.torch_knows_arch("9.0")
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_a_users_arch_list_and_a_visible_gpu_are_respected():
    value, why = setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}, gpu_visible=False)
    assert value is None and "8.6" in why
    value, why = setup_py.cuda_arch_list({}, gpu_visible=True)
    assert value is None and "visible GPU" in why
    value, why = setup_py.cuda_arch_list({}, gpu_visible=False)
    assert value == setup_py.default_cuda_arch_list() and "default" in why


# --- the CPU-only fallback ------------------------------------------------------------------------

def _recording_build(fail_cuda=False, fail_cpu=False):
    calls = []

    def build(cuda):
        calls.append(cuda)
        if (cuda and fail_cuda) or (not cuda and fail_cpu):
            raise RuntimeError(f"nvcc fell over ({'cuda' if cuda else 'cpu'})")

    return build, calls


def test_cuda_failure_retries_with_cpu_kernels_and_says_why():
    build, calls = _recording_build(fail_cuda=True)
    log = setup_py.build_with_fallback(build, True, "2.14.1", "8.0;9.0+PTX")
    assert calls == [True, False]
    first = log.splitlines()[0]
    assert first.startswith("fastsd._C built with torch 2.14.1 (CPU kernels only") and "CUDA kernels failed" in first
    assert "nvcc fell over (cuda)" in log and "8.0;9.0+PTX" in log


def test_build_outcomes_are_logged():
    build, calls = _recording_build()
    assert setup_py.build_with_fallback(build, True, "2.14.1", "x").startswith("fastsd._C built with torch 2.14.1 (CPU + CUDA")
    assert calls == [True]
    build, calls = _recording_build()
    assert setup_py.build_with_fallback(build, False, "2.14.1") == "fastsd._C built with torch 2.14.1 (CPU kernels only)"
    assert calls == [False]
    build, calls = _recording_build(fail_cuda=True, fail_cpu=True)
    log = setup_py.build_with_fallback(build, True, "2.14.1")
    assert calls == [True, False] and log.startswith("fastsd._C failed to build")
    assert "nvcc fell over (cpu)" in log and "nvcc fell over (cuda)" in log


def test_info_prints_why_cuda_kernels_are_missing(monkeypatch, capsys):
    log = ("fastsd._C built with torch 2.14.1 (CPU kernels only: the CUDA kernels failed to build; the cause "
           "is below)\nCUDA architectures: 8.0;9.0+PTX\n\nTraceback ...\nRuntimeError: nvcc fell over")
    monkeypatch.setattr(_ext, "load_error", lambda: None)
    monkeypatch.setattr(_ext, "has_cuda", lambda: False)
    monkeypatch.setattr(_ext, "build_log", lambda: log)
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "the CUDA kernels failed to build" in out and "RuntimeError: nvcc fell over" in out


# --- what a wheel build needs ---------------------------------------------------------------------

def test_wheel_build_without_bdist_wheel_says_what_to_install():
    missing = lambda name: False  # noqa: E731
    for command in ("bdist_wheel", "editable_wheel", "dist_info"):
        message = setup_py.wheel_build_problem(["setup.py", command, "--dist-dir", "x"], missing)
        assert "pip install 'setuptools>=70.1'" in message and "--no-build-isolation" in message
    assert setup_py.wheel_build_problem(["setup.py", "build_ext", "--inplace"], missing) is None
    assert setup_py.wheel_build_problem(["setup.py", "bdist_wheel"], lambda name: True) is None
    assert setup_py.setuptools_has_command("build_ext") and not setup_py.setuptools_has_command("no_such_cmd")


# --- the real setup.py, with a fake compiler --------------------------------------------------------

DRIVER = textwrap.dedent('''
    import json, os, runpy, sys
    from torch.utils import cpp_extension

    def build_extensions(self):  # instead of compiling: record, and choose architectures as the real one
        for ext in self.extensions:
            entry = {"sources": list(ext.sources), "cuda": any(s.endswith(".cu") for s in ext.sources)}
            with open(os.environ["FAKE_RECORD"], "a") as f:
                f.write(json.dumps(entry) + "\\n")
            if entry["cuda"]:
                entry["arch_flags"] = cpp_extension._get_cuda_arch_flags()
                if os.environ.get("FAKE_CUDA_FAIL"):
                    raise RuntimeError("fake nvcc failure")
            with open(os.environ["FAKE_RECORD"], "a") as f:
                f.write(json.dumps(dict(entry, built=True)) + "\\n")
            path = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()

    cpp_extension.BuildExtension.build_extensions = build_extensions
    if os.environ.get("FAKE_NO_BDIST_WHEEL"):  # setuptools < 70.1 without the wheel package
        from setuptools.dist import Distribution
        from setuptools.errors import ModuleError
        get = Distribution.get_command_class

        def get_command_class(self, command):
            if command == "bdist_wheel":
                raise ModuleError(f"invalid command {command!r}")
            return get(self, command)

        Distribution.get_command_class = get_command_class
    sys.argv = ["setup.py"] + sys.argv[1:]
    runpy.run_path("setup.py", run_name="__main__")
''')


def _run_setup(tmp_path, args, **env):
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    (tmp_path / "fastsd").mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    record = tmp_path / "record.jsonl"
    full_env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "FASTSD_BUILD_CUDA")}
    full_env.update(CUDA_VISIBLE_DEVICES="", FAKE_RECORD=str(record), **env)
    proc = subprocess.run([sys.executable, "driver.py", *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=600)
    entries = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    log_path = tmp_path / "fastsd" / "_build_log.txt"
    return proc, entries, log_path.read_text() if log_path.exists() else ""


@pytest.mark.skipif(cpp_extension.CUDA_HOME is None, reason="no CUDA toolkit: CUDAExtension cannot be made")
def test_cuda_build_with_no_gpu_and_no_arch_list_uses_the_default_arches(tmp_path):
    proc, entries, log = _run_setup(tmp_path, ["build_ext", "--inplace"], FASTSD_BUILD_CUDA="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = [e for e in entries if e.get("built")]
    assert len(built) == 1 and built[0]["cuda"], (entries, log)
    flags = built[0]["arch_flags"]
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert any(re.fullmatch(r"-gencode=arch=compute_(\d+),code=compute_\1", f) for f in flags), flags  # PTX
    assert log.startswith("fastsd._C built with torch") and "(CPU + CUDA kernels)" in log.splitlines()[0]
    assert list((tmp_path / "fastsd").glob("_C*.so"))


def test_cuda_build_failure_still_builds_the_cpu_kernels(tmp_path):
    proc, entries, log = _run_setup(tmp_path, ["build_ext", "--inplace"], FASTSD_BUILD_CUDA="1",
                                    FAKE_CUDA_FAIL="1", TORCH_CUDA_ARCH_LIST="8.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = [e for e in entries if e.get("built")]
    assert len(built) == 1 and not built[0]["cuda"], (entries, log)
    assert not any(s.startswith("csrc/cuda/") for s in built[0]["sources"])
    assert list((tmp_path / "fastsd").glob("_C*.so")), "the CPU-only build did not land in place"
    assert "CPU kernels only: the CUDA kernels failed to build" in log.splitlines()[0]
    assert "fake nvcc failure" in log or not cpp_extension.CUDA_HOME  # without a toolkit: CUDAExtension's error


def test_wheel_build_without_bdist_wheel_stops_with_instructions(tmp_path):
    proc, entries, _ = _run_setup(tmp_path, ["bdist_wheel"], FAKE_NO_BDIST_WHEEL="1")
    assert proc.returncode != 0 and not entries
    assert "pip install 'setuptools>=70.1'" in proc.stderr, proc.stderr[-3000:]


# --- compiler flags ---------------------------------------------------------------------------------


def test_cxx_flags_drop_debug_info_unless_asked():
    """Python's CFLAGS (first on the command line) carry -g: -g0 after them drops the debug info,
    which made each object 20-60x larger and its compile 2.5x slower; FASTSD_DEBUG_INFO=1 keeps it."""
    flags = setup_py.cxx_flags({}, "posix")
    assert flags[-1] == "-g0" and "-O3" in flags
    assert setup_py.cxx_flags({"FASTSD_DEBUG_INFO": "0"}, "posix") == flags
    assert "-g0" not in setup_py.cxx_flags({"FASTSD_DEBUG_INFO": "1"}, "posix")
    assert setup_py.cxx_flags({}, "nt") == ["/O2", "/openmp"]
    with pytest.raises(SystemExit, match="FASTSD_DEBUG_INFO must be 0 or 1"):
        setup_py.cxx_flags({"FASTSD_DEBUG_INFO": "yes"}, "posix")


# --- the source distribution ------------------------------------------------------------------------


def test_sdist_carries_every_source_the_extension_is_built_from(tmp_path):
    """setuptools puts only the extension's listed sources in an sdist: not the headers, the CUDA
    sources of a CUDA build, or what csrc/unity.cpp includes (MANIFEST.in adds csrc whole). Built
    from a copy of the tree: sdist makes its release folder in the current directory, where another
    test (pytest-xdist) would see it."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", ".benchmarks", ".hypothesis"))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                           "--dist-dir", str(tmp_path)], cwd=tree, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("fastsd-*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/csrc/" in name and not name.endswith("/")}
    sources = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
               for f in files if f.endswith((".cpp", ".h", ".cu", ".cuh"))}
    assert "csrc/cpu/alloc.h" in sources and sources <= shipped, sorted(sources - shipped)


def test_translation_units_of_the_tree():
    """csrc/unity.cpp and csrc/cuda/unity.cpp compile the small sources; losses.cpp, which includes
    itself, stays a unit; the included sources are the extension's depends (a rebuild when one changes)."""
    cpu = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # noqa: E731
    assert rel(setup_py.translation_units(cpu)) == ["csrc/unity.cpp", "csrc/cpu/losses.cpp", "csrc/cpu/mix.cpp",
                                                   "csrc/cpu/patch_swap.cpp"]
    assert rel(setup_py.translation_units(cuda)) == ["csrc/cuda/unity.cpp"]
    included = set(rel(setup_py.included_sources(cpu + cuda)))
    assert included | set(rel(setup_py.translation_units(cpu + cuda))) == set(rel(cpu + cuda))
    assert "csrc/cpu/alloc.cpp" in included and "csrc/cpu/losses.cpp" not in included
