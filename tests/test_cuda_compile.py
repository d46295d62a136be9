"""csrc's CUDA code compiles for sm_80 and sm_90, and the compiled patch swap and mix kernels keep their shape.

Compile only (there is no GPU here). One nvcc run per .cu file (sm_80 + sm_90, shared by every test
below through a module fixture) and the SASS that cuobjdump reads back from its object check what a
memory-bound kernel must look like on an H100 (issue 12):

* no integer division anywhere in a kernel: no `MUFU.RCP` / `I2F.*.RP` (the 32-bit division
  sequence) and no `CALL.REL` (the 64-bit division subroutine);
* the 16-byte patch swap and mix kernels move data only with `LDG.E.128` / `STG.E.128`, and the
  patch swap copy loop issues few instructions per 16 bytes (an H100 has about 160 issue slots per
  16 bytes a thread moves at full bandwidth);
* the mix kernels issue no fused multiply-add (MixUp rounds each product before the sum, as eager
  PyTorch does), and their uint8 lanes take no I2F / F2I (quarter rate: float adds instead);
* no kernel spills, and none needs more than 128 registers (occupancy of a quarter or more).

csrc/cuda/*.cpp (the torch-facing launchers, host code) is compiled with the host compiler, and every
fastsd function they call must be defined by a kernel object (what linking the extension would check). Skipped,
with the reason printed by `pytest -ra`, when nvcc, cuobjdump or a C++ compiler is not found. On a
machine with a GPU, `FASTSD_BUILD_CUDA=1 pip install --no-build-isolation -e .` builds and links the
same sources.
"""
import collections
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

from test_build import setup_py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# The launchers' translation units as the build compiles them (setup.py: csrc/cuda/unity.cpp includes them)
HOST_SOURCES = setup_py.translation_units(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))))
PATCH_SWAP = os.path.join(ROOT, "csrc", "cuda", "patch_swap.cu")
MIX = os.path.join(ROOT, "csrc", "cuda", "mix.cu")
# The copy loop's budget: instructions per 16 bytes moved (today about 12, of ~160 issue slots).
MAX_COPY_LOOP_INSTRUCTIONS_PER_16_BYTES = 20


def _cuda_home():
    """The first of $CUDA_HOME, torch's guess, nvcc's folder and /usr/local/cuda that holds the
    toolkit's headers (torch guesses /usr/local where nvcc is /usr/local/bin/nvcc, whose include/
    lacks the crt/ headers cuda_runtime.h needs)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME,
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "include", "crt", "host_config.h")):
            return home
    return next(filter(None, candidates))


def _nvcc():
    path = os.path.join(_cuda_home(), "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _cuobjdump():
    """From the CUDA toolkit, or the copy inside the triton wheel."""
    candidates = [os.path.join(_cuda_home(), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _includes():
    dirs = cpp_extension.include_paths()
    # CUDAContext.h and friends need the CUDA runtime headers that ship as wheels beside torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include")) + glob.glob(os.path.join(site, "nvidia", "*", "include"))
    dirs.append(os.path.join(_cuda_home(), "include"))
    dirs.append(sysconfig.get_paths()["include"])
    return dirs


def _std_flag():
    # the C++ standard this torch's headers need (2.10+ moved to C++20)
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


def _defines():
    return ["-DFASTSD_WITH_CUDA=1", "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI)]


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: csrc/cuda compile check skipped")


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """{source: (returncode, stderr, object path)}: each .cu compiled once, for sm_80 and sm_90."""
    out = {}
    folder = tmp_path_factory.mktemp("cuda_objects")
    for source in SOURCES:
        obj = folder / (os.path.basename(source) + ".o")
        cmd = [_nvcc(), "-c", source, "-o", str(obj), _std_flag(), "-O3",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-Xcompiler", "-fPIC"] + _defines() + list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
        cmd += [f"-I{d}" for d in _includes()]  # the flags cpp_extension itself passes, as in the real build
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        out[source] = (proc.returncode, proc.stderr, obj)
    return out


def _object(objects, source):
    rc, stderr, obj = objects[source]
    assert rc == 0, f"nvcc failed for {os.path.basename(source)}:\n{stderr[-4000:]}"
    return obj


def _tool(objects, source, *args):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel)")
    proc = subprocess.run([tool, *args, str(_object(objects, source))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_sass(text):
    """{kernel: [(address, instruction)]} from `cuobjdump -sass` output."""
    kernels, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2)))
    return kernels


def opcode(instruction):
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", instruction).split()[0]


def _loop_spans(instructions):
    """[(first, last)] indices of every backward branch's body (a loop)."""
    index = {address: k for k, (address, _) in enumerate(instructions)}
    spans = []
    for k, (address, ins) in enumerate(instructions):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) <= address and int(m.group(1), 16) in index:
            spans.append((index[int(m.group(1), 16)], k))
    return spans


