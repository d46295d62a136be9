"""ICPRefiner's CUDA-graph loop and ICPDistiller's hooks and buffers, on a machine without a GPU.

The graph path runs on CPU tensors through the fake ``torch.cuda`` layer of ``tests/fake_cuda.py``
(devices, per-thread streams, graphs that record and replay aten ops, pools, the allocator's list
of captures underway): a failed capture (stream, error, allocator), a side stream per device,
one pool per refiner and no device-wide synchronisation, a bound on recaptures and on failures,
threads, DataParallel and FSDP. ICPDistiller: DataParallel refused, hooks fired from a replica or
another thread, and the target pass copying no buffer. The ``gpu`` tests at the end check the
same on real hardware (skipped without CUDA).
"""
import collections
import concurrent.futures
import copy
import importlib
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastsd
from fastsd import icp as icp_module
from fake_cuda import CAPTURE_ERROR, FakeCuda, FakeGraph, OnDevice

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


class Net(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class HostSync(nn.Module):
    """A host read in the forward (on a GPU: a sync, which a capture cannot contain); ``once``:
    only in the first capture (a transient failure)."""

    def __init__(self, once=False):
        super().__init__()
        self.once, self.failed = once, False

    def forward(self, x):
        if not self.once or (torch.cuda.is_current_stream_capturing() and not self.failed):
            self.failed = True
            x.sum().item()
        return x


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def eager(model, x, y, steps=2):
    return fastsd.ICPRefiner(model, steps=steps, cuda_graph="never")(x, y)


def refine(refiner, x, y, device="cuda:0"):
    """``refiner(x, y)`` with x and y reporting ``device``."""
    with OnDevice(device, x, y):
        return refiner(x, y)


def in_threads(fn, *calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        return [f.result(timeout=120) for f in futures]


def meet(barrier):
    """Wait for the other thread at ``barrier``; go on alone after 2 s (the fixed code serialises)."""
    try:
        barrier.wait(timeout=2)
    except threading.BrokenBarrierError:
        pass


@pytest.fixture
def cuda(monkeypatch):
    runtime = FakeCuda.install(monkeypatch)
    monkeypatch.setattr(icp_module, "_SIDE_STREAMS", {}, raising=False)  # (raising: the tests run on older code)
    return runtime


def assert_streams_restored(cuda):
    assert cuda.current_device() == 0
    assert all(cuda.current_stream(d).default for d in range(cuda.device_count))
    assert not cuda.capturing and not cuda.allocating_to_pool


# --- a failed capture -------------------------------------------------------------------------------


def test_failed_capture_restores_the_stream_and_reports_the_cause(cuda):
    model = nn.Sequential(HostSync(), Net())
    x, y = batch()
    expected = eager(model, x, y)
    with pytest.warns(RuntimeWarning, match="capture failed") as record:
        out = refine(fastsd.ICPRefiner(model, steps=2), x, y, "cuda:1")
    message = " ".join(str(w.message) for w in record)
    assert CAPTURE_ERROR in message and "previous error" not in message  # the cause, not capture_end's error
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert_streams_restored(cuda)  # the thread is back on its own stream, the allocator off the pool

    with pytest.raises(RuntimeError, match="cuda_graph='always'.*not permitted when stream is capturing") as info:
        refine(fastsd.ICPRefiner(model, steps=2, cuda_graph="always"), x, y, "cuda:1")
    assert CAPTURE_ERROR in str(info.value.__cause__)
    assert_streams_restored(cuda)


def test_a_transient_capture_failure_is_tried_again(cuda):
    model = nn.Sequential(HostSync(once=True), Net())
    refiner = fastsd.ICPRefiner(model, steps=2)
    x, y = batch()
    with pytest.warns(RuntimeWarning, match="capture failed.*the next call of this shape tries again"):
        out = refine(refiner, x, y)
    torch.testing.assert_close(out, eager(model, x, y), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in (1, 2):  # captured now, then replayed
            x, y = batch(seed=seed)
            torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y))
    assert FakeGraph.captures == 2 and FakeGraph.replays == 2 and len(refiner._graphs) == 1
    assert_streams_restored(cuda)


# --- streams, pools, device-wide calls -------------------------------------------------------------------


def test_each_device_warms_up_on_the_callers_stream_and_captures_on_its_own_side_stream(cuda):
    seen = []  # (device, stream) of every forward: warm-up and capture

    def note(module, inputs):
        seen.append((module, cuda.current_device(), cuda.current_stream()))

    for device in ("cuda:0", "cuda:1", "cuda:1"):  # the second cuda:1 refiner reuses that device's stream
        model = Net()
        model.register_forward_pre_hook(note)
        refine(fastsd.ICPRefiner(model, steps=2), *batch(), device)
        graph = cuda.captures[-1]
        assert graph.stream.device == torch.device(device) and not graph.stream.default
        forwards = [(d, s) for m, d, s in seen if m is model]
        assert len(forwards) == 3 * 2  # two warm-up calls and the capture, two steps each
        assert all(d == torch.device(device).index for d, s in forwards)
        # the warm-up on the caller's stream: another thread may be capturing on the side stream
        assert [s for d, s in forwards] == [cuda.default_stream(device)] * 4 + [graph.stream] * 2
    assert cuda.captures[1].stream is cuda.captures[2].stream is not cuda.captures[0].stream
    assert_streams_restored(cuda)


def test_the_graphs_of_a_refiner_share_one_pool_and_nothing_syncs_the_device(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=1)
    for n in (2, 3, 4):
        x, y = batch(n)
        torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))
    refine(fastsd.ICPRefiner(model, steps=1), *batch(2))
    pools = [g.pool for g in cuda.captures]
    assert pools[0] is not None and pools[:3] == [pools[0]] * 3 and pools[3] not in (None, pools[0])
    assert not cuda.calls  # no synchronize, empty_cache or pinned-host empty_cache
    refiner.reset()
    refine(refiner, *batch(2))
    assert cuda.captures[-1].pool not in pools  # reset() drops the pool with the graphs
    assert_streams_restored(cuda)


