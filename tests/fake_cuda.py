"""A fake ``torch.cuda`` layer for machines without a GPU: enough of the runtime for fastsd's graph
path (ICPRefiner) and the bench's CUDA path to run on CPU tensors, with a CUDA graph's semantics.

* :class:`FakeGraph` is ``torch.cuda.CUDAGraph``: ``capture_begin()`` .. ``capture_end()`` records
  the aten ops the capturing thread runs on the capture stream, with the tensors they read and
  wrote, and ``replay()`` re-runs them on the same tensors, writing each result into the captured
  output's memory (fixed addresses, no Python re-run). A host read inside the capture fails and
  invalidates it, and ``capture_end()`` of an invalidated capture then fails with its own error
  (the stream leaves capture mode all the same), as cudaStreamEndCapture does.
* :class:`FakeCuda` is the rest, installed by :meth:`FakeCuda.install`: devices (a current device
  per thread), streams (a current stream per thread and device, a default stream per device;
  ``torch.cuda.stream(s)`` makes s's device current too, as ``torch.cuda.set_stream`` does), the
  graph memory pools (``graph_pool_handle``; the allocator's list of captures underway, which a
  successful ``capture_end`` or ``torch._C._cuda_endAllocateToPool`` leaves; each pool's use count
  per device: one per capture begun, given back by a graph that ended its capture when it is
  destroyed or by ``torch._C._cuda_releasePool``, and a capture into a pool whose count fell to 0
  fails, as torch's allocator asserts), and counters of the device-wide calls (``synchronize``,
  ``empty_cache``, the pinned-host cache's ``_host_emptyCache``).
  A capture cannot begin on a stream that is capturing already; ``fail_capture_begin`` makes the
  next ``capture_begin`` fail after the allocator began sending allocations to the pool (as a
  failing cudaStreamBeginCapture does).
* cuBLAS's per-stream workspaces: :meth:`FakeCuda.cublas` (called by a test module's forward)
  uses the current stream's workspace, made in the pool of the capture underway on that stream or
  else in the ordinary pool (None); a capture notes the pools of the workspaces it used
  (``workspace_pools``); ``torch._C._cuda_clearCublasWorkspaces`` drops them all.
* ``Tensor.record_stream`` is noted in ``recorded`` as (tensor, stream).
* ``events``: the order of capture_begin, capture_end and workspace clears.

Tensors stay on the CPU; :class:`OnDevice` makes chosen tensors report a CUDA device.
"""
import collections
import contextlib
import threading
import types

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"
INVALIDATED_ERROR = "CUDA error: operation failed due to a previous error during capture"


def _index(device, current):
    """A device index from None (the current device), an int, "cuda:i" or a torch.device."""
    if device is None:
        return current
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        assert device.type == "cuda", device
        return current if device.index is None else device.index
    return int(device)


class FakeStream:
    def __init__(self, device=None, priority=0, *, default=False):
        runtime = FakeCuda.active
        self.device = torch.device("cuda", _index(device, runtime.current_device() if runtime else 0))
        self.default = default
        self.capturing = None  # the FakeGraph capturing on this stream
        self.waited_on = []  # streams this one was made to wait for

    def wait_stream(self, other):
        self.waited_on.append(other)

    def synchronize(self):
        if self.capturing is not None:
            self.capturing.invalidate()

    def __repr__(self):
        return f"<FakeStream {'default ' if self.default else ''}{self.device} {id(self):#x}>"


