"""Backend choice for every op, in one place.

Each op registers one implementation per backend with :func:`register`. At call time
:func:`select` returns the implementation to run:

* ``FASTSD_BACKEND=<name>`` (or the :func:`use_backend` context manager, which wins over the
  environment) forces one backend; if it cannot run the inputs, :class:`BackendUnavailableError`
  says why.
* ``auto`` (the default) takes the first backend in :func:`preference` (:data:`PREFERENCE`, the CUDA
  C++ kernel first for the ops in :data:`CUDA_FIRST`) that can run the inputs.
* An op whose only implementation is its aten reference on some backend (the pairing ops have no
  C++ or CUDA kernel; ``scale_grad`` is one torch multiply on CUDA) registers that reference with
  ``stand_in=True``: a backend forced for a whole recipe then runs it where the op has no kernel of
  that backend, or one that cannot take the inputs (the mask kernel's grid limit), and
  :func:`reasons` (``python -m fastsd.info``) says so instead of listing a kernel that does not
  exist.

A backend that cannot take given inputs says why with readable reasons (after xformers'
``not_supported_reasons``); ``python -m fastsd.info`` prints them.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")
# Fastest first. On CUDA tensors the fused Triton kernels come first (except for CUDA_FIRST's ops);
# on CPU tensors the C++ kernels. Triton on CPU tensors (TRITON_INTERPRET=1) is for tests only and
# is never picked by auto: the interpreter is orders of magnitude slower than the reference.
PREFERENCE = ("triton", "cuda", "cpp", "torch")
# Ops whose CUDA C++ kernel auto takes before the Triton one, where both can run. Measured on an H100
# (docs/gpu/README.md, float32), where a call is host-bound and Triton 3.6's Python launcher costs
# about 45 us a launch more than a C++ op:
# - the mix op (2026-11-26): 26-79 us a call against 92-117 us (256x3x32x32 and 128x3x224x224, out of
#   place and in place), with the same launches (a sort, the check kernel, the kernel);
# - patch_swap's forward (2026-11-27, with its permutation check kernel): 0.091 / 0.094 / 0.127 ms a
#   call against Triton's 0.151 / 0.124 / 0.195 ms (256x3x32x32 8x8, 64x3x224x224 7x7,
#   128x64x56x56 7x7), although it launches 3 kernels (the sort, the check, the kernel) where
#   Triton's launches 2 (the check inside the kernel): issue 12's launch budget, forward + backward,
#   is counted on the Triton path.
# The backward ops were not timed there and keep PREFERENCE.
CUDA_FIRST = frozenset({"mix", "mix_", "patch_swap"})


def preference(op: str) -> Tuple[str, ...]:
    """The order auto tries ``op``'s backends in: :data:`PREFERENCE`, the CUDA C++ kernel first for
    the ops in :data:`CUDA_FIRST`."""
    if op in CUDA_FIRST:
        return ("cuda",) + tuple(b for b in PREFERENCE if b != "cuda")
    return PREFERENCE

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastsd_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """No backend (or not the forced one) can run the given inputs."""


@dataclass(frozen=True)  # select() keeps choices by Impl identity (_SELECTED): replaced, never changed
class Impl:
    fn: Callable
    # Extra, op-specific reasons (e.g. dtypes the kernel lacks); returns [] when it can run. Reasons
    # that look at the process only, never at the arguments (tensors, numbers or kwargs), and only
    # through a cached() lookup (which kernels fastsd._C has: clear_caches() forgets it), say so with
    # an attribute `process_only = True`: select() may then keep its choice (_SELECTED).
    reasons: Optional[Callable[..., List[str]]] = None
    # aten ops that run on every device: what a forced backend without a kernel for the op runs
    stand_in: bool = False


_REGISTRY: Dict[str, Dict[str, Impl]] = {}


def register(op: str, backend: str, reasons: Optional[Callable[..., List[str]]] = None, stand_in: bool = False):
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``. ``stand_in`` (the torch
    backend only): ``fn`` is aten ops, run by a forced backend that has no implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if stand_in and backend != "torch":
        raise ValueError("only the torch backend's implementation can stand in for the others")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = Impl(fn, reasons, stand_in)
        _SELECTED.clear()
        return fn

    return deco


def ops() -> List[str]:
    _load_all()
    return sorted(_REGISTRY)


class use_backend(contextlib.ContextDecorator):
    """Force ``name`` (or ``None``/``"auto"`` for automatic choice) inside the block (a ``with``
    statement, or as a decorator). A class rather than a generator-based context manager: building,
    entering and leaving it takes about half the time (1.0-1.8 us against 1.9-3.5 us, timeit,
    alternating), paid around every call that fastsd.bench times (each backend's call inside one)."""

    __slots__ = ("_name", "_tokens")

    def __init__(self, name: Optional[str]):
        if name is not None and name != "auto" and name not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
        self._name = None if name == "auto" else name
        self._tokens = []  # one per active entry: the same object may be entered again inside itself

    def __enter__(self):
        self._tokens.append(_forced.set(self._name))

    def __exit__(self, *exc):
        _forced.reset(self._tokens.pop())
        return False


def forced_backend() -> Optional[str]:
    name = _forced.get()
    if name is not None:
        return name
    return _parse_forced(_getenv("FASTSD_BACKEND"))


# Every select() reads two environment variables. os.environ.get costs about 1 us (a Python-level
# Mapping lookup that encodes the key and decodes the value); the posix mapping's underlying dict of
# bytes, read with the key encoded once, costs a dict lookup. It is os.environ's own store, so a
# change (os.environ[...] = ..., monkeypatch.setenv) is seen at once; elsewhere os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS: Dict[str, object] = {}


def _getenv(name: str) -> Optional[str]:
    if _ENV_DATA is None:  # pragma: no cover - a platform whose os.environ keeps no _data
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    value = _ENV_DATA.get(key)
    return None if value is None else (os.environ.decodevalue(value) if isinstance(value, bytes) else value)


@functools.lru_cache(maxsize=64)
def _parse_forced(raw: Optional[str]) -> Optional[str]:
    name = (raw or "auto").strip().lower() or "auto"
    if name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTSD_BACKEND must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------
# Availability of each backend, independent of the op.


def triton_interpreting() -> bool:
    return _getenv("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    return triton_version_reason(triton.__version__)


# The oldest Triton the kernels are tested with: CI compiles every spec of every kernel for sm_80 and
# sm_90, and one spec of each kernel again with its integer arguments equal to 1 (which the JIT turns
# into constexprs), under this release (`make test-triton-oldest`), as the pinned 3.8 does, which
# also runs the interpreter. 3.4 is what torch 2.8 ships (2.9: 3.5; 2.10 and 2.11: 3.6, with which
# all GPU tests passed on an H200). 3.3 (torch 2.7) cannot index constexpr tuples, which the loss
# kernels do. Older releases are not offered (the reason says why) rather than failing on the first
# call.
TRITON_MIN_VERSION = (3, 4)
TRITON_OLDEST_TESTED = "3.4.0"  # the release `make test-triton-oldest` installs


def triton_version_reason(version: str) -> Optional[str]:
    try:
        parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        return None  # a development build: let it try
    if parts < TRITON_MIN_VERSION:
        want = ".".join(map(str, TRITON_MIN_VERSION))
        return f"triton {version} is older than {want}, the oldest these kernels are tested with"
    return None


# Triton's interpreter before 3.8 turns loop bounds it holds as 1-element arrays into ints, which
# NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): with those
# two, the kernels that loop over a scalar bound fail under TRITON_INTERPRET=1 (seen with 3.6),
# while the same Triton compiles and runs them on a GPU.
TRITON_INTERPRETER_NUMPY = ((3, 8), (2, 4))


@functools.lru_cache(maxsize=None)
def triton_interpreter_error() -> Optional[str]:
    import numpy
    import triton

    def major_minor(version: str):
        try:
            return tuple(int(p) for p in version.split("+")[0].split(".")[:2])
        except ValueError:
            return None

    tv, nv = major_minor(triton.__version__), major_minor(numpy.__version__)
    (t_min, np_max) = TRITON_INTERPRETER_NUMPY
    if tv is not None and nv is not None and tv < t_min and nv >= np_max:
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with NumPy {numpy.__version__} "
                f"(it needs Triton >= {'.'.join(map(str, t_min))} or NumPy < {'.'.join(map(str, np_max))}); "
                "on a GPU this Triton runs them")
    return None


def _device_reasons(backend: str, devices: Sequence[torch.device]) -> List[str]:
    from . import _ext

    types = {d.type for d in devices}
    reasons = []
    if len(types) > 1 or len(set(devices)) > 1:
        reasons.append(f"inputs are on several devices ({sorted(map(str, set(devices)))})")
        return reasons
    dev = next(iter(types), "cpu")
    if backend == "triton":
        err = triton_import_error()
        if err:
            reasons.append(err)
        if dev == "cpu" and not triton_interpreting():
            reasons.append("inputs are on cpu; Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
        elif dev == "cpu" and not err:
            err = triton_interpreter_error()
            if err:
                reasons.append(err)
        elif dev not in ("cpu", "cuda"):
            reasons.append(f"inputs are on {dev}; Triton runs CUDA tensors")
    elif backend == "cuda":
        if dev != "cuda":
            reasons.append(f"inputs are on {dev}; the cuda backend runs CUDA tensors")
        err = _ext.load_error()
        if err:
            reasons.append(err)
        elif not _ext.has_cuda():
            reasons.append("fastsd._C was built without CUDA kernels (set FASTSD_BUILD_CUDA=1 and reinstall)")
    elif backend == "cpp":
        if dev != "cpu":
            reasons.append(f"inputs are on {dev}; the cpp backend runs CPU tensors")
        err = _ext.load_error()
        if err:
            reasons.append(err)
    return reasons


def _devices(tensors) -> Tuple[torch.device, ...]:
    first = None
    for t in tensors:  # the common case first: every tensor on one device
        if isinstance(t, torch.Tensor):
            d = t.device
            if first is None:
                first = d
            elif d != first:
                devices = []
                for u in tensors:
                    if isinstance(u, torch.Tensor) and u.device not in devices:
                        devices.append(u.device)
                return tuple(devices)
    return () if first is None else (first,)


@functools.lru_cache(maxsize=None)
def _cached_device_reasons(backend: str, devices: Tuple[torch.device, ...], interpreting: bool) -> Tuple[str, ...]:
    # What a backend needs of the devices does not change within a process, but for the
    # interpreter switch, which is part of the key.
    return tuple(_device_reasons(backend, list(devices)))


def reasons(op: str, backend: str, *tensors: torch.Tensor, **kwargs) -> List[str]:
    """Why ``backend`` cannot run ``op`` on these inputs ([] when it can)."""
    _load_all()
    impls = _REGISTRY.get(op, {})
    impl = impls.get(backend)
    if impl is None:
        out = [f"{op} has no {backend} implementation"]
    else:
        out = list(_cached_device_reasons(backend, _devices(tensors), triton_interpreting()))
        if impl.reasons is not None and not out:
            out += impl.reasons(*tensors, **kwargs)
    if out and backend != "torch" and "torch" in impls and impls["torch"].stand_in:
        out[-1] += " (forced, it runs the aten reference, fastsd.reference)"
    return out


# select()'s answers that depend on nothing but (op, forced backend, interpreter switch, devices):
# the backend chosen first whatever the tensors (its device reasons are cached, and it has no
# op-specific reasons, or process-only ones), e.g. the C++ kernels of patch_swap and mix on CPU
# tensors. -> (backend, its Impl, the callable). A hit is checked against the registry, where a test
# may swap an Impl in place; register() and clear_caches() forget them all. A call then reads the
# registry twice instead of making the whole choice: select() took 1.3 us instead of 3.9 in a timeit
# loop here, and saves more where the interpreter's objects are cold after a large kernel.
_SELECTED: Dict[tuple, Tuple[str, "Impl", Callable]] = {}


def select(op: str, *tensors: torch.Tensor, **kwargs) -> Callable:
    """The implementation of ``op`` to run on these inputs (see the module docstring); on CUDA
    tensors it runs with their device current (:func:`_on_device`)."""
    devices = _devices(tensors)
    forced = forced_backend()
    interpreting = triton_interpreting()
    key = (op, forced, interpreting, devices)
    hit = _SELECTED.get(key)
    if hit is not None and _REGISTRY.get(op, {}).get(hit[0]) is hit[1]:
        return hit[2]
    if forced is not None:
        impls = _REGISTRY.get(op, {})
        impl = impls.get(forced)
        if impl is not None and not _cached_device_reasons(forced, devices, interpreting) and (
                impl.reasons is None or not impl.reasons(*tensors, **kwargs)):
            return _selected(key, forced, impl, devices)
        if "torch" in impls and impls["torch"].stand_in:
            return _on_device(impls["torch"].fn, devices)
        why = reasons(op, forced, *tensors, **kwargs)
        raise BackendUnavailableError(
            f"fastsd.{op}: the forced backend {forced!r} cannot run these inputs: " + "; ".join(why)
        )
    for i, name in enumerate(_auto_candidates(op, devices, interpreting)):
        impl = _REGISTRY[op][name]
        if impl.reasons is None or not impl.reasons(*tensors, **kwargs):
            # kept only where no earlier candidate was ruled out by these tensors' own properties
            return _selected(key if i == 0 else None, name, impl, devices)
    collected = []
    for name in preference(op):
        why = reasons(op, name, *tensors, **kwargs) or [_NOT_AUTO]
        collected.append(f"  {name}: " + "; ".join(why))
    raise BackendUnavailableError(f"fastsd.{op}: no backend can run these inputs:\n" + "\n".join(collected))


def _selected(key: Optional[tuple], name: str, impl: Impl, devices: Tuple[torch.device, ...]) -> Callable:
    """impl's callable on these devices, kept in _SELECTED under key where the choice depended on
    nothing else (key given, and impl's reasons are none or process-only)."""
    fn = _on_device(impl.fn, devices)
    if key is not None and (impl.reasons is None or getattr(impl.reasons, "process_only", False)):
        _SELECTED[key] = (name, impl, fn)
    return fn


def _on_device(fn: Callable, devices: Tuple[torch.device, ...]) -> Callable:
    """``fn`` as it must run on ``devices``: on one CUDA device, with that device current.

    Triton launches on ``torch.cuda.current_device()`` and its current stream, whatever device
    the tensors are on, and so would a CUDA extension without a device guard: with the model on
    cuda:1 and device 0 current (no ``torch.cuda.set_device(1)``: notebooks, several models per
    script), the kernels would run on GPU 0 with GPU 1's pointers. Every op body that launches
    runs through here. No cost on CPU; on CUDA one device query when the device is already current.
    """
    if len(devices) != 1 or devices[0].type != "cuda":
        return fn
    return _guarded(fn, devices[0].index)


@functools.lru_cache(maxsize=None)
def _guarded(fn: Callable, index: int) -> Callable:
    @functools.wraps(fn)  # keeps attributes such as checks_indices
    def run(*args, **kwargs):
        if torch.cuda.current_device() == index:
            return fn(*args, **kwargs)
        with torch.cuda.device(index):
            return fn(*args, **kwargs)

    return run


_NOT_AUTO = "the Triton interpreter is for tests; auto does not pick it (FASTSD_BACKEND=triton does)"


@functools.lru_cache(maxsize=None)
def _auto_candidates(op: str, devices: Tuple[torch.device, ...], interpreting: bool) -> Tuple[str, ...]:
    """Backends auto may pick for ``op`` on these devices, fastest first (op-specific reasons,
    such as dtypes, are checked per call)."""
    _load_all()
    on_cpu = all(d.type == "cpu" for d in devices)
    return tuple(
        name for name in preference(op)
        if name in _REGISTRY.get(op, {})
        and not _cached_device_reasons(name, devices, interpreting)
        and not (name == "triton" and on_cpu)
    )


_OP_CACHES: List[Callable] = []


def cached(fn: Callable) -> Callable:
    """``fn`` memoised (``functools.lru_cache``), forgotten by :func:`clear_caches` too: for what an
    op's ``reasons`` looks up that cannot change within a process (which kernels fastsd._C has)."""
    memo = functools.lru_cache(maxsize=None)(fn)
    _OP_CACHES.append(memo)
    return memo


def clear_caches() -> None:
    """Forget cached availability (for tests that fake a missing extension or library)."""
    _cached_device_reasons.cache_clear()
    _auto_candidates.cache_clear()
    _SELECTED.clear()
    for memo in _OP_CACHES:
        memo.cache_clear()


def available(op: str, *tensors: torch.Tensor, **kwargs) -> List[str]:
    """Backends (in auto's order) that can run ``op`` on these inputs."""
    return [b for b in preference(op) if not reasons(op, b, *tensors, **kwargs)]


_loaded = False


def _load_all():
    # Importing the op modules registers their implementations (once: this runs on every call).
    global _loaded
    if _loaded:
        return
    from . import patch_swap  # noqa: F401
    from . import losses  # noqa: F401
    from . import icp  # noqa: F401
    from .mix import op  # noqa: F401
    from . import pairing  # noqa: F401

    _loaded = True
