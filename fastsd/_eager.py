"""The eager path of fastsd's registered ops: the same implementation without torch.library's dispatch.

Every public op is a ``torch.library.custom_op`` so that ``torch.compile(fullgraph=True)``, export
and ``opcheck`` see it whole. Calling one costs host time that an eager training step pays on every
call: the dispatcher, then the custom op's autograd wrapper, which rebuilds the op's argument list
from its schema (``torch._library.utils.fill_defaults``) and redispatches below autograd, then a
``torch._dynamo.disable`` frame around the Python body: 30-60 us per call on the CPU, more than the
kernels of a small batch on a GPU (docs/gpu/README.md). Where nothing traces the call, the same
body runs directly:

* nothing needs a gradient: the op's implementation, called as a function;
* else a ``torch.autograd.Function`` whose forward, ``setup_context`` and backward are the very
  functions registered with the custom op (``register_autograd``): one implementation, two entries.

Under the profiler the eager path labels its work ``fastsd.<op>`` and ``fastsd.<op> (backward)``
(``record_function``), where the registered op shows ``fastsd::<op>``: a profile of a trainer
still says what fastsd's ops cost, and which path they took (examples/_common.py reads both).

Anything that traces or transforms (torch.compile and export, ``make_fx``, fake tensors, a dispatch
mode, functorch's transforms, TorchScript's tracer, tensor subclasses) gets the registered op, as
before. A dispatch mode that only watches the aten ops go by and declares ``fastsd_observer = True``
(fastsd.bench.launches' launch counter) sees the eager path, which launches what the op does.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_set_grad_enabled = torch._C._set_grad_enabled
_profiling = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None) or (lambda: False)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None) or (lambda: False)


def _observers_only(depth: int) -> bool:
    return all(getattr(torch._C._get_dispatch_stack_at(i), "fastsd_observer", False) for i in range(depth))


def eager(tensors: Sequence[torch.Tensor]) -> bool:
    """True where a call on ``tensors`` may skip the registered op (see the module docstring)."""
    if _is_compiling():  # first: torch.compile folds it, and traces none of the rest
        return False
    depth = torch._C._len_torch_dispatch_stack()
    if depth and not _observers_only(depth):
        return False
    if _functorch_active() or torch._C._get_tracing_state() is not None:
        return False
    for t in tensors:
        if type(t) not in _PLAIN:
            return False
    return True


class _Function(torch.autograd.Function):
    """The registered autograd of a :class:`Path`'s op, as an autograd.Function. ``lengths`` says
    which arguments are lists of tensors (autograd.Function tracks only positional tensors): None
    when none are, else per argument its list's length or -1.

    ``forward`` takes ``ctx`` and calls the op's ``setup_context`` itself: with a separate
    ``setup_context`` staticmethod, ``Function.apply`` binds the arguments with ``inspect.signature``
    on every call (about 20 us), and functorch's transforms, which would need it, never get here."""

    @staticmethod
    def forward(ctx, path, lengths, *flat):
        inputs = _nest(flat, lengths)
        output = path.forward(*inputs)
        ctx.fastsd_path = (path, lengths)
        path.setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        path, lengths = ctx.fastsd_path
        if _profiling():
            with torch.profiler.record_function(path.label + " (backward)"):
                return (None, None) + _flat_grads(path.backward(ctx, *grads), lengths)
        return (None, None) + _flat_grads(path.backward(ctx, *grads), lengths)


def _nest(flat: tuple, lengths: Optional[Tuple[int, ...]]) -> tuple:
    if lengths is None:
        return flat
    args, i = [], 0
    for n in lengths:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return tuple(args)


def _flat_grads(grads, lengths: Optional[Tuple[int, ...]]) -> tuple:
    if lengths is None:
        return tuple(grads)
    out = []
    for g, n in zip(grads, lengths):
        if n < 0:
            out.append(g)
        else:
            out.extend([None] * n if g is None else g)
    return tuple(out)


class Path:
    """A registered op and its eager path. ``forward(*args)`` is the op's implementation (the
    custom op's body calls the same function); ``setup_context`` and ``backward``, for a
    differentiable op, are registered as the op's autograd here. ``lists``: whether some of the
    op's arguments are lists of tensors."""

    def __init__(self, op, forward: Callable, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None, lists: bool = False):
        self.op, self.forward, self.setup_context, self.backward = op, forward, setup_context, backward
        self.lists = lists  # whether some arguments are lists of tensors
        self.label = f"{getattr(op, '_namespace', 'fastsd')}.{getattr(op, '_name', getattr(op, '__name__', 'op'))}"
        if backward is not None:  # else not differentiable: needs_grad must be False
            op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, tensors: Sequence[torch.Tensor], needs_grad: bool, *args):
        """``op(*args)``; ``tensors``: every tensor among args; ``needs_grad``: whether autograd must
        record the call (grad mode on and a differentiable input requires grad)."""
        if not eager(tensors):
            return self.op(*args)
        if _profiling():
            with torch.profiler.record_function(self.label):
                return self._eager(needs_grad, args)
        return self._eager(needs_grad, args)

    def _eager(self, needs_grad: bool, args: tuple):
        if not needs_grad and torch.is_grad_enabled():
            # The registered op's body runs below autograd: no graph of its aten ops (the torch
            # backend's) through an input the caller did not name, whichever backend runs.
            # (_set_grad_enabled: torch.no_grad() costs 1.6 us a call here, this 0.3 us.)
            _set_grad_enabled(False)
            try:
                return self.forward(*args)
            finally:
                _set_grad_enabled(True)
        if not needs_grad:
            return self.forward(*args)
        if self.lists:
            lengths = tuple(len(a) if isinstance(a, list) else -1 for a in args)
            flat = [t for a in args for t in (a if isinstance(a, list) else (a,))]
            return _Function.apply(self, lengths, *flat)
        return _Function.apply(self, None, *args)
