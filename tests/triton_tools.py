"""Shared helpers for the Triton tests: ahead-of-time compilation and memory-traffic counting.

Ahead-of-time compilation (VERIFYING.md, check 2)
-------------------------------------------------
Every ``kernels/<op>.py`` module defines ``AOT_SPECS``, a list of dicts::

    {"name": str,                 # unique over all modules, used as the test id
     "fn": kernel,                # the @triton.jit function
     "signature": {...},          # arg name -> "*fp32", "i32", ..., or "constexpr"
     "constexprs": {...},         # constexpr arg name -> value
     "attrs": {...},              # optional: {(arg index,): [["tt.divisibility", 16]]}, what the JIT
                                  #   would specialise on (alignment), so the PTX is what a GPU runs
     "options": {...}}            # optional: triton.compile options, e.g. {"num_warps": 4}

covering every kernel with every dtype / layout flag combination its launcher uses.
:func:`all_aot_specs` imports every module of ``fastsd.kernels`` and collects them, so kernels
added later are picked up with no change here.

The tests run with ``TRITON_INTERPRET=1`` (tests/conftest.py). With it set, ``@triton.jit``
returns an ``InterpretedFunction``: ``triton.compile`` cannot lower it (re-wrapping its ``.fn`` in a
``JITFunction`` works for a lone kernel but not for one that calls other ``@triton.jit`` helpers,
which stay interpreted). So compilation runs in worker subprocesses with ``TRITON_INTERPRET``
unset, which import the kernel modules afresh, exactly as on a GPU machine, and write each
result's PTX, TTIR and cubin to a temporary directory. Results are cached per process
(:func:`aot_compile_all`), and triton's own disk cache (``~/.triton/cache``) makes repeated runs
cheap: one worker start-up (~3 s) plus ~5 ms per cached kernel, 0.2-1 s per kernel and arch when
the disk cache is cold (new or edited kernels). One worker by default: on this 2-core machine a
second one (``FASTSD_AOT_WORKERS=2``) only pays off when most kernels are cold, as in ``make test``,
whose caches start empty: it sets two where the machine has two cores.

Memory traffic (VERIFYING.md, check 3)
--------------------------------------
:func:`count_traffic` runs a function while every load and store of the Triton interpreter adds up
its bytes per named tensor. In Triton 3.8 ``InterpreterBuilder.create_load``/``create_store`` and the
tensor-descriptor loads/stores all go through ``create_masked_load``/``create_masked_store``;
those two and the atomics (``create_atomic_rmw``, ``create_atomic_cas``) are wrapped.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Tuple

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, each process compiles what it lacks
    fcntl = None

# What test_aot compiles, arch by arch: every spec ("all") or :func:`code_path_specs` ("paths").
# ``make test``: sm_90 every spec (its SASS is read too, tests/test_sass.py), sm_80 the code paths;
# under the oldest Triton (make test-triton-oldest) "90:paths". FASTSD_AOT_ARCHS=80:all,90:all
# compiles the whole matrix.
def _aot_plan(text: str) -> Dict[int, str]:
    plan = {}
    for item in text.split(","):
        arch, _, which = item.strip().partition(":")
        if not arch.isdigit() or which not in ("", "all", "paths"):
            raise ValueError(f"FASTSD_AOT_ARCHS: expected items like 90, 80:paths or 90:all, got {item!r}")
        plan[int(arch)] = which or "all"
    return plan


AOT_PLAN = _aot_plan(os.environ.get("FASTSD_AOT_ARCHS", "80:paths,90:all"))
ARCHS = tuple(sorted(AOT_PLAN))
AOT_WORKERS = int(os.environ.get("FASTSD_AOT_WORKERS", "1"))


# --- ahead-of-time compilation ---------------------------------------------------------------------


def kernel_modules() -> List[str]:
    """Names of every module of the fastsd.kernels package."""
    import fastsd.kernels as pkg

    return sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__))


def all_aot_specs() -> List[dict]:
    """Every ``AOT_SPECS`` entry of every fastsd.kernels module, each with ``"module"`` added."""
    specs = []
    for name in kernel_modules():
        module = importlib.import_module(name)
        for spec in getattr(module, "AOT_SPECS", ()):
            specs.append({**spec, "module": name})
    names = [s["name"] for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"AOT spec names must be unique; repeated: {repeated}")
    return specs


# Constexprs and options that set a spec's block shape, not which code it runs (left out of
# :func:`code_path_specs`' cover); VEC / CHUNK / GROUP count as 1 or more than 1.
_SHAPE_PARAMS = {"ALIGN", "BLOCK", "BLOCK_C", "BLOCK_N", "BLOCK_S", "COUNT_BLOCK", "SP", "TAIL", "TI", "TJ",
                 "NUM_LAYERS", "num_warps", "maxnreg"}
_WIDTH_PARAMS = {"VEC", "CHUNK", "GROUP"}


def _code_paths(spec: dict) -> set:
    """What a spec's compiled code depends on beside its block shape: the element type of each
    pointer argument, and the value of each other constexpr and compile option."""
    out = {("ptr", name, t) for name, t in _flat_items(spec["signature"].items()) if t.startswith("*")}
    for name, value in list(_constexprs(spec).items()) + list((spec.get("options") or {}).items()):
        if name in _SHAPE_PARAMS:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if name in _WIDTH_PARAMS:
            values = {min(int(v), 2) for v in values}  # 1, or more than 1
        out.update((name, v) for v in set(values))
    return out


def code_path_specs() -> List[dict]:
    """Specs of each @triton.jit kernel that between them show every element type of each pointer
    argument and every value of each constexpr or option that picks code rather than a block shape
    (backward, in place, channels_last, int64 indices, 1-element chunks, the gradient, the checks,
    ...), chosen in order, a spec where it shows something its kernel's earlier ones did not: what
    ``make test`` compiles for sm_80 and under the oldest Triton. What tells an arch's lowering from
    another's, or a release's, is in those; the block shapes that tell the remaining specs apart
    reach it as the same operations on other sizes. tests/test_aot.py checks the cover."""
    seen, picked = set(), []
    for spec in all_aot_specs():
        new = {(id(spec["fn"]), path) for path in _code_paths(spec)} - seen
        if new:
            seen |= new
            picked.append(spec)
    return picked


def aot_pairs() -> List[Tuple[str, int]]:
    """The (spec name, arch) pairs test_aot compiles (:data:`AOT_PLAN`)."""
    few = {s["name"] for s in code_path_specs()}
    return [(s["name"], arch) for s in all_aot_specs() for arch in ARCHS if AOT_PLAN[arch] == "all" or s["name"] in few]


def _flat_items(items) -> List[Tuple[str, str]]:
    """(name, type) of a signature's arguments, a tuple argument's element by element (name.i)."""
    out = []
    for name, t in items:
        if isinstance(t, (tuple, list)):
            out += _flat_items((f"{name}.{i}", u) for i, u in enumerate(t))
        elif isinstance(t, str):
            out.append((name, t))
    return out


def _constexprs(spec: dict) -> dict:
    """A spec's constexprs by argument name (specs give them by name or by ``(index,)``)."""
    names = list(spec["signature"])
    return {(names[k[0]] if isinstance(k, tuple) else k): v for k, v in (spec.get("constexprs") or {}).items()}