def test_replays_on_another_stream_wait_for_the_last_replay(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=1)
    x, y = batch()
    refine(refiner, x, y)
    other = torch.cuda.Stream(0)
    with torch.cuda.stream(other):
        refine(refiner, x, y)
    assert other.waited_on == [cuda.default_stream(0)]
    refine(refiner, x, y)
    assert cuda.default_stream(0).waited_on[-1] is other


class RaiseInCapture(nn.Module):
    """A Python error (or ``error``, e.g. KeyboardInterrupt) in the first capture only (the
    capture itself stays valid)."""

    def __init__(self, error=None):
        super().__init__()
        self.raised, self.error = False, error

    def forward(self, x):
        if torch.cuda.is_current_stream_capturing() and not self.raised:
            self.raised = True
            raise self.error or ValueError("not during a capture")
        return x


def test_a_pool_no_graph_uses_is_not_captured_into_again(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=1, max_graphs=1)
    for device in ("cuda:0", "cuda:1", "cuda:0"):  # each capture evicts the other device's graph
        x, y = batch()
        torch.testing.assert_close(refine(refiner, x, y, device), eager(model, x, y, steps=1))
    assert len({c.pool for c in cuda.captures}) == 3
    assert sorted(cuda.pool_uses.values()) == [0, 0, 1]  # the evicted graphs gave their pools back


@pytest.mark.parametrize("module,cause", [(HostSync(once=True), CAPTURE_ERROR), (RaiseInCapture(), "not during")])
def test_a_failed_capture_gives_its_pool_back(cuda, module, cause):
    model = nn.Sequential(module, Net())
    refiner = fastsd.ICPRefiner(model, steps=1)
    x, y = batch()
    with pytest.warns(RuntimeWarning, match=cause):
        refine(refiner, x, y)
    assert list(cuda.pool_uses.values()) == [0]  # invalidated or not, the failed capture holds no pool
    torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))  # captured, into a new pool
    assert list(cuda.pool_uses.values()) == [0, 1] and len(refiner._graphs) == 1
    assert_streams_restored(cuda)