def loops(instructions):
    """[(instructions in the body, opcodes)] of every backward branch (a loop)."""
    return [[opcode(i) for _, i in instructions[a:b + 1]] for a, b in _loop_spans(instructions)]


# mangled template arguments -> dtype names
ELEMENT_TYPES = {"h": "uint8", "f": "float32", "d": "float64", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}


def kernel_kind(name):
    """(element type, vector width V, backward) of a cell_select_kernel<T, V, kBackward>."""
    m = re.search(r"cell_select_kernelI(.+?)Li(\d+)ELb([01])E", name)
    assert m, f"not a cell_select_kernel<T, V, kBackward>: {name}"
    return ELEMENT_TYPES.get(m.group(1), m.group(1)), int(m.group(2)), m.group(3) == "1"


def mix_kernel_kind(name):
    """(element type, vector width V, direction) of a mix_kernel<T, V> ("forward"),
    mix_inplace_kernel<T, V> ("inplace") or mix_backward_kernel<T, V> ("backward")."""
    m = re.search(r"mix_(inplace_|backward_|)kernelI(.+?)Li(\d+)EEEv", name)
    assert m, f"not a mix kernel: {name}"
    return ELEMENT_TYPES.get(m.group(2), m.group(2)), int(m.group(3)), m.group(1).rstrip("_") or "forward"


@pytest.fixture(scope="module")
def mix_sass_all(objects):
    return parse_sass(_tool(objects, MIX, "-sass", "-arch", "sm_90"))


@pytest.fixture(scope="module")
def mix_sass(mix_sass_all):
    """The element kernels (not the value-check kernel, one batch row a thread)."""
    return {name: ins for name, ins in mix_sass_all.items() if not _is_check_kernel(name)}


@pytest.fixture(scope="module")
def patch_swap_sass_all(objects):
    return parse_sass(_tool(objects, PATCH_SWAP, "-sass", "-arch", "sm_90"))


@pytest.fixture(scope="module")
def patch_swap_sass(patch_swap_sass_all):
    """The element kernels (not the value-check kernel, one batch row a thread)."""
    return {name: ins for name, ins in patch_swap_sass_all.items() if not _is_check_kernel(name)}


def _is_check_kernel(name):
    return "mix_check_kernel" in name or "permutation_check_kernel" in name


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm80_sm90(objects, source):
    assert _object(objects, source).stat().st_size > 0


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda has no .cu files"
    assert PATCH_SWAP in SOURCES and MIX in SOURCES