ONES = ":ones"  # suffix of a spec name: the spec with every integer argument equal to 1


def representative_specs() -> List[dict]:
    """One spec per @triton.jit kernel (its first, and its first of 1-element chunks where it has one),
    and each of them again with every integer scalar argument equal to 1 (:func:`ones_variant`):
    what a Triton version must compile for fastsd to offer its Triton backend (``make
    test-triton-oldest`` runs these under the oldest one)."""
    first, narrow = {}, {}
    for spec in all_aot_specs():
        first.setdefault(id(spec["fn"]), spec)
        if _one_element_chunks(spec):  # the kernel's other code path (mix: _mix_flat)
            narrow.setdefault(id(spec["fn"]), spec)
    picked = list(first.values()) + [s for k, s in narrow.items() if s is not first[k]]
    return [v for spec in picked for v in (spec, ones_variant(spec))]


def _one_element_chunks(spec: dict) -> bool:
    """A spec of 1-element chunks (VEC or CHUNK 1, on 32-bit indices): lines or cells no wider
    vector divides, which some kernels take through code of their own."""
    consts = _constexprs(spec)
    return not consts.get("BIG") and 1 in (consts.get("VEC"), consts.get("CHUNK"))


def ones_variant(spec: dict) -> dict:
    """The JIT passes an integer argument whose value is 1 as a constexpr (it specialises on it), so
    a kernel meets constexprs where its AOT specs declare i32: e.g. ``n.to(tl.int64)`` compiles
    there only where constexpr has a ``.to`` (Triton 3.8 on). This spec has them all."""
    ints = [a for a, t in spec["signature"].items() if isinstance(t, str) and t[:1] in ("i", "u")]
    index = {a: i for i, a in enumerate(spec["signature"])}
    return {**spec, "name": spec["name"] + ONES,
            "signature": {a: "constexpr" if a in ints else t for a, t in spec["signature"].items()},
            "constexprs": {**(spec.get("constexprs") or {}), **{a: 1 for a in ints}},
            "attrs": {k: v for k, v in (spec.get("attrs") or {}).items()
                      if not any(i == index[a] for a in ints for i in k)}}


