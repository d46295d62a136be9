"""Kernel launches per public call on CUDA (issue 12), counted here without a GPU.

fastsd.bench.launches counts the aten ops (views, metadata and bare allocations excepted) and the
Triton launches of a call, forward and backward, with the Triton backend under the interpreter and
fastsd's device branches on their CUDA side. Each op has a budget of launches per call, forward plus
backward; CI fails when one is exceeded.

Some budgets rest on the Triton kernels checking indices on the device and on the forward's inverse
permutation reaching the backward kernel (kernels/patch_swap.py, kernels/losses.py): the glue passes
those launcher arguments where the launchers take them (``fastsd._validate.launcher_takes``); the
tests of the glue below spy on the launchers to check that it does and drops its host-side checks.
``intra_class_patch_swap`` meets its budget with the pairing and mask kernels (kernels/pairing.py).

Under torch.compile (the last tests), what Inductor fuses around the custom ops, read off its
generated code.
"""
import inspect

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastsd
from fastsd import _backend
from fastsd import _validate as V
from fastsd.bench.launches import compiled_kernels, count_launches, counting

pytestmark = pytest.mark.skipif(bool(_backend.triton_import_error()) or not _backend.triton_interpreting(),
                                reason="counts the Triton path under the interpreter (tests/conftest.py sets it)")


def _kernels(name):
    import importlib

    return importlib.import_module(f"fastsd.kernels.{name}")


def _inputs():
    g = torch.Generator().manual_seed(0)
    B = 8
    return dict(
        x=torch.randn(B, 3, 16, 16, generator=g, requires_grad=True),
        partner=torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]),
        mask=torch.rand(B, 4, 4, generator=g) < 0.5,
        mask_u8=(torch.rand(B, 4, 4, generator=g) < 0.5).to(torch.uint8) * 3,
        labels=torch.tensor([1, 1, 2, 2, 3, 3, 0, 0]),
        logits=torch.randn(B, 10, generator=g, requires_grad=True),
        teacher=torch.randn(B, 10, generator=g),
        student=[torch.randn(2, 4, 4, 4, generator=g, requires_grad=True),
                 torch.randn(2, 8, 2, 2, generator=g, requires_grad=True)],
        target=[torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 8, 2, 2, generator=g)],
        boxes=torch.tensor([[2, 9, 3, 12], [0, 16, 0, 16], [5, 5, 0, 16], [1, 15, 7, 8]] * 2),
        lam=torch.rand(B, generator=g),
        use_box=torch.tensor([True, False] * 4),
    )


CALLS = {
    "patch_swap": lambda a: fastsd.patch_swap(a["x"], a["partner"], a["mask"]),
    # a uint8 mask: no conversion where the kernel compares its bytes with 0 (every path but the
    # EACH words of 1- and 2-byte elements: test_uint8_mask_converted_only_for_each_words)
    "patch_swap_uint8_mask": lambda a: fastsd.patch_swap(a["x"], a["partner"], a["mask_u8"]),
    "intra_class_patch_swap": lambda a: fastsd.intra_class_patch_swap(
        a["x"], a["labels"], patch_size=4, generator=torch.Generator().manual_seed(0)),
    "pair_kd_loss": lambda a: fastsd.pair_kd_loss(a["logits"], a["labels"], a["partner"]),
    "kd_loss": lambda a: fastsd.kd_loss(a["logits"], a["teacher"]),
    "feature_alignment_loss": lambda a: fastsd.feature_alignment_loss(a["student"], a["target"]),
    "mix": lambda a: fastsd.mix.mix(a["x"], a["partner"], a["boxes"], a["lam"], a["use_box"]),
}

# Launches per call on CUDA, forward + backward (issue 12; before it: 8, 52, 21, 4 and 3).
BUDGET = {"patch_swap": 3, "patch_swap_uint8_mask": 3, "intra_class_patch_swap": 8, "pair_kd_loss": 4, "kd_loss": 3, "feature_alignment_loss": 3,
          # the value checks (a sort and the check kernel's device-side asserts) and the mix kernel;
          # backward: a sort (the inverse permutation) and the gather kernel (before: 24 + 2, the
          # value checks in ATen ops)
          "mix": 5}


def _count(name):
    inputs = _inputs()
    with fastsd.use_backend("triton"):
        return count_launches(lambda: CALLS[name](inputs))


@pytest.mark.parametrize("name", list(BUDGET))
def test_launch_budget(name, record_property):
    n = _count(name)
    report = f"{name}: {n['forward']} + {n['backward']} launches: {n['ops']}"
    record_property("launches", report)
    print(report)
    assert n["backward"] > 0, report  # the backward ran and was counted
    assert n["host_syncs"] == 0, report
    assert n["total"] <= BUDGET[name], report