class Blas(nn.Module):
    """A cuBLAS call in the forward: uses the current stream's workspace (fake layer)."""

    def forward(self, x):
        FakeCuda.active.cublas()
        return x


def test_each_capture_uses_a_cublas_workspace_of_its_own_pool(cuda):
    # torch frees the capture stream's workspace whenever a graph is reset (eviction, reset(), GC,
    # a failed capture): a graph must not use one that was made outside its own pool.
    models = [nn.Sequential(Blas(), Net()) for _ in range(2)]
    refiners = [fastsd.ICPRefiner(m, steps=1, max_graphs=1) for m in models]
    for n in (2, 3, 2):
        for model, refiner in zip(models, refiners):
            x, y = batch(n)
            torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))
    assert len(cuda.captures) == 6
    for capture in cuda.captures:
        assert capture.workspace_pools and all(p == capture.pool for p in capture.workspace_pools)
    # cleared right before each capture_begin and after each capture_end
    assert cuda.events == ["clear_workspaces", "capture_begin", "capture_end", "clear_workspaces"] * 6
    assert not cuda.workspaces or all(p is None for p in cuda.workspaces.values())


def test_a_failed_capture_clears_the_cublas_workspaces(cuda):
    model = nn.Sequential(Blas(), HostSync(once=True), Net())
    with pytest.warns(RuntimeWarning, match="capture failed"):
        refine(fastsd.ICPRefiner(model, steps=1), *batch())
    assert cuda.events == ["clear_workspaces", "capture_begin", "capture_end", "clear_workspaces"]
    assert all(p is None for p in cuda.workspaces.values())  # the failed capture's (in its pool) is no eager call's


def test_static_buffers_are_recorded_on_the_streams_that_replay_them(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=1, method="ademamix")
    x, y = batch()
    refine(refiner, x, y)
    (entry,) = refiner._graphs.values()
    buffers = [entry.x_in, entry.y_in, entry.x_buf] + [s for s in entry.state if s is not None]
    assert len(buffers) == 6 and not cuda.recorded  # replayed on the stream they were allocated on
    other = torch.cuda.Stream(0)
    for _ in range(2):  # recorded once per stream
        with torch.cuda.stream(other):
            torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))
    assert sorted(map(id, (t for t, s in cuda.recorded))) == sorted(map(id, buffers))
    assert all(s is other for t, s in cuda.recorded)


def test_a_capture_on_another_stream_waits_for_the_last_replay_first(cuda):
    waited = []  # what the stream of the first warm-up forward had waited on by then

    def note(module, inputs):
        if not waited:
            waited.append(list(cuda.current_stream().waited_on))

    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=1)
    refine(refiner, *batch(2))  # captured and replayed on the default stream
    model.register_forward_pre_hook(note)
    other = torch.cuda.Stream(0)
    with torch.cuda.stream(other):
        refine(refiner, *batch(3))  # a new shape: its warm-up must come after that replay
    assert waited == [[cuda.default_stream(0)]]


def test_a_failing_capture_begin_falls_back_and_gives_the_pool_back(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=1)
    x, y = batch()
    cuda.fail_capture_begin = "CUDA error: cudaStreamBeginCapture failed"
    with pytest.warns(RuntimeWarning, match="capture failed.*cudaStreamBeginCapture"):
        torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))
    assert list(cuda.pool_uses.values()) == [0]
    assert_streams_restored(cuda)
    torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))  # captured, into a new pool
    assert list(cuda.pool_uses.values()) == [0, 1]


def test_an_interrupted_capture_leaves_no_freed_pool_behind(cuda):
    model = nn.Sequential(RaiseInCapture(KeyboardInterrupt), Net())
    refiner = fastsd.ICPRefiner(model, steps=1)
    x, y = batch()
    with pytest.raises(KeyboardInterrupt):
        refine(refiner, x, y)
    assert_streams_restored(cuda)
    assert not refiner._pools  # the allocator freed that pool: the next capture asks for a new one
    torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))
    assert len(refiner._graphs) == 1