def _spec_by_name(specs: Dict[str, dict], name: str) -> dict:
    if name.endswith(ONES):
        return ones_variant(specs[name[:-len(ONES)]])
    return specs[name]


class AOTResult:
    """One spec compiled for one arch: ``ptx``/``ttir`` (str), ``cubin`` (bytes), or ``error`` (str)."""

    def __init__(self, name: str, arch: int, ptx=None, ttir=None, cubin=None, error=None):
        self.name, self.arch = name, arch
        self.ptx, self.ttir, self.cubin, self.error = ptx, ttir, cubin, error

    @property
    def asm(self) -> Dict[str, object]:
        return {"ptx": self.ptx, "ttir": self.ttir, "cubin": self.cubin}

    def __repr__(self):
        state = self.error or f"ptx {len(self.ptx)} chars, cubin {len(self.cubin)} bytes"
        return f"AOTResult({self.name}, sm_{self.arch}: {state})"


def _compile_here(spec: dict, arch: int):
    """triton.compile one spec in this process (needs TRITON_INTERPRET unset at import)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs"),
                    attrs=spec.get("attrs"))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.get("options"))


def _worker(request_path: str, out_dir: str) -> None:
    """Subprocess entry point: compile the requested [name, arch] pairs into out_dir."""
    with open(request_path) as f:
        request = json.load(f)
    specs = {s["name"]: s for s in all_aot_specs()}
    results = {}
    for name, arch in request:
        key = f"{name}.sm_{arch}"
        try:
            compiled = _compile_here(_spec_by_name(specs, name), arch)
        except Exception as exc:  # reported per spec, so one failure does not hide the others
            results[key] = {"error": f"{exc.__class__.__name__}: {exc}"}
            continue
        paths = {}
        for kind, mode in (("ptx", "w"), ("ttir", "w"), ("cubin", "wb")):
            paths[kind] = os.path.join(out_dir, f"{key}.{kind}")
            with open(paths[kind], mode) as f:
                f.write(compiled.asm[kind])
        results[key] = paths
    with open(request_path + ".results.json", "w") as f:
        json.dump(results, f)


def _run_worker(pairs: List[Tuple[str, int]], out_dir: str, index: int) -> dict:
    request_path = os.path.join(out_dir, f"request{index}.json")
    with open(request_path, "w") as f:
        json.dump(pairs, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
    code = "import sys, triton_tools; triton_tools._worker(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, request_path, out_dir], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(request_path + ".results.json") as f:
        return json.load(f)


_AOT_CACHE: Dict[Tuple[str, int], AOTResult] = {}


@contextlib.contextmanager
def compile_lock(arch: int):
    """Held by a process while it compiles kernels for sm_<arch>, on a file beside triton's disk cache.

    ``make test`` runs the files on pytest-xdist workers with that cache cold, and nine files compile
    sm_90 kernels (test_aot, test_sass and test_int64_offsets every spec, test_loss_kernels every
    loss spec, the others a few). Without the lock a worker compiled its own copy of what the other
    was compiling at the same moment; with it the second waits, then reads the first one's results
    from the cache (~5 ms a kernel). Where the lock cannot be taken (no fcntl, a read-only or
    network file system), each process compiles what it lacks, as before."""
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")
    f = None
    if fcntl is not None:
        try:
            os.makedirs(cache, exist_ok=True)
            f = open(os.path.join(cache, f"fastsd-aot-sm_{arch}.lock"), "a")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            if f is not None:
                f.close()
            f = None
    try:
        yield
    finally:
        if f is not None:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def aot_compile_all(pairs: Iterable[Tuple[str, int]]) -> Dict[Tuple[str, int], AOTResult]:
    """Compile (spec name, arch) pairs in worker subprocesses (see the module docstring); cached.
    One batch an arch, under that arch's :func:`compile_lock`, sm_90 first (most of the tests that
    compile want sm_90 only, and wait for it)."""
    pairs = list(pairs)
    for arch in sorted({a for _, a in pairs}, reverse=True):
        todo = sorted({(n, a) for n, a in pairs if a == arch and (n, a) not in _AOT_CACHE})
        if todo:
            with compile_lock(arch):
                _compile_batch(todo)
    return {(n, a): _AOT_CACHE[(n, a)] for n, a in pairs}


def _compile_batch(todo: List[Tuple[str, int]]) -> None:
    if todo:
        with tempfile.TemporaryDirectory(prefix="fastsd_aot_") as out_dir:
            # A second worker pays off only when there is more to compile than its start-up costs.
            workers = AOT_WORKERS if len(todo) > 8 else 1
            chunks = [todo[i::workers] for i in range(workers)]
            with concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:
                outputs = list(pool.map(_run_worker, chunks, [out_dir] * len(chunks), range(len(chunks))))
            results = {k: v for out in outputs for k, v in out.items()}
            for name, arch in todo:
                info = results[f"{name}.sm_{arch}"]
                if "error" in info:
                    _AOT_CACHE[(name, arch)] = AOTResult(name, arch, error=info["error"])
                    continue
                read = {}
                for kind, mode in (("ptx", "r"), ("ttir", "r"), ("cubin", "rb")):
                    with open(info[kind], mode) as f:
                        read[kind] = f.read()
                _AOT_CACHE[(name, arch)] = AOTResult(name, arch, **read)


def aot_compile(spec: dict, arch: int) -> AOTResult:
    """Compile one AOT spec for sm_<arch> (80 or 90). Works with or without TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        try:
            compiled = _compile_here(spec, arch)
        except Exception as exc:
            return AOTResult(spec["name"], arch, error=f"{exc.__class__.__name__}: {exc}")
        return AOTResult(spec["name"], arch, **{k: compiled.asm[k] for k in ("ptx", "ttir", "cubin")})
    return aot_compile_all([(spec["name"], arch)])[(spec["name"], arch)]