class FakeGraph(TorchDispatchMode):
    """torch.cuda.CUDAGraph (see the module docstring)."""
    captures = replays = 0

    def __init__(self, keep_graph=False):
        super().__init__()
        self.ops = []
        self.workspace_pools = []  # pools of the cuBLAS workspaces the capture used
        self.stream = self.pool = self.invalid = None
        self.ended = False
        self.runtime = None

    def _current_stream(self):
        runtime = FakeCuda.active
        return runtime.current_stream() if runtime is not None else self.stream

    def capture_begin(self, pool=None, capture_error_mode="global", **kwargs):
        runtime = FakeCuda.active
        stream = self._current_stream()
        if runtime is not None:
            if stream.default:
                raise RuntimeError("CUDA graphs must be captured on a non-default stream.")
            if stream.capturing is not None:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            pool = ("private", id(self)) if pool is None else pool
            runtime.use_pool(stream.device.index, pool)
            runtime.allocating_to_pool.append((stream.device.index, pool))
            if runtime.fail_capture_begin is not None:
                error, runtime.fail_capture_begin = runtime.fail_capture_begin, None
                raise RuntimeError(error)
            runtime.capturing.append(self)
            runtime.events.append("capture_begin")
            runtime.captures.append(types.SimpleNamespace(stream=stream, pool=pool, ops=self.ops,
                                                          workspace_pools=self.workspace_pools))
            stream.capturing = self
        self.stream, self.pool, self.capture_error_mode, self.runtime = stream, pool, capture_error_mode, runtime
        FakeGraph.captures += 1
        self.__enter__()
        if runtime is not None and runtime.on_capture_begin is not None:
            runtime.on_capture_begin(self)

    def invalidate(self):
        self.invalid = CAPTURE_ERROR
        raise RuntimeError(f"{CAPTURE_ERROR} (a host synchronisation)")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._current_stream() is not self.stream:  # work queued on another stream: not captured
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(t), ...: a host read
            self.invalidate()
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def capture_end(self):
        runtime = FakeCuda.active
        self.__exit__(None, None, None)
        if self._current_stream() is not self.stream:
            raise RuntimeError("Capture must end on the same stream it began on.")
        if runtime is not None:
            self.stream.capturing = None
            runtime.capturing.remove(self)
            runtime.events.append("capture_end")
        if self.invalid is not None:
            raise RuntimeError(INVALIDATED_ERROR)
        if runtime is not None:
            runtime.allocating_to_pool.remove((self.stream.device.index, self.pool))
        self.ended = True

    def reset(self):
        if self.ended and self.runtime is not None:
            self.runtime.release_pool(self.stream.device.index, self.pool)
        self.ended = False
        self.ops = []

    def __del__(self):
        if self.ended and self.runtime is not None:
            self.runtime.release_pool(self.stream.device.index, self.pool)

    def replay(self):
        FakeGraph.replays += 1
        runtime = FakeCuda.active
        if runtime is not None and runtime.on_replay is not None:
            runtime.on_replay(self)
        with _disable_current_modes(), torch.no_grad():  # one launch: no aten op is dispatched outside
            for func, args, kwargs, out in self.ops:
                new = func(*args, **kwargs)
                if not any(r.alias_info is not None for r in func._schema.returns):  # in-place ops, views
                    for o, n in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                        if isinstance(o, torch.Tensor):
                            o.copy_(n)