def test_the_private_end_allocate_binding_may_reject_its_arguments(cuda, monkeypatch):
    def old_binding(*args):
        raise TypeError("_cuda_endAllocateToPool(): incompatible function arguments")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", old_binding)
    model = nn.Sequential(HostSync(), Net())
    with pytest.warns(RuntimeWarning, match="capture failed"):
        refine(fastsd.ICPRefiner(model, steps=1), *batch())


# --- bounds on recapture and on failures -------------------------------------------------------------------


def test_a_key_whose_parameters_move_every_call_stops_being_captured(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=1)
    x, y = batch()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(6):
            for p in model.parameters():  # new storage every call, as FSDP's unsharded parameters get
                p.data = p.data.clone()
            torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y, steps=1))
    warned = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert FakeGraph.captures == 3 and len(warned) == 1 and "captured into a CUDA graph 3 times" in warned[0]
    always = fastsd.ICPRefiner(model, steps=1, cuda_graph="always")  # always: recaptured as often as needed
    for _ in range(4):
        model.fc.weight.data = model.fc.weight.data.clone()
        refine(always, x, y)
    assert FakeGraph.captures == 3 + 4


def test_a_capture_that_always_fails_is_tried_twice(cuda):
    model = nn.Sequential(HostSync(), Net())
    refiner = fastsd.ICPRefiner(model, steps=1)
    x, y = batch()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(4):
            refine(refiner, x, y)
    assert FakeGraph.captures == 2 and len(record) == 2 and "from now on" in str(record[1].message)


# --- threads -----------------------------------------------------------------------------------------


def test_two_threads_share_a_refiner(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=2)
    refine(refiner, *batch())  # captured
    calls = [batch(seed=s) for s in (1, 2)]
    expected = [eager(model, x, y) for x, y in calls]
    arrived = threading.Barrier(2)
    cuda.on_replay = lambda graph: meet(arrived)  # unserialised replays would overlap here
    out = in_threads(lambda x, y: refine(refiner, x, y), *calls)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)
    assert FakeGraph.captures == 1 and FakeGraph.replays == 1 + 2
    assert all(m.training for m in model.modules())  # each call gave the training flags back


def test_two_threads_capture_one_at_a_time(cuda):
    models = [Net(), Net()]
    calls = [(fastsd.ICPRefiner(m, steps=2),) + batch(seed=s) for m, s in zip(models, (1, 2))]
    expected = [eager(m, x, y) for m, (_, x, y) in zip(models, calls)]
    arrived = threading.Barrier(2)
    cuda.on_capture_begin = lambda graph: meet(arrived)  # two captures at once would meet here
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no capture may fail
        out = in_threads(lambda r, x, y: refine(r, x, y, "cuda:1"), *calls)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)
    assert FakeGraph.captures == 2 and all(len(g.ops) > 0 for g in cuda.captures)


class WaitInWarmUp(nn.Module):
    """The first warm-up forward waits for the other thread's (a model that talks to another
    thread; a capture lock held across the warm-up deadlocks it)."""

    def __init__(self, barrier):
        super().__init__()
        self.barrier, self.met = barrier, False

    def forward(self, x):
        if not self.met and not torch.cuda.is_current_stream_capturing():
            self.met = True
            self.barrier.wait()  # raises BrokenBarrierError after its timeout
        return x


