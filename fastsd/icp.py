"""ICP refinement (SPEC section 5): :class:`ICPRefiner` and :class:`ICPDistiller`.

Layers, top to bottom:

* :class:`ICPRefiner` - validates, puts the model in eval mode (restoring every module's mode
  afterwards), and runs the K steps either eagerly or as one replayed CUDA graph. Both paths run
  the same step function, :meth:`ICPRefiner._run_steps`.
* ``torch.ops.fastsd.icp_update_`` - the fused in-place input update (x, m, v, m2 read once and
  written once), a ``torch.library`` custom op with a fake kernel;
* one implementation per backend, chosen by :mod:`fastsd._backend`: the Triton kernels in
  ``fastsd.kernels.icp_update`` (CUDA), and the reference :mod:`fastsd.reference.icp` ("torch",
  what runs on CPU tensors: the update is a few percent of a refinement step there, see
  ``fastsd.bench``).

The step counter never lives on the device: step t's bias corrections are Python floats computed
from t, so the eager path needs no host sync and a captured graph bakes in each step's constants
(K is fixed per refiner, so they are the same on every replay).
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import dataclasses
import functools
import importlib
import math
import numbers
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from . import _validate as V
from .reference import icp as ref

METHODS = ref.METHODS
CUDA_GRAPH_MODES = ("auto", "never", "always")
FEATURE_KINDS = ("mse", "l1", "smooth_l1", "cosine")


# --- the fused update op -------------------------------------------------------------------------


@torch.library.custom_op("fastsd::icp_update_", mutates_args=("x", "m", "v", "m2"))
def _icp_update_op(
    x: torch.Tensor,
    g: torch.Tensor,
    m: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    m2: Optional[torch.Tensor],
    method: str,
    step: int,
    step_size: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    clamp_lo: Optional[float],
    clamp_hi: Optional[float],
) -> None:
    tensors = [t for t in (x, g, m, v, m2) if t is not None]
    fn = _backend.select("icp_update", *tensors)
    fn(x, g, m, v, m2, method, step, step_size, beta1, beta2, beta3, alpha, eps, clamp_lo, clamp_hi)


@_icp_update_op.register_fake
def _(x, g, m, v, m2, method, step, step_size, beta1, beta2, beta3, alpha, eps, clamp_lo, clamp_hi):
    return None


def new_state(x: torch.Tensor, method: str):
    """Fresh optimiser state ``(m, v, m2)`` for ``method`` (None where unused): zeros of dtype
    ``compute_dtype(x.dtype)`` (float32, float64 for float64 x) with x's layout."""
    if method == "sgd":
        return None, None, None
    dtype = ref.compute_dtype(x.dtype)
    m = torch.zeros_like(x, dtype=dtype, memory_format=torch.preserve_format)
    v = torch.zeros_like(m, memory_format=torch.preserve_format)
    m2 = torch.zeros_like(m, memory_format=torch.preserve_format) if method == "ademamix" else None
    return m, v, m2


def icp_update_(x, g, m, v, m2, *, method: str, step: int, step_size: float, betas=(0.9, 0.999, 0.9999),
                alpha: float = 5.0, eps: float = 1e-8, clamp: Optional[Tuple[Optional[float], Optional[float]]] = None):
    """One fused in-place step of the ICP input update (formulas: :mod:`fastsd.reference.icp`).

    ``x`` (any float dtype) and ``m, v, m2`` (from :func:`new_state`) are updated in place; ``g`` is
    x's gradient (copied to x's layout if its strides differ). ``step`` is 1-based.
    """
    if g.dtype != x.dtype or g.stride() != x.stride():
        g = torch.empty_like(x).copy_(g)
    lo, hi = clamp if clamp is not None else (None, None)
    b1, b2 = betas[0], betas[1]
    b3 = betas[2] if len(betas) > 2 else 0.9999
    _icp_update_op(x, g, m, v, m2, method, int(step), float(step_size), float(b1), float(b2), float(b3),
                   float(alpha), float(eps), None if lo is None else float(lo), None if hi is None else float(hi))


def _triton_reasons(x, *others) -> List[str]:
    # others: g and the state tensors (absent when asked about x alone, e.g. by fastsd.info)
    out = []
    if x.dtype not in V.FLOAT_DTYPES:
        out.append(f"x has dtype {x.dtype}; the kernel takes float32/float16/bfloat16/float64")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        out.append("x is not dense (contiguous or channels_last)")
    if any(t.shape != x.shape or t.stride() != x.stride() for t in others):
        out.append("g and the state must have x's shape and strides")
    if any(t.dtype != ref.compute_dtype(x.dtype) for t in others[1:]):
        out.append("the state must be float32 (float64 for float64 x)")
    return out


_backend.register("icp_update", "torch")(ref.icp_update_)


@_backend.register("icp_update", "triton", reasons=_triton_reasons)
def _icp_update_triton(*args):
    from .kernels import icp_update as k

    k.icp_update_(*args)


# --- model state -------------------------------------------------------------------------------