class FakeCuda:
    """The fake runtime's state; ``FakeCuda.install(monkeypatch)`` patches it into torch.cuda."""
    active = None

    def __init__(self, device_count=2):
        self.device_count = device_count
        self.local = threading.local()  # .device, .streams: this thread's current device and streams
        self.defaults = {i: FakeStream(i, default=True) for i in range(device_count)}
        self.capturing = []  # graphs capturing now
        self.allocating_to_pool = []  # (device index, pool) of the captures underway in the allocator
        self.captures = []  # (stream, pool, ops) of every capture begun; not the graphs, which must die
        self.pool_uses = {}  # (device index, pool) -> use count
        self.calls = collections.Counter()  # device-wide calls: synchronize, empty_cache, host_empty_cache
        self.pools = 0
        self.on_capture_begin = self.on_replay = None  # test hooks
        self.fail_capture_begin = None  # an error message for the next capture_begin
        self.workspaces = {}  # stream -> the pool its cuBLAS workspace was allocated in (None: ordinary)
        self.recorded = []  # (tensor, stream) of every record_stream
        self.events = []  # "capture_begin", "capture_end", "clear_workspaces", in order

    @classmethod
    def install(cls, monkeypatch, device_count=2):
        runtime = cls(device_count)
        monkeypatch.setattr(cls, "active", runtime)
        for name, value in dict(
            is_available=lambda: True, device_count=lambda: device_count, current_device=runtime.current_device,
            device=runtime.device, set_device=runtime.set_device, Stream=FakeStream,
            current_stream=runtime.current_stream, default_stream=runtime.default_stream,
            set_stream=runtime.set_stream, stream=runtime.stream,
            is_current_stream_capturing=runtime.is_current_stream_capturing, CUDAGraph=FakeGraph,
            graph_pool_handle=runtime.graph_pool_handle, synchronize=runtime.counted("synchronize"),
            empty_cache=runtime.counted("empty_cache"),
        ).items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch._C, "_host_emptyCache", runtime.counted("host_empty_cache"))
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", runtime.end_allocate_to_pool, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool", runtime.release_pool, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", runtime.clear_workspaces, raising=False)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: runtime.recorded.append((t, stream)))
        # torch.cuda.graph keeps the stream it made first (on the device current then) for good
        monkeypatch.setattr(torch.cuda.graph, "default_capture_stream", None)
        FakeGraph.captures = FakeGraph.replays = 0
        return runtime

    def index(self, device):
        return _index(device, self.current_device())

    def current_device(self):
        return getattr(self.local, "device", 0)

    def set_device(self, device):
        self.local.device = self.index(device)

    @contextlib.contextmanager
    def device(self, device):
        before = self.current_device()
        self.set_device(device)
        try:
            yield
        finally:
            self.local.device = before

    def _streams(self):
        if not hasattr(self.local, "streams"):
            self.local.streams = {}
        return self.local.streams

    def current_stream(self, device=None):
        index = self.index(device)
        return self._streams().get(index, self.defaults[index])

    def default_stream(self, device=None):
        return self.defaults[self.index(device)]

    def set_stream(self, stream):
        self._streams()[stream.device.index] = stream
        self.local.device = stream.device.index

    @contextlib.contextmanager
    def stream(self, stream):
        if stream is None:
            yield
            return
        device, before = self.current_device(), self.current_stream(stream.device)
        self.set_stream(stream)
        try:
            yield
        finally:
            self._streams()[stream.device.index] = before
            self.local.device = device

    def is_current_stream_capturing(self):
        return self.current_stream().capturing is not None

    def graph_pool_handle(self):
        self.pools += 1
        return (0, self.pools)

    def use_pool(self, device, pool):
        uses = self.pool_uses.get((device, pool))
        if uses == 0:
            raise RuntimeError("INTERNAL ASSERT FAILED: it->second->use_count > 0 (a capture into a freed pool)")
        self.pool_uses[(device, pool)] = (uses or 0) + 1

    def release_pool(self, device, pool):
        assert self.pool_uses[(device, pool)] > 0
        self.pool_uses[(device, pool)] -= 1

    def end_allocate_to_pool(self, device, pool):
        if (device, pool) not in self.allocating_to_pool:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        self.allocating_to_pool.remove((device, pool))

    def cublas(self):
        """A cuBLAS call on the current stream: its workspace (made now if there is none), whose
        pool the capture underway on that stream notes."""
        stream = self.current_stream()
        graph = stream.capturing
        pool = self.workspaces.setdefault(stream, graph.pool if graph is not None else None)
        if graph is not None:
            graph.workspace_pools.append(pool)
        return pool

    def clear_workspaces(self):
        self.workspaces.clear()
        self.events.append("clear_workspaces")

    def counted(self, name):
        def call(*args, **kwargs):
            self.calls[name] += 1
            stream = self.current_stream()
            if name == "synchronize" and stream.capturing is not None:
                stream.capturing.invalidate()
        return call


class OnDevice(TorchFunctionMode):
    """The given tensors report ``device`` (e.g. cuda:1) as their device; they stay on the CPU.
    A torch function mode is per thread: enter one in every thread that reads them."""

    def __init__(self, device, *tensors):
        super().__init__()
        self.device = torch.device(device)
        self.ids = {id(t) for t in tensors}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__ and id(args[0]) in self.ids:
            return self.device
        return func(*args, **(kwargs or {}))