def test_warm_ups_run_outside_the_capture_lock(cuda):
    arrived = threading.Barrier(2, timeout=5)
    models = [nn.Sequential(WaitInWarmUp(arrived), Net()) for _ in range(2)]
    calls = [(fastsd.ICPRefiner(m, steps=1),) + batch(seed=s) for m, s in zip(models, (1, 2))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = in_threads(lambda r, x, y: refine(r, x, y, "cuda:1"), *calls)
    for o, (r, x, y) in zip(out, calls):
        torch.testing.assert_close(o, eager(r.model, x, y, steps=1))
    assert FakeGraph.captures == 2


def test_captures_on_two_devices_run_at_once(cuda):
    arrived = threading.Barrier(2, timeout=5)
    cuda.on_capture_begin = lambda graph: arrived.wait()  # one lock for both devices: broken barrier
    models = [Net(), Net()]
    calls = [(fastsd.ICPRefiner(m, steps=1),) + batch(seed=s) + (d,) for m, s, d in zip(models, (1, 2), ("cuda:0", "cuda:1"))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = in_threads(refine, *calls)
    for o, (r, x, y, d) in zip(out, calls):
        torch.testing.assert_close(o, eager(r.model, x, y, steps=1))
    assert {c.stream.device.index for c in cuda.captures} == {0, 1}


def test_a_refiner_copies_without_its_lock_and_graphs(cuda):
    model = Net()
    refiner = fastsd.ICPRefiner(model, steps=2)
    refine(refiner, *batch())
    copied = copy.deepcopy(refiner)
    assert copied.model is not model and not copied._graphs and copied.steps == 2
    x, y = batch(seed=3)
    torch.testing.assert_close(refine(copied, x, y), eager(copied.model, x, y))
    assert len(copied._graphs) == 1


# --- DataParallel, FSDP ---------------------------------------------------------------------------------------


def _data_parallel(monkeypatch, module, devices=2):
    """An nn.DataParallel that says it spans ``devices`` GPUs and runs its module directly (on a
    CPU, DataParallel cannot make replicas)."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        dp = nn.DataParallel(module)
    dp.device_ids = list(range(devices))
    dp.forward = module.forward
    return dp


def test_distiller_refuses_data_parallel_over_several_devices(monkeypatch):
    net = Net()
    for model, layers in ((_data_parallel(monkeypatch, net), ["module.conv"]),
                          (nn.Sequential(_data_parallel(monkeypatch, net)), ["0.module.bn"])):
        with pytest.raises(ValueError, match="DataParallel over 2 devices.*DistributedDataParallel"):
            fastsd.ICPDistiller(model, layers)
    # One device (or the CPU): DataParallel calls its module directly, and that is fine.
    fastsd.ICPDistiller(_data_parallel(monkeypatch, net, devices=1), ["module.conv"])
    fastsd.ICPDistiller(nn.DataParallel(net), ["module.conv"])


def _replica(module):
    """What nn.parallel.replicate makes of ``module`` (its hooks shared), without the copies."""
    replica = module._replicate_for_data_parallel()
    for name, p in module._parameters.items():
        replica._parameters[name] = p
    for name, child in module._modules.items():
        replica._modules[name] = _replica(child)
    return replica


class ThreadedReplicas(nn.Module):
    """nn.DataParallel's forward on the CPU: replicas on chunks of the batch, in threads."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        chunks = x.chunk(2)
        out = in_threads(lambda r, c: r(c), *[(_replica(self.module), c) for c in chunks])
        return torch.cat(out)


class SideThread(nn.Module):
    """A forward that runs a hooked layer in another thread."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return in_threads(self.net, (x,))[0]


@pytest.mark.parametrize("model,layers,where", [(ThreadedReplicas(Net()), ["module.conv", "module.bn"], "replica"),
                                                (SideThread(), ["net.bn"], "another thread")])
def test_distiller_hooks_fired_outside_its_forward_raise(model, layers, where):
    distiller = fastsd.ICPDistiller(model, layers, refiner=fastsd.ICPRefiner(model, steps=1), warmup=0.0)
    x, y = batch(6)
    with pytest.raises(RuntimeError, match=f"ran in (a )?{where}.*DistributedDataParallel"):
        distiller(x, y, 0.5)
    assert distiller._capture is None
    model(x)  # outside the distiller's call the hooks do nothing, from any thread


def test_refiner_runs_data_parallel_and_fsdp_models_eagerly(cuda, monkeypatch):
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = Net()
    fsdp = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # only its class is looked at
    nn.Module.__init__(fsdp)
    sharded.add_module("shard", fsdp)
    moving = Net()
    moving.fc.weight.data_ptr = lambda: (_ for _ in ()).throw(RuntimeError("no data pointer (DTensor)"))
    net = Net()
    x, y = batch()
    for model, reason in ((_data_parallel(monkeypatch, net), "DataParallel over 2 devices"),
                          (sharded, "sharded by FSDP"), (moving, "no fixed address")):
        refiner = fastsd.ICPRefiner(model, steps=2)
        with pytest.warns(RuntimeWarning, match=f"no CUDA graphs for this model.*{reason}"):
            torch.testing.assert_close(refine(refiner, x, y), eager(model, x, y), rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once
            refine(refiner, x, y)
        with pytest.raises(RuntimeError, match=f"cuda_graph='always' but.*{reason}"):
            refine(fastsd.ICPRefiner(model, steps=2, cuda_graph="always"), x, y)
    assert FakeGraph.captures == 0
    assert_streams_restored(cuda)


class ReducerDDP(torch.nn.parallel.DistributedDataParallel):
    """A stand-in DistributedDataParallel on one CPU process: a forward with grad enabled prepares
    the reducer, which then expects a backward that reduces every parameter's gradient."""

    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module
        self.prepared = 0

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.prepared += 1
        return self.module(*args, **kwargs)


def test_refiner_runs_the_module_inside_distributed_data_parallel(cuda):
    net = Net()
    ddp = ReducerDDP(net)
    x, y = batch()
    for mode in ("never", "auto"):
        refiner = fastsd.ICPRefiner(ddp, steps=2, cuda_graph=mode)
        assert refiner.model is net
        torch.testing.assert_close(refine(refiner, x, y), eager(net, x, y), rtol=0, atol=0)
        assert ddp.prepared == 0
    distiller = fastsd.ICPDistiller(ddp, ["module.bn"])  # its default refiner too
    assert distiller.refiner.model is net
    distiller(x, y, 0.9)
    assert ddp.prepared == 1  # the distiller's own forward of x, whose loss is backpropagated


def test_refiner_refuses_a_reducer_it_cannot_unwrap(monkeypatch):
    contract = importlib.import_module("torch.distributed._composable.contract")  # (the package shadows it)

    inner = nn.Sequential(Net(), ReducerDDP(Net()))
    with pytest.raises(ValueError, match="DistributedDataParallel at '1'.*Pass the DistributedDataParallel wrapper"):
        fastsd.ICPRefiner(inner)
    replicated = Net()
    replicated.__dict__[contract.REGISTRY_KEY] = {"replicate": object()}  # as replicate(model) marks it
    with pytest.raises(ValueError, match="composable replicate\\(\\) at 'the model itself'"):
        fastsd.ICPRefiner(replicated)


# --- the target pass copies no buffer (issue 12) ------------------------------------------------------------


class BufferTraffic(TorchDispatchMode):
    """Counts copies of, and in-place writes into, the given buffers."""

    def __init__(self, buffers):
        super().__init__()
        self.ptrs = {b.data_ptr() for b in buffers}
        self.copies = self.writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ours = [isinstance(a, torch.Tensor) and a.data_ptr() in self.ptrs for a in tree_flatten((args, kwargs))[0]]
        if any(ours) and func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy):
            self.copies += 1
        schema_args = func._schema.arguments
        for a, arg in zip(args, schema_args):
            if isinstance(a, torch.Tensor) and a.data_ptr() in self.ptrs and arg.alias_info is not None \
                    and arg.alias_info.is_write:
                self.writes += 1
        return func(*args, **kwargs)


def test_target_pass_copies_no_buffer_and_leaves_them_as_they_were():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=5)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    distiller = fastsd.ICPDistiller(model, ["layer1", "layer4"], refiner=fastsd.ICPRefiner(model, steps=1))
    reference = copy.deepcopy(model)
    buffers, reference_buffers = list(model.buffers()), list(reference.buffers())
    assert len(buffers) == 3 * 20
    versions = [b._version for b in buffers + reference_buffers]
    with torch.no_grad(), BufferTraffic(reference_buffers) as one_forward:
        reference(x)  # what one train-mode pass of x does to the buffers
    with BufferTraffic(buffers) as traffic:
        out = distiller(x, y, 0.9)
    assert traffic.copies == 0  # no copy per buffer in the whole step
    assert traffic.writes == one_forward.writes > 0  # the student pass's updates only
    bumps = [b._version - v for b, v in zip(buffers + reference_buffers, versions)]
    assert bumps[:60] == bumps[60:]  # no other in-place write (it would break a graph that saved them)
    for (name, b), r in zip(model.named_buffers(), reference_buffers):
        torch.testing.assert_close(b, r, rtol=0, atol=0, msg=name)
    out["loss"].backward()
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


