"""Kernels a call launches on CUDA, counted without a GPU (issue 12; VERIFYING.md, "Launches per call").

Every kernel launch costs 3-5 us of CPU on the host, whatever it does; a public op that launches
twenty small kernels around one fused kernel spends more time launching than computing at small
batches. :func:`count_launches` runs a call once, forward and (when its output requires grad)
backward, and counts:

* **aten ops**, with a ``TorchDispatchMode``: every op that reaches the mode is one kernel launch,
  except views and metadata queries (their outputs alias an input; nothing is written) and bare
  allocations (``empty``, ``empty_like``, ...: the caching allocator launches nothing). A read of a
  tensor's value on the host (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``) is counted
  apart, as a host synchronisation.
* **Triton launches**: ``JITFunction.run`` (a GPU launch) and, under ``TRITON_INTERPRET=1``,
  ``InterpretedFunction.run`` are wrapped for the duration of the count; a ``warmup`` (compile
  only) is not a launch. The interpreter's own copies of the arguments are not counted.
* **fastsd's custom ops** (``torch.library.custom_op``) are opened: the mode sees such an op as one
  call, so the count runs its Python implementation under the mode and counts what it launches.
  (C++ ops, e.g. ``torch.ops.fastsd_C``, count as one launch each.)

The count is the path CUDA takes: where fastsd's glue branches on the device (a check a Triton
kernel makes with ``tl.device_assert`` on the GPU, which the interpreter ignores, so the glue makes
it on the host for CPU tensors), :func:`count_launches` takes the CUDA branch through
``fastsd._validate.kernel_asserts`` while it runs (``cuda_paths=True``, the default).

What it cannot see, and how it errs:

* One aten op is counted as one launch. A few launch more on CUDA: ``sort`` of more than a few
  thousand elements (cub's radix sort: several passes), ``randperm``, ``nonzero`` and masked
  indexing (a count, a host sync and a gather). For those the count is a lower bound.
* A composite op is counted as it reaches the mode: ``aten.dist`` is one op here and a subtraction
  plus a norm on CUDA (none is on fastsd's paths).
* Branches on the device that fastsd does not route through ``kernel_asserts``: other code that
  tests ``x.is_cuda`` or ``x.device.type`` runs its CPU branch here. fastsd's own such branches
  choose block sizes only (``kernels/patch_swap.py``, ``kernels/icp_update.py``), not launches.
* Under the mode, ``fastsd.losses._donated`` is False (a dispatch mode is tracing), so a loss's
  backward multiplies into a new tensor rather than in place: one multiply either way.
* Autograd's own work around the op (``AccumulateGrad`` into ``.grad``, the ``ones_like`` of an
  implicit grad_output) is not counted: the backward is run with ``torch.autograd.grad`` and
  grad_outputs made before counting, so only the op's backward formula counts.
* CUDA graphs: a replayed graph is one launch; this counts the eager launches that were captured.

Under ``torch.compile`` the ops around fastsd's custom ops fuse and what runs inside an op launches
as in eager; :func:`compiled_kernels` reads the kernels off the code Inductor generates.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from .traffic import _is_view_or_meta

# aten ops that only allocate (or re-describe) memory: no kernel runs on the device.
_NO_LAUNCH = frozenset({
    "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided",
    "resize_", "set_", "lift_fresh",
})
_HOST_SYNC = frozenset({"_local_scalar_dense"})


def _custom_op_impl(func) -> Optional[Callable]:
    """The Python implementation of a ``torch.library.custom_op`` (None for aten and C++ ops)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - torch releases before custom_op kept a registry
        return None
    opdef = OPDEFS.get(func._schema.name)
    return None if opdef is None else opdef._init_fn


class LaunchCounter(TorchDispatchMode):
    """Records the launches of the code run inside it (see the module docstring).

    ``launches`` lists them in order: ``aten.<op>`` and ``triton.<kernel>``; ``host_syncs`` the
    host reads of tensor values.

    It only watches: fastsd's ops take their eager path under it (``fastsd_observer``, see
    :mod:`fastsd._eager`), as they do outside it, so the count is that of an eager call; a
    registered op called directly is opened, as below."""

    fastsd_observer = True

    def __init__(self):
        super().__init__()
        self.launches: List[str] = []
        self.host_syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _custom_op_impl(func)
        if impl is not None:
            with self:  # re-entered: the op's body runs under the mode, op by op
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _HOST_SYNC:
            self.host_syncs.append(f"aten.{name}")
        elif name not in _NO_LAUNCH and not _is_view_or_meta(func):
            self.launches.append(f"aten.{name}")
        return out


_active: List[LaunchCounter] = []