@needs_nvcc
def test_patch_swap_kernels_are_all_there(patch_swap_sass):
    kinds = {kernel_kind(name) for name in patch_swap_sass}  # one per dtype, vector width and direction
    expected = {(t, v, bwd) for t, size in [("uint8", 1), ("float16", 2), ("bfloat16", 2), ("float32", 4),
                                            ("float64", 8)] for v in (1, 16 // size) for bwd in (False, True)}
    assert kinds == expected


@needs_nvcc
def test_mix_kernels_are_all_there(mix_sass):
    kinds = {mix_kernel_kind(name) for name in mix_sass}  # one per dtype, vector width and direction
    expected = {(t, v, direction) for t, size in [("uint8", 1), ("float16", 2), ("bfloat16", 2), ("float32", 4),
                                                  ("float64", 8)] for v in (1, 16 // size)
                for direction in ("forward", "inplace", "backward") if t != "uint8" or direction != "backward"}
    assert kinds == expected


@needs_nvcc
@pytest.mark.parametrize("kernel", ["mix_check_kernel", "permutation_check_kernel"])
def test_check_kernels_assert_on_the_device(mix_sass_all, patch_swap_sass_all, kernel):
    # the value checks trap whatever NDEBUG says: __assert_fail is called (a device-side assert)
    sass = mix_sass_all if kernel == "mix_check_kernel" else patch_swap_sass_all
    (name, instructions), = ((n, i) for n, i in sass.items() if kernel in n)
    assert any(opcode(i).startswith("CALL.ABS") for _, i in instructions), name


@needs_nvcc
def test_mix_16_byte_kernels_move_data_in_16_byte_accesses(mix_sass):
    for name, instructions in mix_sass.items():
        dtype, vec, direction = mix_kernel_kind(name)
        if vec == 1:
            continue
        ops = collections.Counter(opcode(i) for _, i in instructions)
        stores = {o for o in ops if o.startswith("STG")}
        loads = {o: n for o, n in ops.items() if o.startswith("LDG")}
        assert stores == {"STG.E.128"}, (dtype, direction, stores)
        assert loads.get("LDG.E.128", 0) > 0, (dtype, direction, loads)
        # besides the data: partner and boxes (int64), lam (float32 or float64), use_box (bool)
        assert set(loads) - {"LDG.E.128"} <= {"LDG.E.64", "LDG.E", "LDG.E.U8"}, (dtype, direction, loads)


@needs_nvcc
def test_mix_rounds_as_pytorch_eager_ops(mix_sass):
    # x * w1 + y * w2 rounds each product before the sum (torch's eager ops): no fused multiply-add
    # anywhere in the kernels; uint8 lanes go to and from float32 by float adds, not by the
    # quarter-rate I2F / F2I conversions
    for name, instructions in mix_sass.items():
        dtype, vec, direction = mix_kernel_kind(name)
        ops = collections.Counter(opcode(i) for _, i in instructions)
        # (`HFMA2.MMA Rd, -RZ, RZ, c, c` is how ptxas moves a constant into a register: no product)
        fused = [i for _, i in instructions if opcode(i).startswith(("FFMA", "DFMA", "HFMA"))
                 and not re.search(r"\bR\d+, -?RZ, RZ,", i)]
        assert not fused, (dtype, vec, direction, fused)
        assert ops["DMUL" if dtype == "float64" else "FMUL"] >= 2, (dtype, vec, direction)  # the products
        flushed = {o for o in ops if ".FTZ" in o}  # subnormals kept, as PyTorch's kernels keep them
        assert not flushed, (dtype, vec, direction, flushed)
        if dtype == "uint8":
            conversions = {o: n for o, n in ops.items() if o.startswith(("I2F", "F2I"))}
            assert not conversions, (vec, direction, conversions)


def straight_loops(instructions):
    """[opcodes] of the innermost loops whose body has no branch but its back edge."""
    return [body for body in loops(instructions) if sum(o.startswith("BRA") for o in body) == 1]


@needs_nvcc
def test_mix_blend_loops_fit_the_issue_budget(mix_sass):
    # The loops with no branch (a MixUp row out of place, a pair of MixUp rows in place, a MixUp row
    # that is its own partner): at most half of an H100's issue slots per 16 bytes moved (160 slots
    # a thread-16-bytes at 3.35 TB/s), uint8 included (its lanes converted by float adds)
    shares = {}
    for name, instructions in mix_sass.items():
        dtype, vec, direction = mix_kernel_kind(name)
        if vec == 1:
            continue
        for body in straight_loops(instructions):
            accesses = body.count("LDG.E.128") + body.count("STG.E.128")
            if accesses:
                key = (dtype, direction, accesses)
                shares[key] = max(shares.get(key, 0), len(body) / (160 * accesses))
    assert {d for d, _, _ in shares} == {"uint8", "float16", "bfloat16", "float32", "float64"}, shares
    assert any(direction == "inplace" and n == 4 for _, direction, n in shares), shares  # the pair loop
    over = {k: round(v, 2) for k, v in shares.items() if v > 0.5}
    assert not over, f"share of the issue budget: {over}"


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_no_integer_division_in_kernels(objects, source):
    divisions = {}
    for name, instructions in parse_sass(_tool(objects, source, "-sass", "-arch", "sm_90")).items():
        ops = [opcode(i) for _, i in instructions]
        # (no call at all: CALL.REL is a subroutine, as the 64-bit division's; CALL.ABS, a call into the
        # driver, only in the value-check kernel: its __assertfail)
        calls = ("CALL.REL",) if _is_check_kernel(name) else ("CALL",)
        bad = [o for o in ops if o.startswith(("MUFU.RCP",) + calls) or (o.startswith("I2F") and ".RP" in o)]
        if bad:
            divisions[name] = collections.Counter(bad)
    assert not divisions, f"division sequences (I2F.RP + MUFU.RCP) or calls (64-bit division): {divisions}"


@needs_nvcc
def test_16_byte_kernels_move_data_in_16_byte_accesses(patch_swap_sass):
    for name, instructions in patch_swap_sass.items():
        dtype, vec, _ = kernel_kind(name)
        if vec == 1:
            continue
        ops = collections.Counter(opcode(i) for _, i in instructions)
        stores = {o: n for o, n in ops.items() if o.startswith("STG")}
        loads = {o: n for o, n in ops.items() if o.startswith("LDG")}
        assert set(stores) == {"STG.E.128"}, (dtype, stores)
        assert loads.get("LDG.E.128", 0) > 0, (dtype, loads)
        # besides the data: src[b] and mask_row[b] (int64), and the mask bytes of the lanes' cells
        others = {o: n for o, n in loads.items() if o != "LDG.E.128"}
        assert set(others) <= {"LDG.E.64", "LDG.E.U8"} and all(n <= 2 for n in others.values()), (dtype, loads)


@needs_nvcc
def test_16_byte_copy_loop_instruction_budget(patch_swap_sass):
    per_16_bytes = {}
    for name, instructions in patch_swap_sass.items():
        dtype, vec, backward = kernel_kind(name)
        if vec == 1:
            continue
        ratios = [len(body) / body.count("STG.E.128") for body in loops(instructions) if "STG.E.128" in body]
        assert ratios, f"{name}: no loop stores 16 bytes"
        per_16_bytes[(dtype, backward)] = min(ratios)
    over = {k: v for k, v in per_16_bytes.items() if v > MAX_COPY_LOOP_INSTRUCTIONS_PER_16_BYTES}
    assert not over, f"copy loop instructions per 16 bytes: {per_16_bytes}"


@needs_nvcc
def test_kernels_do_not_spill(objects):
    for source in SOURCES:
        usage = _tool(objects, source, "--dump-resource-usage", "-arch", "sm_90")
        rows = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
        assert rows, usage[:2000]
        for name, reg, stack, local in rows:
            assert int(stack) == 0 and int(local) == 0, f"{name} spills: {stack} bytes of stack, {local} local"
            assert int(reg) <= 128, f"{name}: {reg} registers (occupancy under a quarter)"


needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def host_objects(tmp_path_factory):
    """{source: (returncode, stderr, object path)}: each launcher compiled (-O0: the symbols, not the code)."""
    out = {}
    folder = tmp_path_factory.mktemp("cuda_host_objects")
    for source in HOST_SOURCES:
        obj = folder / (os.path.basename(source) + ".o")
        cmd = ["c++", "-c", "-O0", "-fPIC", _std_flag(), source, "-o", str(obj)] + _defines()
        cmd += [f"-I{d}" for d in _includes()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        out[source] = (proc.returncode, proc.stderr, obj)
    return out


@needs_cxx
@pytest.mark.parametrize("source", HOST_SOURCES, ids=os.path.basename)
def test_cuda_host_source_compiles(host_objects, source):
    rc, stderr, _ = host_objects[source]
    assert rc == 0, f"{os.path.basename(source)}:\n{stderr[-4000:]}"


def _fastsd_symbols(obj, defined):
    """fastsd's C++ symbols an object defines (or, not ``defined``, needs from elsewhere)."""
    proc = subprocess.run(["nm", "-C", "--defined-only" if defined else "--undefined-only", str(obj)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = (re.match(r"\s*(?:[0-9a-f]+\s+)?[A-Za-z]\s+(.*)", line) for line in proc.stdout.splitlines())
    return {m.group(1).strip() for m in rows if m and m.group(1).startswith("fastsd::")}


@needs_nvcc
@needs_cxx
@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm")
def test_cuda_launchers_link_against_the_kernels(objects, host_objects):
    # what the full build links: every fastsd function a launcher (csrc/cuda/*.cpp) calls is defined
    # by a kernel object (csrc/cuda/*.cu), e.g. cuda_mix::launch_mix, with the same signature (else
    # only linking the extension would show it, and the build would fall back to the CPU kernels)
    # (the launchers are one translation unit, csrc/cuda/unity.cpp); and every launch_* function a
    # kernel object defines is called by a launcher
    defined = set().union(*(_fastsd_symbols(_object(objects, s), True) for s in SOURCES))
    needed = set()
    for source in HOST_SOURCES:
        rc, stderr, obj = host_objects[source]
        assert rc == 0, stderr[-4000:]
        needed |= _fastsd_symbols(obj, False)
        assert needed <= defined, (os.path.basename(source), needed - defined)
    launches = {s for s in defined if "::launch_" in s and "(anonymous namespace)" not in s}  # no file-local helper
    assert len(launches) >= 4 and launches <= needed, (launches, needed)


def test_sass_checks_see_divisions_and_narrow_accesses():
    # the parsers on a piece of the old kernel's SASS: a 64-bit division call, the 32-bit division
    # sequence, scalar accesses, and a loop
    text = """
        Function : _ZN6fastsd18cell_select_kernelIfLi4ELb0EEEvv
        /*0010*/                   I2F.U32.RP R5, R4 ;
        /*0020*/                   MUFU.RCP R5, R5 ;
        /*0030*/                   CALL.REL.NOINC 0x6200 ;
        /*0040*/                   LDG.E.CONSTANT R9, desc[UR10][R8.64] ;
        /*0050*/                   STG.E desc[UR10][R14.64], R9 ;
        /*0060*/              @!P0 BRA 0x10 ;
    """
    (name, instructions), = parse_sass(text).items()
    assert kernel_kind(name) == ("float32", 4, False)
    ops = [opcode(i) for _, i in instructions]
    assert ops[:3] == ["I2F.U32.RP", "MUFU.RCP", "CALL.REL.NOINC"] and "STG.E" in ops
    assert loops(instructions) == [ops]