class Counter(nn.Module):
    """A module whose forward writes its buffer in place in train mode (the fallback copies it)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.calls.add_(1)
        return x


class OwnForwardBN(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: not reasoned about, its buffers are copied."""

    def forward(self, x):
        return super().forward(x) * 1.0


def test_target_pass_falls_back_to_copies_for_other_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), Counter(),
                          OwnForwardBN(4), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    model(x)  # materialise the lazy layer
    reference = copy.deepcopy(model)
    reference(x)
    distiller = fastsd.ICPDistiller(model, ["2", "4"], refiner=fastsd.ICPRefiner(model, steps=1), warmup=0.0)
    with BufferTraffic([model[4].running_mean, model[4].running_var]) as traffic:
        distiller(x, y, 0.5)
    assert traffic.copies == 0  # the plain BatchNorm's buffers are not copied
    for (name, b), r in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, r, rtol=0, atol=0, msg=name)


def test_batch_norm_flags_restored_when_the_target_pass_raises():
    class FailSecond(nn.Module):
        calls = 0

        def forward(self, x):
            FailSecond.calls += 1
            if FailSecond.calls == 2:
                raise ValueError("boom")
            return x

    model = nn.Sequential(nn.BatchNorm2d(3), FailSecond(), nn.Flatten(), nn.Linear(3 * 36, 5))
    distiller = fastsd.ICPDistiller(model, ["0"], refiner=lambda x, y: x, warmup=0.0)
    with pytest.raises(ValueError, match="boom"):
        distiller(*batch(), 0.5)
    assert model[0].track_running_stats and distiller._capture is None