def _triton_launchers():
    """The classes whose ``run`` launches a Triton kernel (the GPU's JIT; the interpreter's)."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception:  # pragma: no cover - no triton: nothing to wrap
        return []
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except Exception:  # pragma: no cover
        pass
    return classes


@contextlib.contextmanager
def on_triton_launch(hook: Callable[[str, tuple, dict, Callable[[], Any]], Any]):
    """Inside the block every Triton launch (not a ``warmup``, which only compiles) calls
    ``hook(kernel_name, args, kwargs, launch)`` instead, where ``launch()`` launches and returns the
    launcher's result; the hook returns it. ``launch.kernel`` is the launched kernel (the JIT's
    ``JITFunction``, or the interpreter's function), for what its arguments make of it
    (:func:`fastsd.bench.gpu_report.variant_of`). Hooks nest (the innermost runs first)."""
    saved = []
    for cls in _triton_launchers():
        original = cls.__dict__["run"]

        def run(self, *args, _original=original, **kwargs):
            if kwargs.get("warmup", False):
                return _original(self, *args, **kwargs)
            fn = getattr(self, "fn", None)
            launch = functools.partial(_original, self, *args, **kwargs)
            launch.kernel = self
            return hook(getattr(fn, "__name__", type(self).__name__), args, kwargs, launch)

        saved.append((cls, original))
        cls.run = run
    try:
        yield
    finally:
        for cls, original in saved:
            cls.run = original


def _count_launch(name, args, kwargs, launch):
    if _active:
        _active[-1].launches.append(f"triton.{name}")
    # The interpreter copies arguments with torch ops: they are not launches of the kernel.
    with _disable_current_modes():
        return launch()


@contextlib.contextmanager
def _cuda_paths():
    """fastsd's device branches take their CUDA side (see the module docstring)."""
    from .. import _validate

    saved = _validate.kernel_asserts
    _validate.kernel_asserts = lambda *tensors: True
    try:
        yield
    finally:
        _validate.kernel_asserts = saved


@contextlib.contextmanager
def counting(cuda_paths: bool = True):
    """``with counting() as c:`` records the launches of the block in ``c`` (a :class:`LaunchCounter`)."""
    counter = LaunchCounter()
    with contextlib.ExitStack() as stack:
        if not _active:
            stack.enter_context(on_triton_launch(_count_launch))
        if cuda_paths:
            stack.enter_context(_cuda_paths())
        _active.append(counter)
        stack.callback(_active.pop)
        stack.enter_context(counter)
        yield counter


def _leaves(outputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """The leaf tensors the outputs' graph ends in (what a backward would accumulate into)."""
    seen, leaves, stack = set(), [], [o.grad_fn for o in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves


def count_launches(fn: Callable[[], Any], *, backward: bool = True, cuda_paths: bool = True) -> Dict[str, Any]:
    """Kernel launches of ``fn()`` on CUDA, forward and backward.

    Args:
        fn: a callable without arguments that makes the call (its inputs made beforehand, outside
            the count). It runs once.
        backward: also run the backward of every tensor output that requires grad, with grad
            outputs of ones (made before the count), into the leaves of its graph.
        cuda_paths: take fastsd's CUDA side where it branches on the device (see the module docstring).

    Returns:
        ``{"forward": int, "backward": int, "total": int, "host_syncs": int,
        "ops": {"forward": [names], "backward": [names]}}``: the launches of each pass and their
        names in order (``aten.<op>``, ``triton.<kernel>``), and the host reads of tensor values.
    """
    with counting(cuda_paths) as fwd:
        out = fn()
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    bwd = LaunchCounter()
    if backward and outputs:
        grad_outputs = [torch.ones_like(t) for t in outputs]
        leaves = _leaves(outputs)
        with counting(cuda_paths) as bwd:
            torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)
    return {
        "forward": len(fwd.launches),
        "backward": len(bwd.launches),
        "total": len(fwd.launches) + len(bwd.launches),
        "host_syncs": len(fwd.host_syncs) + len(bwd.host_syncs),
        "ops": {"forward": list(fwd.launches), "backward": list(bwd.launches)},
    }


def compiled_kernels(fn: Callable[[], Any]) -> List[Dict[str, Any]]:
    """Kernels of the code Inductor generates while ``fn()`` runs (``fn`` calls ``torch.compile``'d
    code, compiled during the call): one entry per graph (forward, then backward), with
    ``generated``, the number of kernels Inductor wrote (C++ on CPU tensors, Triton on CUDA ones),
    and ``calls``, the ops the generated code calls as they are (extern aten kernels such as sort,
    and fastsd's custom ops, each of which launches what :func:`count_launches` counts inside it).
    """
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(fn)
    return [{
        "generated": len(re.findall(r"^\w+ = async_compile\.(?:triton|cpp_pybinding|cpp)\(", src, re.M)),
        "calls": re.findall(r"\b(torch\.ops\.\w+\.\w+)(?:\.\w+)?\(", src) + re.findall(r"\b(extern_kernels\.\w+)\(", src),
    } for src in codes]