# --- 64-bit offsets in the compiled kernels ----------------------------------------------------------

_ARG_PTR = re.compile(r"%([\w.]+): !tt\.ptr<")  # tuple arguments are flattened: %students.0, ...
_DERIVED = re.compile(r"%([\w.]+) = tt\.(?:splat|broadcast) %([\w.]+) ")
_ADDPTR = re.compile(r"%[\w.]+ = tt\.addptr %([\w.]+), %[\w.]+ : [^,]+, (.+?)(?: loc\(|$)", re.M)


def argument_pointer_offsets(ttir: str) -> List[Tuple[str, str]]:
    """``(argument, offset type)`` of every ``tt.addptr`` applied to a kernel argument pointer, directly
    or through splat/broadcast, from a kernel's TTIR. ``argument`` is the parameter name (a tuple
    parameter's elements ``students.0``, ``students.1``, ... are reported as ``students``)."""
    root = {a: a for a in _ARG_PTR.findall(ttir)}
    for dst, src in _DERIVED.findall(ttir):
        if src in root:
            root[dst] = root[src]
    return [(re.sub(r"\.\d+$", "", root[base]), off) for base, off in _ADDPTR.findall(ttir) if base in root]


def argument_offsets_are_64_bit(ttir: str, exempt: Iterable[str] = ()) -> List[str]:
    """The offset types of every ``tt.addptr`` applied to a kernel argument pointer (directly or
    through splat/broadcast) that are not 64-bit; [] when all are. Sample offsets such as
    ``b * C * H * W`` pass 2**31 in big batches, so they must be added in int64 before any 32-bit
    in-sample index. Arguments in ``exempt`` (buffers that cannot reach 2**31 elements) are skipped."""
    exempt = set(exempt)
    return [off for arg, off in argument_pointer_offsets(ttir) if arg not in exempt and "i64" not in off]


# --- memory traffic under the interpreter: in the package (the benchmark report uses it too) ----------

from fastsd.bench.triton_traffic import count_traffic  # noqa: E402,F401