@contextlib.contextmanager
def _modes(model: nn.Module, training: bool):
    """Every module in ``training`` mode inside; each module's own previous flag restored after,
    also on exceptions (flags are set directly so train() overrides do not run twice)."""
    saved = [(mod, mod.training) for mod in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for mod, mode in saved:
            mod.training = mode


_STOCK_BATCH_NORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Every buffer left as it was by the forward passes inside, with no copy of the BatchNorm ones.

    BatchNorm layers (torch's own forward: ``_BatchNorm`` and ``SyncBatchNorm``) in train mode get
    ``track_running_stats = False`` inside: their forward then normalises with the batch's
    statistics, as in train mode, and passes no running statistics to ``F.batch_norm``, so
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are neither updated nor written in
    place (an in-place write would bump their version counters and break an autograd graph that
    saved them). BatchNorm in eval mode only reads them. The buffers of any other module (whose
    forward we cannot read: InstanceNorm with running statistics, a BatchNorm subclass with its own
    forward, a custom counter) are replaced by copies inside and the originals put back after.
    """
    frozen, saved = [], []
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and type(mod).forward in _STOCK_BATCH_NORM_FORWARDS:
            if mod.training and mod.track_running_stats:
                frozen.append(mod)
        else:
            saved.extend((mod, name, b) for name, b in mod._buffers.items() if b is not None)
    for mod in frozen:
        mod.track_running_stats = False
    with torch.no_grad():
        for mod, name, b in saved:
            mod._buffers[name] = b.clone()
    try:
        yield
    finally:
        for mod in frozen:
            mod.track_running_stats = True
        for mod, name, b in saved:
            mod._buffers[name] = b


def default_logits(output):
    """The logits in a model's output: the output itself when it is a tensor, the first element of
    a tuple or list, ``output["logits"]`` of a mapping (a dict, a Hugging Face ``ModelOutput``).
    Anything else (or a first element that is not a tensor) raises TypeError asking for
    ``logits_fn``."""
    picked = output
    if isinstance(output, (tuple, list)) and output:
        picked = output[0]
    elif isinstance(output, collections.abc.Mapping) and "logits" in output:
        picked = output["logits"]
    if not isinstance(picked, torch.Tensor):
        raise TypeError(f"fastsd: the model returned {_describe(output)}; the default logits_fn takes the "
                        f"output itself when it is a tensor, the first element of a tuple or list, or a "
                        f"mapping's 'logits'. Pass logits_fn= (e.g. lambda out: out[1]) and, for a task loss "
                        f"that reads more than the logits, loss_fn=(output, y) -> scalar")
    return picked


def _describe(output) -> str:
    if isinstance(output, (tuple, list)):
        inner = type(output[0]).__name__ if output else "nothing"
        return f"a {type(output).__name__} whose first element is {inner}"
    return f"a {type(output).__name__}"


def _default_loss(output, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(default_logits(output), y)


def _cross_entropy_of(logits_fn: Callable, output, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_fn(output), y)


def _task_loss(fn: str, loss_fn: Optional[Callable], logits_fn: Optional[Callable]) -> Callable:
    """The task loss ``(model output, y) -> scalar`` of ``loss_fn`` and ``logits_fn``: ``loss_fn``
    itself when given (it reads the whole output), else cross-entropy of ``logits_fn(output)``
    (default: :func:`default_logits`). The same object for the same arguments' defaults, so a
    refiner's CUDA-graph key does not change."""
    for name, value in (("loss_fn", loss_fn), ("logits_fn", logits_fn)):
        if value is not None and not callable(value):
            raise TypeError(f"{fn}: {name} must be callable or None, got {type(value).__name__}")
    if loss_fn is not None:
        return loss_fn
    if logits_fn is None:
        return _default_loss
    return functools.partial(_cross_entropy_of, logits_fn)


# --- which pass is running: a trainer's own hooks can tell fastsd's extra passes apart -----------

_PASS = threading.local()


class _TracedPass:
    """The pass under torch.compile (Dynamo traces attribute writes on a plain object, not on a
    ``threading.local``; compiled code runs in the calling thread). ``kind`` is set on the instance
    from the start: a compiled step guards on what the object holds, and a first call that left an
    attribute behind where there was none made the second step compile again."""

    def __init__(self):
        self.kind: Optional[str] = None


_TRACED_PASS = _TracedPass()


def current_pass() -> Optional[str]:
    """Which of fastsd's forward passes the calling thread is in, for a trainer's own hooks:

    * ``"student"``: :class:`ICPDistiller`'s forward of the real batch x (train mode, with grad:
      the pass a trainer's own forward would have been);
    * ``"refine"``: one of :class:`ICPRefiner`'s K passes (eval mode; grad for the input only);
    * ``"target"``: the distiller's forward of the refined input (x's mode, under no_grad);
    * None: outside fastsd's calls (the trainer's own forwards, evaluation).

    With CUDA graphs the refiner's passes run Python (hooks included) at capture only, not on
    replays.
    """
    if _compiling():
        return _TRACED_PASS.kind
    return getattr(_PASS, "kind", None)


def refining() -> bool:
    """True during every forward fastsd runs on a refined input: the refiner's K passes and the
    distiller's target pass (``current_pass() in ("refine", "target")``). A trainer's forward hook
    that keeps features should skip these: they are not the real batch's, and the target pass's
    outputs carry no graph. (The distiller's own hooks already do.)"""
    return current_pass() in ("refine", "target")


@contextlib.contextmanager
def _in_pass(kind: str):
    holder = _TRACED_PASS if _compiling() else _PASS
    previous = getattr(holder, "kind", None)
    holder.kind = kind
    try:
        yield
    finally:
        holder.kind = previous


# --- the refiner -------------------------------------------------------------------------------


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    x_in: torch.Tensor
    y_in: torch.Tensor
    x_buf: torch.Tensor
    state: tuple
    stream: Optional["torch.cuda.Stream"] = None  # the stream the static buffers were allocated on
    used_on: set = dataclasses.field(default_factory=set)  # other streams recorded on the buffers

    def replay_on(self, stream) -> None:
        """Before a replay on ``stream``: when the buffers are dropped (eviction, reset(), GC), the
        allocator frees them on the stream they were allocated on; a replay queued on another stream
        may still read or write them then, so that stream is recorded on them (once per stream)."""
        if stream is None or stream == self.stream or stream in self.used_on:
            return
        for t in (self.x_in, self.y_in, self.x_buf) + tuple(s for s in self.state if s is not None):
            t.record_stream(stream)
        self.used_on.add(stream)


@dataclass
class _KeyRecord:
    """What the graph cache remembers of one key without the parameter storage (shape, dtype,
    device, labels, autocast, hyper-parameters)."""
    captures: int = 0
    failures: int = 0
    eager: bool = False  # auto gave up on graphs for this key (warned when it did)


# auto stops capturing a key after this many captures (each one a miss: new parameter storage, as
# FSDP or ``param.data = ...`` give on every call, or an eviction by more keys than max_graphs) ...
_MAX_CAPTURES = 3
# ... or after this many failed captures (one may be transient; a host sync fails every time).
_MAX_FAILURES = 2
_MAX_KEY_RECORDS = 256
# One capture at a time per device (they share the device's side stream); the warm-ups, on the
# callers' own streams, run outside these locks.
_CAPTURE_LOCKS: Dict[int, "threading.RLock"] = {}
_CAPTURE_LOCKS_LOCK = threading.Lock()
_SIDE_STREAMS: Dict[int, "torch.cuda.Stream"] = {}  # device index -> the side stream of its captures


def _capture_lock(index: int) -> "threading.RLock":
    with _CAPTURE_LOCKS_LOCK:
        lock = _CAPTURE_LOCKS.get(index)
        if lock is None:
            lock = _CAPTURE_LOCKS[index] = threading.RLock()
        return lock


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _held(lock):
    """``lock`` as a context manager, or nothing while torch.compile traces (Dynamo cannot enter a
    lock; the compiled code is one frame that runs the refinement eagerly)."""
    return contextlib.nullcontext() if _compiling() else lock


def _on_device(x: torch.Tensor):
    """x's CUDA device made current (for the graph path's streams and for launches), else nothing."""
    if x.device.type != "cuda" or _compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def _check_batch(fn: str, x, y) -> None:
    """x: a floating-point batch; y: targets with x's batch size (metadata only)."""
    V.tensor(fn, "x", x, min_ndim=1)
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    V.tensor(fn, "y", y, min_ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: y must have x's batch size {x.shape[0]} as its first dim, got shape {tuple(y.shape)}")


class ICPRefiner:
    """Move x a few steps *down* the loss: ``x_refined = refiner(x, y)`` (SPEC section 5).

    ``x_0 = x``; for t = 0..K-1: ``g_t = d loss_fn(model(x_t), y) / d x_t``, then
    ``x_{t+1} = x_t - step_size * u_t`` with

    * ``sgd``: ``u_t = g_t``;
    * ``adam``: ``m_hat / (sqrt(v_hat) + eps)``, bias-corrected (the first step is ``~ sign(g)``:
      exactly ``g / (|g| + eps)``);
    * ``ademamix``: ``(m1_hat + alpha * m2) / (sqrt(v_hat) + eps)``, slow EMA m2 with
      ``beta3 = 0.9999`` (or ``betas[2]``) and ``alpha = 5`` (``ademamix_alpha``), no bias
      correction on m2;

    then ``x_{t+1} = clamp(x_{t+1}, *clamp)`` when ``clamp=(lo, hi)`` is given (either may be
    None). The optimiser state is fresh for every call; it is float32 for 16/32-bit x and float64
    for float64 x. The update of x, m, v (m2) is one fused pass (``torch.ops.fastsd.icp_update_``).
    x itself keeps its dtype and is rounded to it after every step: for float16/bfloat16 x, steps
    smaller than half an ulp (bfloat16 near 1: 2^-9) round away; refine float32 x under
    ``torch.autocast`` instead.

    Args:
        model: the network; run in eval mode while refining. Every module's training flag is
            restored afterwards, also when an exception is raised. A ``DistributedDataParallel``
            wrapper is unwrapped (``refiner.model`` is its ``.module``): the refinement
            differentiates the input only, and a grad-enabled forward through the wrapper would
            prepare the reducer for a backward that never comes, failing the next training
            backward. A model with DDP inside it or given to composable ``replicate()`` cannot be
            unwrapped: ValueError. Parameters' ``.grad`` and all
            buffers are left untouched (the input gradient is ``torch.autograd.grad(loss, x)``).
        steps: K >= 0. ``steps=0`` returns a copy of x.
        step_size: > 0.
        method: ``"sgd"``, ``"adam"`` or ``"ademamix"``.
        betas: ``(beta1, beta2)`` or, for ademamix, ``(beta1, beta2, beta3)``; each in [0, 1).
        eps: >= 0, added to ``sqrt(v_hat)``.
        loss_fn: ``loss_fn(model(x), y) -> scalar``, given the model's whole output; default mean
            cross-entropy of :func:`default_logits` (the output when it is a tensor, a tuple's
            first element, a mapping's ``"logits"``).
        clamp: None or ``(lo, hi)``.
        cuda_graph: ``"auto"``: on CUDA, the K steps are captured into one CUDA graph over static
            buffers (warm-up on the caller's stream, capture on a side stream of x's device, with
            a cuBLAS workspace of its own) and replayed for every
            later call with the same key: x's shape, strides, dtype and device, y's shape, strides
            and dtype, the autocast state, the hyper-parameters and ``loss_fn``, and the address of
            every parameter and buffer. Anything else in the key is a new capture; at most
            ``max_graphs`` graphs are kept (least recently used dropped). A key captured 3 times
            (parameter storage that changes per call, as FSDP or ``param.data = ...`` give, or
            more keys than ``max_graphs`` in turn) runs eagerly from then on, with one warning; so
            does a key whose capture failed twice (a host sync, a data-dependent shape), with a
            warning naming the cause at each failure. Models that contain ``nn.DataParallel`` over
            several GPUs or FSDP always run eagerly (one warning). ``"never"``: always eager.
            ``"always"``: the graph (recaptured as often as needed) or an error (CPU tensors,
            capture failure, DataParallel, FSDP).
            The graph reads the model's parameters in place: optimiser steps and
            ``load_state_dict`` are seen by later replays. Python side effects of the model's
            forward (hooks, counters) happen at capture only, not on replays. A hook can tell
            these passes from the trainer's own with :func:`refining` / :func:`current_pass`. All graphs of a
            refiner share one memory pool (per device); :meth:`reset` drops them and the pool.
            Under torch.compile the refinement is traced eagerly.
        ademamix_alpha: AdEMAMix's alpha (5).
        max_graphs: size of the graph cache (4).

    Returns (from ``refiner(x, y)``): a new tensor with x's shape, dtype, device and layout that
    does not require grad; x itself is never modified. Works under ``torch.no_grad()`` callers (grad
    is enabled for x inside) and under ``torch.autocast``. Threads may share a refiner: its calls
    run one at a time (they share the model's training flags and the graphs' static buffers), and
    one capture runs at a time per device (the warm-ups outside that lock).
    """

    def __init__(self, model: nn.Module, steps: int = 5, step_size: float = 2e-3, method: str = "adam",
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 clamp: Optional[Tuple[Optional[float], Optional[float]]] = None, cuda_graph: str = "auto", *,
                 ademamix_alpha: float = 5.0, max_graphs: int = 4):
        fn = "fastsd.ICPRefiner"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"{fn}: steps must be an int >= 0, got {type(steps).__name__}")
        if steps < 0:
            raise ValueError(f"{fn}: steps must be >= 0, got {steps}")
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
        betas = _betas(fn, betas, method)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 <= eps < math.inf):
            raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{fn}: loss_fn must be callable or None, got {type(loss_fn).__name__}")
        if cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"{fn}: cuda_graph must be one of {CUDA_GRAPH_MODES}, got {cuda_graph!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, numbers.Integral) or max_graphs < 1:
            raise ValueError(f"{fn}: max_graphs must be an int >= 1, got {max_graphs!r}")
        # The refinement differentiates the input only: run through a DDP wrapper with grad enabled it
        # would prepare the reducer (and broadcast buffers) for a backward that never comes, and the
        # next training backward would fail ("Expected to have finished reduction").
        self.model = unwrap(model, data_parallel=False)
        ddp = _replicated(self.model)
        if ddp is not None:
            raise ValueError(f"{fn}: the model runs {ddp}: its forward prepares the DDP reducer for a backward "
                             f"the refinement (input gradients only) never runs, so the next training backward "
                             f"would fail. Pass the DistributedDataParallel wrapper itself as model (the refiner "
                             f"runs its .module) or the module it wraps")
        self.steps = int(steps)
        self.step_size = V.positive_float(fn, "step_size", step_size)
        self.method = method
        self.betas = betas
        self.eps = float(eps)
        self.loss_fn = loss_fn if loss_fn is not None else _default_loss
        self.clamp = _clamp(fn, clamp)
        self.cuda_graph = cuda_graph
        if isinstance(ademamix_alpha, bool) or not isinstance(ademamix_alpha, numbers.Real):
            raise TypeError(f"{fn}: ademamix_alpha must be a number, got {type(ademamix_alpha).__name__}")
        if not math.isfinite(ademamix_alpha):
            raise ValueError(f"{fn}: ademamix_alpha must be finite, got {ademamix_alpha}")
        self.ademamix_alpha = float(ademamix_alpha)
        self.max_graphs = int(max_graphs)
        self._lock = threading.RLock()
        self._init_graph_state()

    def _init_graph_state(self) -> None:
        self._graphs: "collections.OrderedDict[tuple, _Graph]" = collections.OrderedDict()
        self._keys: "collections.OrderedDict[tuple, _KeyRecord]" = collections.OrderedDict()
        # device index -> the memory pool its graphs share (a graph_pool_handle), while one is alive
        self._pools: Dict[int, tuple] = {}
        self._replay_streams: Dict[int, "torch.cuda.Stream"] = {}  # device index -> stream of the last replay
        self._graphs_off: Optional[str] = None  # why auto runs this model eagerly (warned once)

    def __getstate__(self):  # copy.deepcopy / pickle: no lock, no graphs
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_lock", "_graphs", "_keys", "_pools", "_replay_streams", "_graphs_off")}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._init_graph_state()

    def __repr__(self) -> str:
        return (f"ICPRefiner(steps={self.steps}, step_size={self.step_size}, method={self.method!r}, "
                f"betas={self.betas}, eps={self.eps}, clamp={self.clamp}, cuda_graph={self.cuda_graph!r})")

    def reset(self) -> None:
        """Drop every captured CUDA graph and their memory pool, and forget which keys run eagerly."""
        with self._lock:
            self._init_graph_state()

    # -- the step function, shared by the eager path and the captured graph ----------------------

    def _run_steps(self, x_buf: torch.Tensor, y: torch.Tensor, state: tuple) -> None:
        """K in-place steps on ``x_buf`` (and the state); no host sync, no data-dependent allocation."""
        m, v, m2 = state
        betas = self.betas + (0.9999,) if len(self.betas) == 2 else self.betas
        for step in range(1, self.steps + 1):
            xt = x_buf.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = self.loss_fn(self.model(xt), y)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError("fastsd.ICPRefiner: loss_fn must return a scalar tensor, got "
                                     + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                                        else type(loss).__name__))
                (g,) = torch.autograd.grad(loss, xt, allow_unused=True, materialize_grads=True)
            with torch.no_grad():
                icp_update_(x_buf, g, m, v, m2, method=self.method, step=step, step_size=self.step_size,
                            betas=betas, alpha=self.ademamix_alpha, eps=self.eps, clamp=self.clamp)

    # -- public call ------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fn = "fastsd.ICPRefiner"
        _check_batch(fn, x, y)
        V.same_device(fn, "x", x, y=y)
        with torch.inference_mode(False), _held(self._lock), _on_device(x):
            use_graph = self._use_graph(x)
            if self.steps == 0:
                return x.detach().clone()
            with _modes(self.model, False), _in_pass("refine"):
                return self._replay(x, y) if use_graph else self._eager(x, y)

    # -- CUDA graphs --------------------------------------------------------------------------

    def _use_graph(self, x: torch.Tensor) -> bool:
        if self.cuda_graph == "never":
            return False
        if x.device.type != "cuda":
            if self.cuda_graph == "always":
                raise ValueError(f"fastsd.ICPRefiner: cuda_graph='always' needs CUDA tensors, x is on "
                                 f"{x.device}; use cuda_graph='auto' or 'never'")
            return False
        # Inside the caller's own capture (or torch.compile's trace): eager, recorded by the caller.
        return not _compiling() and not torch.cuda.is_current_stream_capturing()

    def _key(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[tuple, tuple]:
        """(everything a graph depends on but the parameter storage, the parameter storage)."""
        dev = x.device
        autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        hparams = (self.steps, self.step_size, self.method, self.betas, self.eps, self.clamp,
                   self.ademamix_alpha, self.loss_fn)
        storage = tuple(t.data_ptr() for t in self.model.parameters()) + tuple(
            t.data_ptr() for t in self.model.buffers())
        return (tuple(x.shape), x.stride(), x.dtype, dev, tuple(y.shape), y.stride(), y.dtype, autocast,
                hparams), storage

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # First: a capture made now (its warm-up, and its allocations from the shared pool) must
        # also come after the last replay, which may still run on another thread's stream.
        stream = self._after_last_replay(x.device)
        entry = self._graph_for(x, y)
        if entry is None:
            return self._eager(x, y)
        entry.replay_on(stream)
        entry.x_in.copy_(x)
        entry.y_in.copy_(y)
        entry.graph.replay()
        return entry.x_buf.clone()

    def _after_last_replay(self, dev: torch.device) -> None:
        """Order this replay after the last one: the graphs share a memory pool (and each its static
        buffers), so replays on two streams must not overlap."""
        if dev.type != "cuda":  # (the graph path's bookkeeping tested with stand-in graphs on CPU)
            return None
        stream = torch.cuda.current_stream(dev)
        last = self._replay_streams.get(dev.index)
        if last is not None and last != stream:
            stream.wait_stream(last)
        self._replay_streams[dev.index] = stream
        return stream

    def _graph_for(self, x: torch.Tensor, y: torch.Tensor) -> Optional[_Graph]:
        """The graph for this call (captured now if need be), or None: run this call eagerly."""
        if self._graphs_off is not None:
            return None
        try:
            shape_key, storage = self._key(x, y)
        except RuntimeError as exc:  # a parameter without a data pointer (FSDP2's DTensor, ...)
            return self._stop_graphs(f"a parameter or buffer has no fixed address ({exc})")
        key = (shape_key, storage)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry
        blocker = _graph_blocker(self.model)
        if blocker is not None:
            return self._stop_graphs(blocker)
        record = self._keys.get(shape_key)
        if record is None:
            record = self._keys[shape_key] = _KeyRecord()
            while len(self._keys) > _MAX_KEY_RECORDS:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(shape_key)
        if record.eager:
            return None
        if record.captures >= _MAX_CAPTURES and self.cuda_graph == "auto":
            record.eager = True
            warnings.warn(f"fastsd.ICPRefiner: this shape was captured into a CUDA graph {record.captures} "
                          f"times (the parameters' storage changes between calls, as under FSDP or with "
                          f"param.data = ..., or more shapes than max_graphs={self.max_graphs} take turns); "
                          f"running it eagerly from now on", RuntimeWarning, stacklevel=4)
            return None
        try:
            entry = self._capture(x, y)
        except _CaptureError as exc:
            record.failures += 1
            cause = exc.__cause__
            if self.cuda_graph == "always":
                raise RuntimeError(f"fastsd.ICPRefiner: cuda_graph='always' but the refinement could "
                                   f"not be captured into a CUDA graph: {cause!r}. Models with "
                                   f"host syncs (.item(), data-dependent shapes) cannot be captured; "
                                   f"use cuda_graph='auto' or 'never'.") from cause
            record.eager = record.failures >= _MAX_FAILURES
            then = ("running this shape eagerly from now on" if record.eager
                    else "running this call eagerly; the next call of this shape tries again")
            warnings.warn(f"fastsd.ICPRefiner: CUDA graph capture failed ({cause!r}); {then}",
                          RuntimeWarning, stacklevel=4)
            return None
        else:
            record.captures += 1
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            return entry
        finally:
            # (also on KeyboardInterrupt) the pool of a device with no graph left (evicted, or its
            # only capture failed) is freed by the allocator: forget it
            self._drop_idle_pools()

    def _stop_graphs(self, reason: str) -> None:
        if self.cuda_graph == "always":
            raise RuntimeError(f"fastsd.ICPRefiner: cuda_graph='always' but {reason}; use cuda_graph='auto' "
                               f"or 'never'")
        self._graphs_off = reason
        warnings.warn(f"fastsd.ICPRefiner: no CUDA graphs for this model: {reason}; running eagerly",
                      RuntimeWarning, stacklevel=5)
        return None

    def _eager(self, x, y):
        x_buf = x.detach().clone()
        self._run_steps(x_buf, y, new_state(x_buf, self.method))
        return x_buf

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> _Graph:
        x_in = x.detach().clone()
        y_in = y.detach().clone()
        x_buf = torch.empty_like(x_in)
        state = new_state(x_in, self.method)

        def body():
            x_buf.copy_(x_in)
            for s in state:
                if s is not None:
                    s.zero_()
            self._run_steps(x_buf, y_in, state)

        pool = None
        if x.device.type == "cuda":  # (CPU: stand-in graphs in tests)
            pool = self._pools.get(x.device.index)
            if pool is None:
                pool = self._pools[x.device.index] = torch.cuda.graph_pool_handle()
        stream = torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None
        return _Graph(_cuda_graph_of(body, x.device, pool), x_in, y_in, x_buf, state, stream)

    def _drop_idle_pools(self) -> None:
        """Forget the pool of a device none of whose graphs is left (evicted, or a failed capture).
        Each graph holds a use of its pool and the allocator frees a pool once no graph uses it;
        the next capture must then ask for a new pool: beginning a capture into a freed pool's id
        is an internal assertion failure in torch's allocator."""
        live = {key[0][3].index for key in self._graphs}
        for index in [i for i in self._pools if i not in live]:
            del self._pools[index]


def unwrap(model: nn.Module, *, data_parallel: bool = True) -> nn.Module:
    """The module inside ``DistributedDataParallel`` wrappers (and, with ``data_parallel``,
    ``DataParallel`` ones), any depth."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    wrappers = (DistributedDataParallel, DataParallel) if data_parallel else (DistributedDataParallel,)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _replicated(model: nn.Module) -> Optional[str]:
    """Where ``model`` (already unwrapped) runs a DDP reducer (None: nowhere): a
    ``DistributedDataParallel`` inside it, or a module given to composable ``replicate``."""
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:  # (a torch built without distributed)
        _get_registry = None
    for name, mod in model.named_modules():
        where = name or "the model itself"
        if isinstance(mod, DistributedDataParallel):
            return f"DistributedDataParallel at {where!r}"
        if _get_registry is not None and "replicate" in _composable_apis(_get_registry, mod):
            return f"composable replicate() at {where!r}"
    return None


def _composable_apis(get_registry, mod: nn.Module):
    try:
        return get_registry(mod) or {}
    except Exception:  # a wrapper whose __getattr__ forwards to a module it does not have yet
        return {}


def _data_parallel(model: nn.Module) -> Optional[str]:
    """Where ``model`` runs ``nn.DataParallel`` over several devices (None: nowhere). With one
    device (or none: CPU) DataParallel calls its module directly."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.DataParallel) and len(mod.device_ids) > 1:
            return f"nn.DataParallel over {len(mod.device_ids)} devices at {name or 'the model itself'!r}"
    return None


@functools.lru_cache(maxsize=None)
def _fsdp_types() -> tuple:
    """FSDP's module classes in this torch (the wrapper, and the class fully_shard mixes in)."""
    found = []
    for module, name in (("torch.distributed.fsdp", "FullyShardedDataParallel"),
                         ("torch.distributed.fsdp", "FSDPModule"),
                         ("torch.distributed._composable.fsdp", "FSDPModule")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _graph_blocker(model: nn.Module) -> Optional[str]:
    """Why the refinement of ``model`` must not be captured into a CUDA graph (None: it may be)."""
    dp = _data_parallel(model)
    if dp is not None:
        return (f"the model runs {dp}: the replicas on the other devices run in other threads and "
                f"streams, outside the capture, so replays would not rerun them")
    fsdp = _fsdp_types()
    for name, mod in model.named_modules():
        if fsdp and isinstance(mod, fsdp):
            return (f"the model is sharded by FSDP (at {name or 'the model itself'!r}): its forward gathers the "
                    f"parameters with collectives, and a capture or a fallback on one rank but not the others "
                    f"would leave the ranks waiting on different collectives")
    return None


def _discard(graph: "torch.cuda.CUDAGraph", dev: torch.device, pool, *, end: bool) -> None:
    """Leave a failed capture: end it if capture_end was not called yet (the stream must leave
    capture mode), take it off the allocator's captures underway and give back its use of the pool
    now (the exception's traceback would keep the graph, and the pool's memory, until the next
    garbage collection)."""
    ended = False
    if end:
        try:
            graph.capture_end()
            ended = True
        except Exception:
            pass
    if not ended:
        _stop_allocating_to(dev, pool)
    try:
        graph.reset()  # gives the pool back if the capture ended
    except Exception:
        pass


def _stop_allocating_to(dev: torch.device, pool) -> None:
    """Take a failed capture off the allocator's list of captures underway, and give back its use
    of the pool. capture_end does both (the second when the graph is destroyed) only when
    cudaStreamEndCapture succeeded; a capture left underway makes the caching allocator stop
    processing its events (blocks freed on other streams are never reused) and test every
    allocation against it, and the pool's use would keep its memory for good."""
    end = (getattr(torch._C, "_cuda_endAllocateToPool", None)
           or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None))  # torch < 2.6
    release = getattr(torch._C, "_cuda_releasePool", None)
    if end is None:
        return
    try:
        end(dev.index, pool)
    except Exception:  # (a pybind TypeError where an older torch's binding takes other arguments)
        return  # capture_end got that far itself: the graph gives the pool back when destroyed
    if release is not None:
        release(dev.index, pool)


def _clear_cublas_workspaces() -> None:
    """Drop cuBLAS's per-(handle, stream) workspaces (torch < 2.1 has no binding: nothing to do).

    A capture bakes the address of the capture stream's workspace into its graph. Created by an
    eager call (the warm-up, a replay's neighbour) it lives in the ordinary pool, and torch frees
    it under every live graph: ``CUDAGraph::reset()`` (an eviction, :meth:`ICPRefiner.reset`, a
    refiner collected, a failed capture discarded, another refiner's graph dropped) clears the
    capture stream's workspaces, ``torch.compile(mode="reduce-overhead")`` clears them all. Cleared
    right before ``capture_begin``, the capture allocates its own workspace inside its pool, which
    lives as long as its graph; cleared again after, no eager call uses that one (as inductor's
    CUDA graph trees do)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _cuda_graph_of(body: Callable[[], None], dev: torch.device, pool) -> "torch.cuda.CUDAGraph":
    """Warm ``body`` up on the caller's stream, then capture one call of it into a CUDA graph
    allocating from ``pool`` on ``dev``'s side stream, one capture at a time per device.

    Not ``torch.cuda.graph``: that context manager synchronises the device and empties the
    allocator's and the pinned-host caches at every capture, captures every device's work on one
    stream (made on whichever device came first), and when the capture fails it ends the capture
    before restoring the stream (so the thread stays on the capture stream) and raises
    capture_end's error instead of the cause. Here the caller's stream is restored on every exit,
    a failure raises :class:`_CaptureError` from the body's own exception, and the allocator stops
    sending allocations to the pool.

    The device's lock is held from ``capture_begin`` to ``capture_end`` only: the warm-up runs the
    user's model (which may wait on other threads, or refine with refiners of its own) on the
    caller's own stream, never on the side stream that another thread may be capturing on; it
    shares no state with the capture, whose cuBLAS workspace is its own (see
    :func:`_clear_cublas_workspaces`).
    """
    # autocast's weight-cast cache would hand the graph tensors cast outside it: mirror the
    # caller's autocast state with the cache off (as torch.cuda.make_graphed_callables requires).
    enabled, dtype = torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type)

    def autocast():
        return torch.autocast(dev.type, dtype=dtype, enabled=enabled, cache_enabled=False)

    # Warm-up: lazy initialisation (cuDNN/cuBLAS handles, autograd, Triton compilation) must not
    # happen inside the capture. Its errors are the model's own: raised as they are.
    with autocast():
        for _ in range(2):
            body()
    caller = torch.cuda.current_stream(dev)
    graph = torch.cuda.CUDAGraph()
    with _capture_lock(dev.index):
        side = _SIDE_STREAMS.get(dev.index)
        if side is None:
            side = _SIDE_STREAMS[dev.index] = torch.cuda.Stream(dev)
        side.wait_stream(caller)
        try:
            with torch.cuda.stream(side):
                _clear_cublas_workspaces()
                began = False
                try:
                    # thread_local: other threads' CUDA calls (their eager steps) do not break this capture.
                    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                    began = True
                    with autocast():
                        body()
                except BaseException as exc:
                    _discard(graph, dev, pool, end=began)
                    if isinstance(exc, Exception):
                        raise _CaptureError() from exc
                    raise
                try:
                    graph.capture_end()
                except Exception as exc:
                    _discard(graph, dev, pool, end=False)
                    raise _CaptureError() from exc
        finally:
            _clear_cublas_workspaces()
            caller.wait_stream(side)
    return graph


class _CaptureError(Exception):
    pass


def _betas(fn: str, betas, method: str) -> tuple:
    n_allowed = (2, 3) if method == "ademamix" else (2,)
    if not isinstance(betas, (tuple, list)) or len(betas) not in n_allowed:
        raise ValueError(f"{fn}: betas must be a pair (beta1, beta2)"
                         + (" or a triple (beta1, beta2, beta3)" if method == "ademamix" else "")
                         + f", got {betas!r}")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not (0.0 <= b < 1.0):
            raise ValueError(f"{fn}: betas must be numbers in [0, 1), got {tuple(betas)!r}")
    return tuple(float(b) for b in betas)


def _clamp(fn: str, clamp):
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"{fn}: clamp must be None or a pair (lo, hi), got {clamp!r}")
    lo, hi = clamp
    for b in (lo, hi):
        if b is not None and (isinstance(b, bool) or not isinstance(b, numbers.Real)):
            raise TypeError(f"{fn}: clamp bounds must be numbers or None, got {clamp!r}")
    if lo is not None and hi is not None and not lo <= hi:
        raise ValueError(f"{fn}: clamp must have lo <= hi, got {clamp!r}")
    return (None if lo is None else float(lo), None if hi is None else float(hi))


# --- the distiller -------------------------------------------------------------------------------


_DATA_PARALLEL = ("ICPDistiller aligns the features of one forward of the whole batch, caught by hooks in the "
                  "calling thread; nn.DataParallel's replicas share those hooks and run in parallel threads on "
                  "chunks of the batch. Use torch.nn.parallel.DistributedDataParallel (one process per GPU; "
                  "fastsd.recipes.ICPDistillation takes the DDP wrapper).")


def _feature_alignment_loss():
    """The fused :func:`fastsd.feature_alignment_loss` (looked up at call time, so tests can spy on it)."""
    from .losses import feature_alignment_loss

    return feature_alignment_loss


SCHEDULES = ("epoch", "step")


def _resolve_layers(fn: str, model: nn.Module, layers) -> List[str]:
    """``layers`` (names from ``model.named_modules()``, submodules of ``model``, or a mix) as names."""
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"{fn}: layers must be a non-empty sequence of module names or submodules of the model, "
                        f"got {layers!r}")
    named = dict(model.named_modules())
    named.pop("", None)
    name_of = {id(mod): name for name, mod in named.items()}
    names, unknown = [], []
    for i, layer in enumerate(layers):
        if isinstance(layer, str):
            if layer in named:
                names.append(layer)
            else:
                unknown.append(layer)
        elif isinstance(layer, nn.Module):
            if layer is model:
                raise ValueError(f"{fn}: layers must be submodules of the model, not the model itself "
                                 f"(layers[{i}])")
            if id(layer) not in name_of:
                raise ValueError(f"{fn}: layers must be submodules of the model; layers[{i}] (a "
                                 f"{type(layer).__name__}) is not inside it (a module of another copy of the "
                                 f"model, or one not registered as an attribute?); valid names: {list(named)}")
            names.append(name_of[id(layer)])
        else:
            raise TypeError(f"{fn}: layers must be module names (str) or submodules (nn.Module) of the model, "
                            f"got {type(layer).__name__} at layers[{i}]")
    if unknown:
        raise ValueError(f"{fn}: unknown layers {unknown} in layers; valid names: {list(named)}")
    return names


class ICPDistiller:
    """One ICP self-distillation loss: ``out = distiller(x, y, progress)`` (SPEC section 5).

    ``out = dict(loss, task, feature, alpha, logits, output)``:

    * x goes through the model in train mode (a model in eval mode is put in train mode for the
      call and every module's flag restored after; a model already in train mode is left as it is,
      so submodules the user froze in eval mode stay so): ``output = model(x)``,
      ``logits = logits_fn(output)``, ``task = loss_fn(output, y)`` (default: cross-entropy of the
      logits);
    * if ``p > warmup`` (``p``: the progress as the schedule reads it, below):
      ``x_r = refiner(x, y)`` (eval mode, see :class:`ICPRefiner`), the refined input runs under
      ``torch.no_grad()`` in the same mode as x to give the target features (BatchNorm buffers are
      left as they were by this pass, so the running statistics see each real batch once), and
      ``feature = feature_alignment_loss(features(x), targets, kind, layer_weights)``; else
      ``feature = 0``;
    * ``alpha = 1`` while ``p <= warmup``, else ``cos(pi/2 * (p - warmup) / (1 - warmup))``;
      ``loss = alpha * task + (1 - alpha) * feature``.

    ``logits`` and ``output`` are x's, with their graph (for accuracy and logging: detach them).
    The targets carry no graph, so gradient reaches the model only through x's own branch.
    Features are the outputs of the given layers, caught by forward hooks (registered once, in
    ``__init__``) during the distiller's own forwards only (a module called several times
    contributes its last output). Threads may share a distiller: its calls run one at a time. A
    hooked layer that runs in another thread during a call (``nn.DataParallel``'s replicas, or the
    same model used by another thread at that moment) raises RuntimeError: its output is not part
    of this call's forward. A model containing ``nn.DataParallel`` over several GPUs is refused
    (ValueError); use ``DistributedDataParallel`` (one process per GPU), as
    :class:`fastsd.recipes.ICPDistillation` does.

    **A trainer's own hooks.** Forward hooks the trainer put on the model fire on every pass of a
    call: the forward of x, the refiner's K passes (eval mode) and the target pass (no grad), in
    that order, so a hook that keeps "the last output" ends up holding the refined input's
    no-grad features. :func:`refining` (True during the refiner's and the target pass) and
    :func:`current_pass` (``"student"``, ``"refine"``, ``"target"``) tell them apart; or take
    what the trainer needs from the returned dict.

    **Schedule.** ``schedule="epoch"`` (default; the paper's trainer, which computes its weight
    once per epoch from ``epoch / epochs``): with ``epochs=E`` the progress is read as
    ``floor(progress * E) / E``, the start of the current epoch, so any per-step progress gives
    the per-epoch schedule; without ``epochs`` pass ``progress = epoch / epochs``. ``"step"``:
    progress is read as given, e.g. ``(epoch + i / len(loader)) / epochs``, and alpha changes
    every step. The two differ by up to ``sin(pi / (2 * E * (1 - warmup)))`` in alpha: 0.71 for
    2 epochs without warm-up, 0.21 for 10 epochs with ``warmup=0.25`` (with one epoch the
    epoch schedule never leaves the warm-up).

    Args:
        model: the network.
        layers: the modules whose outputs are aligned: names from ``model.named_modules()`` (e.g.
            ``["layer1", ..., "layer4"]``), the submodules themselves (``[model.layer1, ...]``), or
            a mix. Unknown names and modules that are not inside ``model`` raise ValueError
            listing the valid names.
        refiner: an :class:`ICPRefiner` (or any ``callable(x, y) -> x_refined``); default
            ``ICPRefiner(model, loss_fn=<this task loss>)``. A refiner you pass refines with its own
            ``loss_fn``: give it the same task loss for a model whose output is not plain logits.
        kind, layer_weights: as ``fastsd.feature_alignment_loss``'s ``kind`` and ``weights``.
        warmup: in [0, 1]. (The paper's trainer takes ``warmup_epochs = int(rate * epochs)``:
            pass ``warmup=warmup_epochs / epochs``.)
        loss_fn: the task loss ``loss_fn(output, y) -> scalar`` given the model's whole output (as
            ``ICPRefiner``'s); default cross-entropy of ``logits_fn(output)``.
        logits_fn: ``logits_fn(output) -> logits``; default :func:`default_logits` (the output
            when it is a tensor, the first element of a tuple or list, a mapping's ``"logits"``).
        schedule: ``"epoch"`` or ``"step"`` (above).
        epochs: the number of epochs, for ``schedule="epoch"`` (None: progress is taken as given).
    """

    def __init__(self, model: nn.Module, layers, refiner: Optional[Callable] = None,
                 kind: str = "mse", layer_weights="cosine", warmup: float = 0.25, *,
                 loss_fn: Optional[Callable] = None, logits_fn: Optional[Callable] = None,
                 schedule: str = "epoch", epochs: Optional[int] = None):
        fn = "fastsd.ICPDistiller"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        names = _resolve_layers(fn, model, layers)
        dp = _data_parallel(model)
        if dp is not None:
            raise ValueError(f"{fn}: the model runs {dp}. {_DATA_PARALLEL}")
        if kind not in FEATURE_KINDS:
            raise ValueError(f"{fn}: kind must be one of {FEATURE_KINDS}, got {kind!r}")
        if layer_weights is not None and not (isinstance(layer_weights, str) and layer_weights == "cosine"):
            if isinstance(layer_weights, str) or not isinstance(layer_weights, (list, tuple)) \
                    or len(layer_weights) != len(names):
                raise ValueError(f"{fn}: layer_weights must be None, 'cosine' or {len(names)} numbers "
                                 f"(one per layer), got {layer_weights!r}")
            if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in layer_weights):
                raise TypeError(f"{fn}: layer_weights must be numbers, got {layer_weights!r}")
        self.task_loss = _task_loss(fn, loss_fn, logits_fn)
        self.logits_fn = logits_fn if logits_fn is not None else default_logits
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise ValueError(f"{fn}: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if epochs is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
                raise ValueError(f"{fn}: epochs must be None or an int >= 1, got {epochs!r}")
            if schedule != "epoch":
                raise ValueError(f"{fn}: epochs is read by schedule='epoch' only; schedule={schedule!r} takes "
                                 f"the progress as given")
        if refiner is None:
            refiner = ICPRefiner(model, loss_fn=self.task_loss)
        elif not callable(refiner):
            raise TypeError(f"{fn}: refiner must be an ICPRefiner (or callable(x, y)), got {type(refiner).__name__}")
        self.model = model
        self.layers = tuple(names)
        self.refiner = refiner
        self.kind = kind
        self.layer_weights = layer_weights
        self.warmup = V.unit_interval(fn, "warmup", warmup)
        self.schedule = schedule
        self.epochs = None if epochs is None else int(epochs)
        self._modules = [dict(model.named_modules())[n] for n in self.layers]
        # (the calling thread's id, or None under torch.compile; the features caught so far)
        self._capture: Optional[Tuple[Optional[int], Dict[int, torch.Tensor]]] = None
        self._handles = [mod.register_forward_hook(self._hook(i)) for i, mod in enumerate(self._modules)]
        self._hooked = True
        self._lock = threading.RLock()

    def __getstate__(self):  # copy.deepcopy / pickle: no lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def scheduled(self, progress: float) -> float:
        """The progress the schedule reads: ``floor(progress * epochs) / epochs`` for
        ``schedule="epoch"`` with ``epochs``, else ``progress``."""
        progress = V.unit_interval("fastsd.ICPDistiller", "progress", progress)
        if self.schedule == "epoch" and self.epochs is not None:
            # (the tolerance: epoch / epochs may come back a rounding below the epoch)
            return math.floor(progress * self.epochs + 1e-9) / self.epochs
        return progress

    def alpha(self, progress: float) -> float:
        """Weight of the task loss at ``progress`` in [0, 1] (read by the schedule)."""
        progress = self.scheduled(progress)
        if progress <= self.warmup:
            return 1.0
        return math.cos(math.pi / 2 * (progress - self.warmup) / (1.0 - self.warmup))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            capture = self._capture
            if capture is None:  # outside the distiller's forwards (e.g. the refiner's passes): nothing to do
                return
            owner, feats = capture
            # A replica (DataParallel copies modules with their hooks) or another thread: not this
            # call's forward. (A thread id cannot be traced by torch.compile: owner is None when the
            # call itself is compiled, and the check is skipped in a compiled model's forward.)
            if module is not self._modules[i] or (owner is not None and not _compiling()
                                                  and threading.get_ident() != owner):
                raise RuntimeError(f"fastsd.ICPDistiller: layer {self.layers[i]!r} ran "
                                   + ("in a replica of the model" if module is not self._modules[i]
                                      else "in another thread")
                                   + f" during the distiller's call. {_DATA_PARALLEL}")
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"fastsd.ICPDistiller: layer {self.layers[i]!r} returned "
                                f"{type(output).__name__}; only tensor outputs can be aligned")
            feats[i] = output
        return hook

    def remove_hooks(self) -> None:
        """Detach the distiller's forward hooks from the model (it cannot be called afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooked = False

    @contextlib.contextmanager
    def _features(self):
        # The hooks are registered once, in __init__: registering them per call would make
        # torch.compile break the graph (RemovableHandle bumps a class attribute).
        if not self._hooked:  # (a bool: torch.compile cannot trace hook handles made outside it)
            raise RuntimeError("fastsd.ICPDistiller: remove_hooks() was called; make a new distiller")
        # layer index -> output: a dict, since Dynamo cannot assign into a list made outside a
        # compiled model's forward (its hooks write here); the caller's list is filled after
        feats: Dict[int, torch.Tensor] = {}
        self._capture = (None if _compiling() else threading.get_ident(), feats)
        out: List[torch.Tensor] = []
        try:
            yield out
        finally:
            self._capture = None
        missing = [n for i, n in enumerate(self.layers) if i not in feats]
        if missing:
            raise RuntimeError(f"fastsd.ICPDistiller: layers {missing} were not called by the model's forward")
        out.extend(feats[i] for i in range(len(self.layers)))

    def _task(self, output, y):
        """(task loss, logits) of x's output."""
        task = self.task_loss(output, y)
        if not isinstance(task, torch.Tensor) or task.dim() != 0:
            raise ValueError("fastsd.ICPDistiller: loss_fn must return a scalar tensor, got "
                             + (f"shape {tuple(task.shape)}" if isinstance(task, torch.Tensor) else type(task).__name__))
        return task, self.logits_fn(output)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, progress: float) -> dict:
        fn = "fastsd.ICPDistiller"
        _check_batch(fn, x, y)
        alpha = self.alpha(progress)
        active = self.scheduled(progress) > self.warmup
        modes = _modes(self.model, True) if not self.model.training else contextlib.nullcontext()
        with _held(self._lock), modes:
            if not active:
                with _in_pass("student"):
                    output = self.model(x)
                task, logits = self._task(output, y)
                return {"loss": task, "task": task, "feature": task.new_zeros(()).detach(), "alpha": alpha,
                        "logits": logits, "output": output}
            with self._features() as student, _in_pass("student"):
                output = self.model(x)
            task, logits = self._task(output, y)
            x_refined = self.refiner(x, y)
            with torch.no_grad(), _buffers_kept(self.model), self._features() as targets, _in_pass("target"):
                self.model(x_refined)
            feature = _feature_alignment_loss()(student, targets, kind=self.kind, weights=self.layer_weights)
            loss = alpha * task + (1.0 - alpha) * feature
        return {"loss": loss, "task": task, "feature": feature, "alpha": alpha, "logits": logits, "output": output}
