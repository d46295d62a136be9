"""The eager path (fastsd/_eager.py): an eager call skips torch.library's dispatch and the custom
op's autograd wrapper (tens of microseconds of host time a call), computes what the registered op
computes, and leaves the registered op to everything that traces.

The launch counts of the eager path against the registered op's are in test_launches.py; opcheck
and torch.compile(fullgraph=True) of the registered ops in test_patch_swap.py, test_losses.py and
test_launches.py.
"""
import pytest
import torch
from torch.autograd.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

import fastsd
from fastsd import _backend, _eager

BACKENDS = ["torch"] + ([] if _backend.reasons("patch_swap", "cpp", torch.empty(0)) else ["cpp"])


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(4, 3, 8, 8, generator=g, requires_grad=True),
        partner=torch.tensor([2, 0, 3, 1]),  # a permutation, not an involution
        pairs=torch.tensor([1, 0, 3, 2]),
        mask=torch.rand(4, 2, 2, generator=g) < 0.5,
        labels=torch.tensor([1, 1, 2, 2]),
        logits=torch.randn(4, 10, generator=g, requires_grad=True),
        teacher=torch.randn(4, 10, generator=g),
        student=[torch.randn(2, 4, 4, 4, generator=g, requires_grad=True),
                 torch.randn(2, 8, 2, 2, generator=g).to(memory_format=torch.channels_last).requires_grad_()],
        target=[torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 8, 2, 2, generator=g)],
    )


# name -> (call(inputs) -> output, the inputs it differentiates)
CALLS = {
    "patch_swap": (lambda a: fastsd.patch_swap(a["x"], a["partner"], a["mask"]), ["x"]),
    "intra_class_patch_swap": (lambda a: fastsd.intra_class_patch_swap(
        a["x"], a["labels"], patch_size=4, generator=torch.Generator().manual_seed(1))[0], ["x"]),
    "pair_kd_loss": (lambda a: fastsd.pair_kd_loss(a["logits"], a["labels"], a["pairs"]), ["logits"]),
    "kd_loss": (lambda a: fastsd.kd_loss(a["logits"], a["teacher"], reduction="none"), ["logits"]),
    "feature_alignment_loss": (lambda a: fastsd.feature_alignment_loss(a["student"], a["target"], weights="cosine",
                                                                       reduction="none"), ["student"]),
}


def _run(name, backward=True, create_graph=False):
    """The call's output and its gradients (with grad_outputs of ones)."""
    call, wrt = CALLS[name]
    a = _inputs()
    out = call(a)
    if not backward:
        return out, []
    leaves = [t for k in wrt for t in (a[k] if isinstance(a[k], list) else [a[k]])]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out), create_graph=create_graph)
    return out, list(grads)


def _registered_op_events(fn):
    """Profiler events of fastsd's registered ops (``fastsd::<op>``) and of their autograd nodes."""
    with profile() as prof:
        fn()
    names = {e.name for e in prof.function_events}
    assert any(n.startswith("aten::") for n in names)  # the profiler saw the call
    return sorted(n for n in names if n.startswith("fastsd::") or "GeneratedBackwardFor_fastsd" in n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CALLS))
def test_eager_call_skips_the_registered_op(name, backend):
    with fastsd.use_backend(backend):
        assert _registered_op_events(lambda: _run(name)) == []
        with torch.no_grad():
            assert _registered_op_events(lambda: _run(name, backward=False)) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CALLS))
def test_eager_path_computes_what_the_registered_op_does(name, backend, monkeypatch):
    with fastsd.use_backend(backend):
        out, grads = _run(name)
        monkeypatch.setattr(_eager, "eager", lambda tensors: False)
        assert _registered_op_events(lambda: _run(name))  # now through the registered op
        want, want_grads = _run(name)
    assert out.dtype == want.dtype and out.shape == want.shape and torch.equal(out, want)
    assert out.requires_grad and out.grad_fn is not None
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads):
        assert g.stride() == w.stride() and torch.equal(g, w)


def _double_backward(partner):
    """patch_swap's backward, differentiated in its grad_output (the forward, its adjoint)."""
    a = _inputs()
    out = fastsd.patch_swap(a["x"], partner, a["mask"])
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    (g,) = torch.autograd.grad(out, a["x"], v, create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g, v, torch.randn(g.shape, generator=torch.Generator().manual_seed(3)))
    return g, gg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("partner", ["partner", "pairs"])
def test_double_backward_matches_the_registered_op(backend, partner, monkeypatch):
    p = _inputs()[partner]
    with fastsd.use_backend(backend):
        assert _registered_op_events(lambda: _double_backward(p)) == []
        got = _double_backward(p)
        monkeypatch.setattr(_eager, "eager", lambda tensors: False)
        want = _double_backward(p)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(CALLS))
def test_tracing_modes_get_the_registered_op(name):
    """A dispatch mode (make_fx, fake tensors, FakeGraph, traffic counters) sees the registered ops."""
    with _Recorder() as rec:
        _run(name)
    op = {"intra_class_patch_swap": "patch_swap"}.get(name, name)
    assert f"fastsd.{op}.default" in rec.ops, rec.ops


def test_eager_predicate():
    x = torch.zeros(2)
    assert _eager.eager([x, torch.nn.Parameter(torch.zeros(1))])
    with _Recorder():
        assert not _eager.eager([x])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not _eager.eager([fake])
    seen = []
    torch.func.grad(lambda t: seen.append(_eager.eager([t])) or t.sum())(x)
    assert seen == [False]


@pytest.mark.parametrize("name", list(CALLS))
def test_eager_path_is_labelled_in_a_profile(name):
    """A profile of an eager step still names fastsd's work (examples/_common.py's share reads it):
    ``fastsd.<op>`` around the forward and ``fastsd.<op> (backward)`` around its backward."""
    op = {"intra_class_patch_swap": "patch_swap"}.get(name, name)
    with profile() as prof:
        _run(name)
    names = {e.name for e in prof.function_events}
    assert f"fastsd.{op}" in names and f"fastsd.{op} (backward)" in names, sorted(n for n in names if "fastsd" in n)


def test_no_grad_path_records_no_graph_through_other_inputs():
    """needs_grad False (the caller's differentiable input needs none): the body runs as the
    registered op's does, below autograd, so an aten body builds no graph through another input."""
    def scaled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * w

    lib_fn = torch.library.custom_op("fastsd_test::scaled", mutates_args=())(scaled)
    path = _eager.Path(lib_fn, scaled)
    x, w = torch.ones(3), torch.full((3,), 2.0, requires_grad=True)
    out = path((x, w), False, x, w)
    assert not out.requires_grad and torch.equal(out, torch.full((3,), 2.0))