@pytest.mark.parametrize("name", list(BUDGET))
def test_eager_path_launches_what_the_registered_op_launches(name, monkeypatch):
    """The count above is of the eager path (fastsd/_eager.py: the launch counter only watches);
    through the registered custom ops the same kernels launch, forward and backward."""
    from fastsd import _eager

    eager = _count(name)
    monkeypatch.setattr(_eager, "eager", lambda tensors: False)
    registered = _count(name)
    assert eager["ops"] == registered["ops"] and eager["host_syncs"] == registered["host_syncs"] == 0


def test_uint8_mask_converted_only_for_each_words():
    """The Triton launcher makes a uint8 mask 0/1 (``mask != 0``, one launch) only where its kernel
    multiplies mask bytes by bit fields: the EACH forward of 1- and 2-byte elements (here float16 in
    3-px cells); its backward, and float32 (test_launch_budget), compare the bytes with 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 6, 24, generator=g).half().requires_grad_()
    partner, mask = torch.tensor([1, 0, 3, 2]), torch.rand(4, 3, 8, generator=g) < 0.5
    assert _kernels("patch_swap").launch_config(x, 3, 8, False)[3]  # EACH
    with fastsd.use_backend("triton"):
        n = {m.dtype: count_launches(lambda m=m: fastsd.patch_swap(x, partner, m)) for m in (mask, mask.to(torch.uint8))}
    assert n[torch.uint8]["forward"] == n[torch.bool]["forward"] + 1, n
    assert n[torch.uint8]["backward"] == n[torch.bool]["backward"], n


# --- the glue's CUDA side: the launcher arguments of issue 12, faked -------------------------------


def _launcher_with(monkeypatch, module, name, arg, calls, run=None):
    """Spy on a Triton launcher's ``arg`` (recorded in ``calls``). A launcher without it is replaced
    by one that takes it, as the changed kernels/ launcher will; the real kernel still runs (through
    ``run(value, *args)`` when the argument is given and ``run`` is)."""
    original = getattr(module, name)
    signature = inspect.signature(original)
    native = arg in signature.parameters

    def launcher(*args, **kwargs):
        value = kwargs.get(arg) if native else kwargs.pop(arg, None)
        calls.append(value)
        return original(*args, **kwargs) if native or value is None or run is None else run(value, *args)

    launcher.__signature__ = signature if native else signature.replace(
        parameters=[*signature.parameters.values(), inspect.Parameter(arg, inspect.Parameter.KEYWORD_ONLY, default=None)])
    monkeypatch.setattr(module, name, launcher)


def test_patch_swap_glue_uses_device_checks_and_the_saved_inverse(monkeypatch):
    k = _kernels("patch_swap")
    sorted_calls, inverse_calls = [], []
    _launcher_with(monkeypatch, k, "patch_swap", "sorted_partner", sorted_calls)
    _launcher_with(monkeypatch, k, "patch_swap_backward", "inverse_partner", inverse_calls,
                   run=lambda inverse, grad, partner, mask: k._launch(grad, inverse, mask, backward=True))
    inputs = _inputs()
    partner = torch.tensor([2, 0, 3, 1, 5, 4, 7, 6])  # not an involution: the inverse differs from it
    with fastsd.use_backend("triton"):
        n = count_launches(lambda: fastsd.patch_swap(inputs["x"], partner, inputs["mask"]))
    assert n["ops"] == {"forward": ["aten.sort", "triton.cell_select_kernel"],
                        "backward": ["triton.cell_select_kernel"]}
    assert torch.equal(sorted_calls[-1], torch.sort(partner).values)
    assert torch.equal(inverse_calls[-1], torch.argsort(partner))
    # On CPU tensors outside the count (the interpreter ignores tl.device_assert) the glue checks.
    with fastsd.use_backend("triton"):
        with pytest.raises(ValueError, match="partner must be a permutation"):
            fastsd.patch_swap(inputs["x"], torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]), inputs["mask"])
        assert len(sorted_calls) == 1  # raised before the launch
        fastsd.patch_swap(inputs["x"], partner, inputs["mask"])
        assert sorted_calls[-1] is None
        # fastsd's own pairs: an involution, its own inverse, neither sorted nor checked
        n = count_launches(lambda: fastsd.intra_class_patch_swap(inputs["x"], inputs["labels"], patch_size=4))
    assert "aten.sort" not in n["ops"]["forward"][-2:] and n["ops"]["backward"] == ["triton.cell_select_kernel"]
    assert sorted_calls[-1] is None
    pairs = inverse_calls[-1]
    assert torch.equal(pairs[pairs], torch.arange(8))  # the partner itself


def test_pair_kd_glue_uses_device_checks(monkeypatch):
    calls = []
    _launcher_with(monkeypatch, _kernels("losses"), "pair_kd_loss", "check_indices", calls)
    inputs = _inputs()
    with fastsd.use_backend("triton"):
        n = count_launches(lambda: fastsd.pair_kd_loss(inputs["logits"], inputs["labels"], inputs["partner"]))
    assert calls == [True]
    assert n["ops"]["forward"] == ["triton._pair_counts_kernel", "triton._pair_kd_kernel", "aten.sum"]
    with fastsd.use_backend("triton"):  # CPU tensors: the glue checks
        with pytest.raises(ValueError, match="labels"):
            fastsd.pair_kd_loss(inputs["logits"], inputs["labels"] + 10, inputs["partner"])
        assert calls == [True]  # raised before the launch
        fastsd.pair_kd_loss(inputs["logits"], inputs["labels"], inputs["partner"])
    assert calls == [True, None]


def test_mix_glue_leaves_the_value_checks_to_the_kernel(monkeypatch):
    k = _kernels("mix")
    mix_calls, check_calls = [], []
    _launcher_with(monkeypatch, k, "mix", "check", mix_calls)
    _launcher_with(monkeypatch, k, "mix_", "check", check_calls)
    a = _inputs()
    x = a["x"].detach()
    args = (a["boxes"], a["lam"], a["use_box"])
    partner = torch.tensor([2, 0, 3, 1, 5, 4, 7, 6])
    with fastsd.use_backend("triton"):
        n = count_launches(lambda: fastsd.mix.mix(x, partner, *args))
        assert n["ops"]["forward"] == ["aten.sort", "triton.mix_check_kernel", "triton.mix_kernel"]
        assert mix_calls == [True]
        y = x.clone()
        n = count_launches(lambda: fastsd.mix.mix_(y, a["partner"], *args))
        assert n["ops"]["forward"] == ["triton.mix_check_kernel", "triton.mix_kernel"] and check_calls == [True]
        # the samplers' arguments are right by construction: no checks
        count_launches(lambda: fastsd.mix.op.mix_unchecked(x, partner, *args))
        assert mix_calls[-1] is False
        # On CPU tensors outside the count (the interpreter ignores tl.device_assert) the glue checks.
        with pytest.raises(ValueError, match="partner must be a permutation"):
            fastsd.mix.mix(x, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]), *args)
        with pytest.raises(ValueError, match="lam must be in"):
            fastsd.mix.mix(x, partner, a["boxes"], a["lam"] + 1, a["use_box"])
        with pytest.raises(ValueError, match="involution"):
            fastsd.mix.mix_(x.clone(), partner, *args)
        assert len(mix_calls) == 2 and check_calls == [True]  # raised before the launch
        fastsd.mix.mix(x, partner, *args)
        fastsd.mix.mix_(x.clone(), a["partner"], *args)
    assert mix_calls[-1] is False and check_calls[-1] is False


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_opcheck_of_the_new_arguments(backend):
    if _backend.reasons("patch_swap", backend, torch.empty(0)):
        pytest.skip(f"{backend} cannot run here")
    inputs = _inputs()
    x, mask = inputs["x"][:4].detach().requires_grad_(), inputs["mask"][:4]
    partner = torch.tensor([2, 0, 3, 1])
    with fastsd.use_backend(backend):
        out, inverse = torch.ops.fastsd.patch_swap(x, partner, mask)
        assert torch.equal(inverse, torch.argsort(partner))
        torch.library.opcheck(torch.ops.fastsd.patch_swap.default, (x, partner, mask))
        torch.library.opcheck(torch.ops.fastsd.patch_swap.default, (x, torch.tensor([1, 0, 3, 2]), mask, True))
        torch.library.opcheck(torch.ops.fastsd.patch_swap_backward.default, (x.detach(), partner, mask, inverse))


# --- the counter ------------------------------------------------------------------------------


def test_counter_counts_kernels_not_views_or_allocations():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    n = count_launches(lambda: (a.view(-1)[2:].unsqueeze(0), torch.empty(7), torch.empty_like(a)))
    assert n["total"] == 0
    n = count_launches(lambda: torch.add(a, b).sum())
    assert n["ops"] == {"forward": ["aten.add", "aten.sum"], "backward": []}  # nothing requires grad
    w = torch.randn(5, requires_grad=True)
    n = count_launches(lambda: (a * w).sum())
    assert n["forward"] == 2 and n["backward"] >= 1
    n = count_launches(lambda: a.sum().item())
    assert n["host_syncs"] == 1 and n["forward"] == 1


def test_counter_counts_triton_launches_not_the_interpreters_copies():
    k = _kernels("patch_swap")
    inputs = _inputs()
    x = inputs["x"].detach()
    n = count_launches(lambda: k.patch_swap(x, inputs["partner"], inputs["mask"]))
    assert n["ops"]["forward"] == ["triton.cell_select_kernel"]


def test_counter_opens_custom_ops_and_takes_the_cuda_side():
    inputs = _inputs()
    x = inputs["x"].detach()
    seen = []
    with fastsd.use_backend("triton"):
        with counting() as c:
            seen.append(V.kernel_asserts(x))
            fastsd.patch_swap(x, inputs["partner"], inputs["mask"])
        seen.append(V.kernel_asserts(x))
    assert seen == [True, False]
    assert "triton.cell_select_kernel" in c.launches and "aten.sort" in c.launches  # inside the custom op


# --- ICP: a distillation step adds no copy per model buffer ---------------------------------------


class _BufferCopies(TorchDispatchMode):
    """Copies (clone, copy_, _to_copy) that read one of the given buffers."""

    def __init__(self, buffers):
        super().__init__()
        self.ptrs = {b.untyped_storage().data_ptr() for b in buffers}
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("clone", "copy_", "_to_copy", "copy"):
            reads = args[1:] if name == "copy_" else args[:1]
            if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.ptrs for t in reads):
                self.copies.append(name)
        return func(*args, **(kwargs or {}))


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn2(torch.relu(self.bn1(self.conv(x)))).mean((2, 3)))


def test_icp_distillation_step_copies_no_buffer():
    torch.manual_seed(0)
    model = _BNNet()
    distiller = fastsd.ICPDistiller(model, ["bn1", "bn2"], refiner=fastsd.ICPRefiner(model, steps=2), warmup=0.0)
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0])
    buffers = list(model.buffers())
    with _BufferCopies(buffers) as spy:
        distiller(x, y, 0.5)["loss"].backward()
    assert spy.copies == [], f"{len(spy.copies)} copies of {len(buffers)} buffers: {spy.copies}"


# --- torch.compile: what Inductor fuses around the ops ---------------------------------------------
# fastsd's ops are custom ops, opaque to Inductor: under torch.compile the ops and glue *around* them
# fuse, what runs inside an op launches as in eager. Inductor writes Triton kernels for CUDA tensors
# only on a machine with a GPU (its Triton code generation asks Triton's active driver for the target;
# here there is none: "0 active drivers"), so the fusion is shown with its C++ code generation on CPU
# tensors: the same graph, the same scheduler deciding what fuses.


def test_compiled_pairing_is_its_ops():
    import torch._inductor.config as inductor_config

    inputs = _inputs()
    x = inputs["x"]
    swap = torch.compile(lambda: fastsd.intra_class_patch_swap(x, inputs["labels"], patch_size=4)[0], fullgraph=True)
    torch._dynamo.reset()
    with fastsd.use_backend("triton"), inductor_config.patch(fallback_random=False):
        eager = _count("intra_class_patch_swap")
        graphs = compiled_kernels(lambda: swap().backward(torch.ones_like(x)))
    forward, backward = graphs
    # The pairing, the masks and the swap are one op each (one kernel each inside, an involution
    # swapped unchecked); around them only the random draws remain: randperm (an extern kernel) and
    # the noise (generated), no glue left to fuse, and nothing more than eager launches.
    swap_ops = [c for c in forward["calls"] if c.startswith("torch.ops.fastsd")]
    assert swap_ops == ["torch.ops.fastsd.intra_class_pairs", "torch.ops.fastsd.patch_swap_mask",
                        "torch.ops.fastsd.patch_swap"], forward
    assert [c for c in forward["calls"] if c not in swap_ops] == ["torch.ops.aten.randperm"], forward
    assert forward["generated"] <= 1, forward
    inside_pairs = 2  # the op's gather and stable sort around its kernel
    assert forward["generated"] + len(forward["calls"]) + inside_pairs <= eager["forward"], (forward, eager)
    assert [c for c in backward["calls"] if c.startswith("torch.ops.fastsd")] == ["torch.ops.fastsd.patch_swap_backward"]


def test_compiled_loss_backward_epilogues_fuse():
    inputs = _inputs()
    z, labels, partner, teacher = inputs["logits"], inputs["labels"], inputs["partner"], inputs["teacher"]
    step = torch.compile(lambda: fastsd.pair_kd_loss(z, labels, partner) + 0.5 * fastsd.kd_loss(z, teacher),
                         fullgraph=True)
    torch._dynamo.reset()
    with fastsd.use_backend("triton"):
        forward, backward = compiled_kernels(lambda: step().backward())
    assert sorted(forward["calls"]) == ["torch.ops.fastsd.kd_loss", "torch.ops.fastsd.pair_kd_loss"]
    # Each loss's backward scales its saved gradient by grad_output; the two scalings and the sum of
    # the two gradients are one kernel (eager: three launches).
    assert backward == {"generated": 1, "calls": []}
