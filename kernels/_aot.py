"""Ahead-of-time specs taken from real launches: what the Triton JIT would compile for them on a GPU.

A launcher run on ``meta`` tensors (no memory, every pointer 16-byte aligned: ``data_ptr() == 0``)
or on small CPU tensors (any alignment) is recorded instead of launched; :func:`launch_spec`
turns each launch into an ``AOT_SPECS`` entry with the JIT's own binder and ``_pack_args``: the
signature, the constexprs, and the ``tt.divisibility`` 16 attributes the JIT puts on 16-byte
aligned pointers and on integers divisible by 16 (integers equal to 1 become constexprs). So the
AOT check and the compiled-code report read the code a launch of those tensors gets, for every
kernel and configuration the launchers pick for those shapes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Callable, Dict, Iterable, List, Optional, Tuple

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "debug", "sanitize_overflow", "enable_fp_fusion")


@functools.lru_cache(maxsize=None)
def _binder(kernel):
    """(JITFunction, backend, binder) of a kernel: the JIT's own argument specialisation for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if isinstance(kernel, JITFunction):
        jit = kernel
    else:  # interpreted: its function, with the decorator's options (do_not_specialize: no == 1 / % 16 variants)
        # (the decorator's keywords: InterpretedFunction.kwargs from Triton 3.5, its rewriter's before)
        given = getattr(kernel, "kwargs", None) or getattr(getattr(kernel, "rewriter", None), "kwargs", {})
        jit = JITFunction(kernel.fn, **{k: v for k, v in given.items()
                                        if k in ("do_not_specialize", "do_not_specialize_on_alignment")})
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)


def launch_spec(name: str, kernel, args: tuple, kwargs: dict) -> dict:
    """The AOT spec of one launch ``kernel[grid](*args, **kwargs)`` (works under TRITON_INTERPRET too)."""
    jit, backend, binder = _binder(kernel)
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS and v is not None}
    rest = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    bound, specialization, opts = binder(*args, **rest)
    if hasattr(jit, "_pack_args"):  # Triton 3.5 on
        _o, signature, constexprs, attrs = jit._pack_args(backend, rest, bound, specialization, opts)
    else:
        signature, constexprs, attrs = _pack_args(jit, backend, rest, bound, specialization)
    return {"name": name, "fn": kernel, "signature": signature, "constexprs": constexprs,
            "attrs": {k: v for k, v in attrs.items() if v}, "options": options}


def variant_key(spec: dict) -> dict:
    """What identifies a spec's compiled variant (JSON-able): ``base``, its function's name,
    signature, constexprs (by name, whether the spec names them or gives their path) and options, and
    ``attrs``, its divisibility attributes. Two specs compile the same code where both are equal
    (:func:`specs_from_launches` keeps one of them; fastsd.bench.gpu_report finds a launch's spec)."""
    fn = getattr(spec["fn"], "fn", spec["fn"])  # the Python function of a JITFunction or an interpreted one
    names = list(inspect.signature(fn).parameters)
    constexprs = {names[k[0]] if isinstance(k, tuple) and len(k) == 1 and isinstance(k[0], int) else k: v
                  for k, v in (spec.get("constexprs") or {}).items()}
    base = (fn.__name__, spec["signature"], sorted(constexprs.items(), key=repr),
            sorted((spec.get("options") or {}).items()))
    return {"base": repr(base), "attrs": sorted(repr(a) for a in (spec.get("attrs") or {}).items())}


def _pack_args(jit, backend, kwargs, bound, specialization):
    """What ``JITFunction._pack_args`` returns from Triton 3.5 on (signature, constexprs, attributes),
    for Triton 3.3 and 3.4, whose ``JITFunction.run`` computes the same inline."""
    from triton._utils import find_paths_if, get_iterable_path

    names = [p.name for p in jit.params]
    kinds = [s[0] for s in specialization]
    unknown = [k for k in kwargs if k not in backend.parse_options(kwargs).__dict__ and k not in names]
    if unknown:
        raise KeyError(f"keyword arguments {unknown} were specified but are not recognised")
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(kinds, lambda _, kind: kind == "constexpr")}
    values = [s[1] for s in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(values, path))
             for path in find_paths_if(values, lambda _, v: isinstance(v, str))}
    return dict(zip(names, kinds)), constexprs, attrs


class _Recorder:
    def __init__(self, name: str, kernel, launches: list):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.kernel, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def recorded(module, names: Iterable[str]):
    """Within the block, launches of the named kernels of ``module`` are recorded, not run: yields the
    list of ``(kernel name, kernel, grid, args, kwargs)``."""
    launches: list = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(n, k, launches))
        yield launches
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def specs_from_launches(module, names: Dict[str, str], cases: Iterable[Tuple[str, Callable[[], object]]]) -> List[dict]:
    """One spec per distinct compiled variant the ``cases`` launch (``(tag, thunk)``; the thunk calls a
    launcher); ``names`` maps each kernel's name in ``module`` to the prefix of its specs' names, and the
    first case that launches a variant names it ``<prefix>_<tag>``."""
    specs: Dict[str, dict] = {}
    for tag, thunk in cases:
        with recorded(module, names) as launches:
            thunk()
        for kname, kernel, _grid, args, kwargs in launches:
            spec = launch_spec(f"{names[kname]}_{tag}", kernel, args, kwargs)
            key = variant_key(spec)
            specs.setdefault(key["base"] + repr(key["attrs"]), spec)
    return list(specs.values())


def lazy_specs(module_name: str, names: Dict[str, str], cases: Callable[[], Iterable[Tuple[str, Callable[[], object]]]],
               moved_bytes: Optional[Callable[[dict], Optional[int]]] = None):
    """A module ``__getattr__`` that builds the module's ``AOT_SPECS`` (:func:`specs_from_launches` of
    ``cases()``) on first use, not at import: it runs every launcher on meta tensors. ``moved_bytes``:
    per spec, the bytes a thread really moves on its element path (fastsd.bench.sass), or None."""
    def __getattr__(name):
        if name == "AOT_SPECS":
            module = sys.modules[module_name]
            try:
                specs = specs_from_launches(module, names, cases())
            except AttributeError as exc:  # not "no AOT_SPECS": getattr(module, "AOT_SPECS", ()) would hide it
                raise RuntimeError(f"{module_name}.AOT_SPECS could not be built: {exc!r}") from exc
            for spec in specs:
                moved = moved_bytes(spec) if moved_bytes else None
                if moved:
                    spec["moved_bytes"] = moved
            module.AOT_SPECS = specs
            return module.AOT_SPECS
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