# --- on a GPU ---------------------------------------------------------------------------------------------


def _cuda_batch(n=4, device="cuda"):
    x, y = batch(n)
    return x.to(device), y.to(device)


@gpu
@needs_cuda
def test_gpu_failed_capture_restores_the_stream_and_reports_the_cause():
    model = nn.Sequential(HostSync(), Net()).cuda()
    x, y = _cuda_batch()
    with pytest.warns(RuntimeWarning, match="capture failed") as record:
        out = fastsd.ICPRefiner(model, steps=2)(x, y)
    assert "previous error" not in " ".join(str(w.message) for w in record)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.testing.assert_close(out, eager(model, x, y))
    x.mul(2).sum().item()  # the thread's later work runs (and syncs) normally


@gpu
@needs_cuda
def test_gpu_graphs_share_a_pool_without_emptying_the_caches(monkeypatch):
    model = Net().cuda()
    refiner = fastsd.ICPRefiner(model, steps=2, cuda_graph="always")
    calls = [_cuda_batch(n) for n in (2, 3, 4)]
    expected = [eager(model, x, y) for x, y in calls]
    counts = collections.Counter()
    for module, name in ((torch.cuda, "empty_cache"), (torch.cuda, "synchronize"), (torch._C, "_host_emptyCache")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **k: (counts.update([_n]), _f(*a, **k))[1])
    out = [refiner(x, y) for x, y in calls]
    monkeypatch.undo()
    assert not counts
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)
    assert len(refiner._graphs) == 3 and len({entry.graph.pool() for entry in refiner._graphs.values()}) == 1


