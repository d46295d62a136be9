"""Reliability of the ops: determinism across threads and calls, large tensors, memory, threads.

Patch swap first, then the losses and the ICP refiner / distiller: bitwise the same results with 1
and 2 CPU threads and on repeated calls, under torch.use_deterministic_algorithms(True), with two
Python threads at once; no RSS growth over 1000 forward + backward calls; the CUDA-graph cache of the
refiner bounded (checked through its own bookkeeping with a stand-in graph: no capture on CPU).
"""
import gc
import os
import threading
import types

import pytest
import torch

import fastsd
from fastsd import reference as R
from fastsd.bench.cases import PATCH_SWAP_PARITY

from conftest import CPU_BACKENDS, torch_threads

COMPILED = [b for b in CPU_BACKENDS if b != "triton"]


def _run_in_two_threads(worker):
    """Start worker(0) and worker(1) together and wait for both."""
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _swap_and_grad(backend, x, partner, mask, g):
    xr = x.clone().requires_grad_()
    with fastsd.use_backend(backend):
        out = fastsd.patch_swap(xr, partner, mask)
        out.backward(g)
    return out.detach(), xr.grad


@pytest.mark.parametrize("backend", COMPILED)
def test_bitwise_deterministic_across_threads_and_calls(backend):
    x, partner, mask = PATCH_SWAP_PARITY[0].make(torch.float32)
    perm = torch.randperm(x.shape[0])
    g = torch.randn(x.shape)
    results = []
    for n in (1, 2, 1, 2):
        with torch_threads(n):
            results.append(_swap_and_grad(backend, x, perm, mask, g))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_deterministic_algorithms_mode_is_honoured():
    # every fastsd backend is deterministic (gathers, no atomics): auto still picks the fast one
    x, partner, mask = PATCH_SWAP_PARITY[0].make(torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = _swap_and_grad("auto", x, partner, mask, torch.ones_like(x))
        b = _swap_and_grad("auto", x, partner, mask, torch.ones_like(x))
        pairs = fastsd.intra_class_pairs(torch.randint(0, 3, (20,)), generator=torch.Generator().manual_seed(0))
        fastsd.patch_swap_mask(pairs, (4, 4), generator=torch.Generator().manual_seed(0))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_same_generator_state_same_result():
    labels = torch.randint(0, 5, (64,))
    x = torch.randn(64, 3, 16, 16)
    runs = [fastsd.intra_class_patch_swap(x, labels, generator=torch.Generator().manual_seed(11)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", COMPILED)
def test_two_python_threads_at_once(backend):
    cases = [c.make(torch.float32, seed=s) for s, c in enumerate(PATCH_SWAP_PARITY[:4])]
    expected = [R.patch_swap(*c) for c in cases]
    errors = []

    def worker(k):
        try:
            with fastsd.use_backend(backend):
                for _ in range(30):
                    for c, e in zip(cases, expected):
                        if not torch.equal(fastsd.patch_swap(*c), e):
                            errors.append(f"thread {k}: wrong answer")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    _run_in_two_threads(worker)
    assert not errors, errors[:3]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the RSS")
@pytest.mark.parametrize("backend", COMPILED)
def test_no_memory_growth_over_1000_calls(backend):
    x, partner, mask = PATCH_SWAP_PARITY[0].make(torch.float32)
    g = torch.randn(x.shape)

    def call():
        xr = x.clone().requires_grad_()
        with fastsd.use_backend(backend):
            fastsd.patch_swap(xr, partner, mask).backward(g)

    for _ in range(100):  # warm up allocator caches
        call()
    gc.collect()
    before = _rss_bytes()
    for _ in range(1000):
        call()
    gc.collect()
    growth = _rss_bytes() - before
    # one call allocates ~ 4 x 10 KB; a leak of even one tensor a call would be > 10 MB here
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 calls"


@pytest.mark.slow
@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ backend is not built")
def test_more_than_2_to_31_elements_uint8_cpp():
    # 2 x 1 x 32769 x 32769 = 2,147,614,722 elements > 2**31 (4 GiB for x and the output)
    B, C, H, W = 2, 1, 32769, 32769
    assert B * C * H * W > 2**31
    x = torch.empty(B, C, H, W, dtype=torch.uint8)
    x[0].fill_(7)
    x[1].fill_(200)
    x[1, 0, -1, -7:] = torch.arange(7, dtype=torch.uint8)  # distinct values at the far end
    partner = torch.tensor([1, 0])
    mask = torch.zeros(B, 3, 4, dtype=torch.bool)
    mask[:, 2, 3] = True  # the last cell: rows >= 21846, cols >= 24577 (offsets past 2**31 in sample 1)
    mask[:, 0, 0] = True
    with fastsd.use_backend("cpp"):
        out = fastsd.patch_swap(x, partner, mask)
    r0, c0 = -(-2 * H // 3), -(-3 * W // 4)  # first row / col of cell (2, 3): ceil(k * H / gh)
    assert (r0 - 1) * 3 // H == 1 and r0 * 3 // H == 2 and (c0 - 1) * 4 // W == 2 and c0 * 4 // W == 3
    # sample 0 took the far corner of sample 1 (including the distinct values), the rest stayed
    assert torch.equal(out[0, 0, -1, -7:], torch.arange(7, dtype=torch.uint8))
    assert int(out[0, 0, r0:, c0:].min()) == 0 and int(out[0, 0, r0:, c0:-7].min()) == 200
    assert int(out[0, 0, r0 - 1, :].max()) == 7 and int(out[0, 0, :r0, c0:].max()) == 7
    assert int(out[1, 0, r0:, c0:].max()) == 7 and int(out[1, 0, :r0, c0:].min()) == 200
    assert int(out[0, 0, : H // 3, : W // 4].min()) == 200 and int(out[1, 0, : H // 3, : W // 4].max()) == 7
    # and against the reference, on the rows that hold the largest offsets
    del x
    expected_rows = torch.full((2, 1, 2, W), 0, dtype=torch.uint8)
    expected_rows[0], expected_rows[1] = 7, 200
    expected_rows[0, :, :, c0:], expected_rows[1, :, :, c0:] = 200, 7
    expected_rows[0, 0, -1, -7:] = torch.arange(7, dtype=torch.uint8)
    assert torch.equal(out[:, :, -2:], expected_rows)


# --- losses and the ICP refiner ---------------------------------------------------------------------

from torch import nn  # noqa: E402

from fastsd import icp as icp_module  # noqa: E402
from test_losses import FEATURE_SHAPES, feature_inputs, pair_inputs  # noqa: E402


def _loss_inputs(seed=0):
    logits, labels, partner = pair_inputs(37, 100, 5, seed=seed)
    s, t = feature_inputs(torch.float32, seed=seed, layers=FEATURE_SHAPES)
    return logits.float(), labels, partner, s, t


def _losses_and_grads(backend, logits, labels, partner, s, t):
    """Every loss, forward and backward, in one call: the outputs and the gradients."""
    z = logits.clone().requires_grad_()
    xs = [x.clone().requires_grad_() for x in s]
    with fastsd.use_backend(backend):
        out = [fastsd.pair_kd_loss(z, labels, partner, temperature=3.0),
               fastsd.pair_kd_loss(z, labels, partner, teacher="symmetric"),
               fastsd.kd_loss(z, logits.flip(0), reduction="none"),
               fastsd.feature_alignment_loss(xs, t, kind="mse", weights="cosine"),
               fastsd.feature_alignment_loss(xs, t, kind="cosine", reduction="none")]
        torch.autograd.backward([o.sum() for o in out])
    return [o.detach() for o in out] + [z.grad] + [x.grad for x in xs]


@pytest.mark.parametrize("backend", COMPILED)
def test_losses_bitwise_deterministic_across_threads_and_calls(backend):
    inputs = _loss_inputs()
    results = []
    for n in (1, 2, 1, 2):
        with torch_threads(n):
            results.append(_losses_and_grads(backend, *inputs))
    for run in results[1:]:
        for a, b in zip(run, results[0]):
            assert torch.equal(a, b)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


class _Scale(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))

    def forward(self, x):
        return x * self.w


class _SumPixels(nn.Module):
    def forward(self, x):
        return x.flatten(2).sum(-1)


def _refine_and_distill(model, refiner, layers, x, y, state):
    model.load_state_dict(state)  # the distiller's train-mode pass moves BatchNorm's running stats
    model.zero_grad()
    out = fastsd.ICPDistiller(model, layers, refiner=refiner)(x, y, 0.8)
    out["loss"].backward()
    return [refiner(x, y), out["loss"].detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["sgd", "adam", "ademamix"])
def test_icp_refiner_bitwise_deterministic_across_threads_and_calls(method):
    # A model whose own forward and backward are elementwise or row-local (PyTorch's conv and
    # matmul kernels are not bitwise the same with 1 and 2 threads, whatever fastsd does): with it,
    # the refiner and the distiller must be. x is large enough for at::parallel_for to split it.
    model = nn.Sequential(_Scale((3, 32, 32)), _SumPixels())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 3, (64,), generator=g)
    refiner = fastsd.ICPRefiner(model, steps=3, step_size=0.05, method=method, clamp=(-2.0, 2.0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for n in (1, 2, 1, 2):
        with torch_threads(n):
            results.append(_refine_and_distill(model, refiner, ["0", "1"], x, y, state))
    assert not torch.equal(results[0][0], x)
    for run in results[1:]:
        for a, b in zip(run, results[0]):
            assert torch.equal(a, b)


def test_icp_refiner_bitwise_deterministic_across_calls_conv_model():
    # With a conv + BatchNorm model: repeated calls at a fixed thread count are bitwise equal.
    model = _tiny_model()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 3, 6, 6, generator=g), torch.randint(0, 5, (7,), generator=g)
    refiner = fastsd.ICPRefiner(model, steps=3, step_size=0.05, method="ademamix")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for n in (1, 2):
        with torch_threads(n):
            a, b = (_refine_and_distill(model, refiner, ["0", "4"], x, y, state) for _ in range(2))
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_losses_and_refiner_under_deterministic_algorithms():
    # auto picks the same (deterministic) backends as without the flag, and they run without error
    inputs = _loss_inputs(seed=1)
    model = _tiny_model()
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    prev = torch.are_deterministic_algorithms_enabled()
    free = _losses_and_grads("auto", *inputs)
    torch.use_deterministic_algorithms(True)
    try:
        chosen = fastsd._backend.select("pair_kd_loss", *inputs[:3])
        a = _losses_and_grads("auto", *inputs)
        b = _losses_and_grads("auto", *inputs)
        r = [fastsd.ICPRefiner(model, steps=2, method=m)(x, y) for m in ("adam", "adam")]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert chosen is fastsd._backend.select("pair_kd_loss", *inputs[:3])
    for u, v, w in zip(a, b, free):
        assert torch.equal(u, v) and torch.equal(u, w)
    assert torch.equal(r[0], r[1])


@pytest.mark.parametrize("backend", COMPILED)
def test_two_python_threads_call_the_losses_at_once(backend):
    cases = [_loss_inputs(seed=s) for s in range(3)]
    expected = [_losses_and_grads(backend, *c) for c in cases]
    errors = []

    def worker(k):
        try:
            for _ in range(15):
                for c, e in zip(cases, expected):
                    got = _losses_and_grads(backend, *c)
                    if not all(torch.equal(a, b) for a, b in zip(got, e)):
                        errors.append(f"thread {k}: wrong answer")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    _run_in_two_threads(worker)
    assert not errors, errors[:3]


def _rss_growth(call, n=1000, warmup=100):
    for _ in range(warmup):  # warm up allocator caches
        call()
    gc.collect()
    before = _rss_bytes()
    for _ in range(n):
        call()
    gc.collect()
    return _rss_bytes() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the RSS")
@pytest.mark.parametrize("backend", COMPILED)
def test_losses_no_memory_growth_over_1000_calls(backend):
    g = torch.Generator().manual_seed(0)
    logits, labels, partner = pair_inputs(8, 10, 3)
    logits = logits.float()
    s = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 8, 2, 2, generator=g)]
    t = [x + 0.5 for x in s]

    def call():
        z = logits.clone().requires_grad_()
        xs = [x.clone().requires_grad_() for x in s]
        with fastsd.use_backend(backend):
            loss = (fastsd.pair_kd_loss(z, labels, partner) + fastsd.kd_loss(z, logits.flip(0))
                    + fastsd.feature_alignment_loss(xs, t, kind="cosine", weights="cosine"))
        loss.backward()

    growth = _rss_growth(call)
    # a leak of even one tensor (>= 4 KiB with its allocation) a call would be > 4 MB here
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 calls"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the RSS")
def test_icp_refiner_no_memory_growth_over_1000_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(27, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    x, y = torch.randn(4, 3, 3, 3), torch.randint(0, 5, (4,))
    refiner = fastsd.ICPRefiner(model, steps=2, method="ademamix")  # 2 forward + backward passes a call

    def call():
        refiner(x, y)

    growth = _rss_growth(call)
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 calls"


def test_icp_graph_cache_is_bounded_and_evicted_graphs_are_freed(monkeypatch):
    """No CUDA here: the graph bookkeeping runs with a stand-in graph (as in test_icp), over many
    shapes; the cache keeps at most max_graphs entries and drops the evicted ones' buffers."""
    import weakref

    def stand_in(body, dev, pool):
        body()
        return types.SimpleNamespace(replay=body)

    monkeypatch.setattr(icp_module, "_cuda_graph_of", stand_in)
    model = _tiny_model()
    refiner = fastsd.ICPRefiner(model, steps=1, max_graphs=3)
    monkeypatch.setattr(refiner, "_use_graph", lambda x: True)
    graphs, buffers = [], []  # weak references to every graph entry made, and to its buffers
    for b in range(1, 41):
        x, y = torch.randn(b, 3, 6, 6), torch.randint(0, 5, (b,))
        refiner(x, y)
        assert len(refiner._graphs) <= 3
        for entry in refiner._graphs.values():
            if not any(r() is entry for r in graphs):
                graphs.append(weakref.ref(entry))
                buffers.extend(weakref.ref(t) for t in (entry.x_in, entry.x_buf) + entry.state if t is not None)
    assert len(graphs) == 40  # one capture per shape
    gc.collect()
    live_ids = {id(t) for g in refiner._graphs.values() for t in (g.x_in, g.x_buf) + g.state if t is not None}
    assert len(refiner._graphs) == 3 and len(live_ids) == 3 * 4  # x_in, x_buf, m, v of the last three
    assert sum(r() is not None for r in buffers) == len(live_ids), "an evicted graph's buffers are still alive"
    del entry  # the test's own last reference
    refiner.reset()
    gc.collect()
    assert not refiner._graphs and all(r() is None for r in buffers)