@gpu
@needs_cuda
def test_gpu_a_graph_survives_the_other_graphs_being_dropped():
    # Each drop (eviction by max_graphs=1, reset(), a refiner collected) resets a graph, which
    # frees the capture stream's cuBLAS workspace: the surviving graph must not have used it.
    import gc

    models = [nn.Sequential(nn.Flatten(), nn.Linear(108, 256), nn.ReLU(), nn.Linear(256, 5)).cuda() for _ in range(2)]
    keep = fastsd.ICPRefiner(models[0], steps=2, cuda_graph="always")
    x, y = _cuda_batch(8)
    keep(x, y)
    for n in (4, 6, 4):
        drop = fastsd.ICPRefiner(models[1], steps=2, cuda_graph="always", max_graphs=1)
        drop(*_cuda_batch(n))
        drop(*_cuda_batch(n + 1))  # evicts
        drop.reset()
        del drop
        gc.collect()
        garbage = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]  # reuse freed blocks
        torch.testing.assert_close(keep(x, y), eager(models[0], x, y))
        del garbage


@gpu
@needs_cuda
def test_gpu_buffers_replayed_on_another_stream_outlive_reset():
    model = Net().cuda()
    refiner = fastsd.ICPRefiner(model, steps=2, cuda_graph="always")
    x, y = _cuda_batch()
    expected = eager(model, x, y)
    refiner(x, y)
    other = torch.cuda.Stream()
    other.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(other):
        torch.cuda._sleep(10_000_000)  # the replay still runs when the buffers are dropped
        out = refiner(x, y)
    refiner.reset()  # frees the static buffers on the default stream, which allocated them
    garbage = [torch.full((4, 3, 6, 6), float("nan"), device="cuda") for _ in range(64)]
    torch.cuda.synchronize()
    del garbage
    torch.testing.assert_close(out, expected)


@gpu
@needs_cuda
def test_gpu_moving_parameters_stop_being_captured():
    model = Net().cuda()
    refiner = fastsd.ICPRefiner(model, steps=1)
    x, y = _cuda_batch()
    with pytest.warns(RuntimeWarning, match="3 times"):
        for _ in range(5):
            for p in model.parameters():
                p.data = p.data.clone()
            torch.testing.assert_close(refiner(x, y), eager(model, x, y, steps=1))


@gpu
@needs_cuda
def test_gpu_two_threads_refine_at_once():
    models = [Net().cuda() for _ in range(3)]
    refiners = [fastsd.ICPRefiner(m, steps=2) for m in models]  # the last one called by two threads
    calls = [(r,) + _cuda_batch() for r in refiners + refiners[-1:]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no capture fails
        for _ in range(3):
            out = in_threads(lambda r, x, y: r(x, y), *calls)
            torch.cuda.synchronize()
            for o, (r, x, y) in zip(out, calls):
                torch.testing.assert_close(o, eager(r.model, x, y))


@gpu
@needs_cuda
@needs_two_gpus
def test_gpu_second_device_without_set_device():
    model = Net().to("cuda:1")
    refiner = fastsd.ICPRefiner(model, steps=2, cuda_graph="always")
    assert torch.cuda.current_device() == 0
    for seed in (0, 1, 2):
        x, y = (t.to("cuda:1") for t in batch(seed=seed))
        torch.testing.assert_close(refiner(x, y), eager(model, x, y))
    assert torch.cuda.current_device() == 0


@gpu
@needs_cuda
@needs_two_gpus
def test_gpu_distiller_refuses_data_parallel():
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        fastsd.ICPDistiller(nn.DataParallel(Net().cuda(), device_ids=[0, 1]), ["module.bn"])


@gpu
@needs_cuda
def test_gpu_target_pass_copies_no_buffer():
    model = Net().cuda()
    distiller = fastsd.ICPDistiller(model, ["bn"], refiner=fastsd.ICPRefiner(model, steps=1))
    reference = copy.deepcopy(model)
    x, y = _cuda_batch()
    with torch.no_grad(), BufferTraffic(list(reference.buffers())) as one_forward:
        reference(x)
    with BufferTraffic(list(model.buffers())) as traffic:
        distiller(x, y, 0.9)
    assert traffic.copies == 0 and traffic.writes == one_forward.writes
    for b, r in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(b, r)
