"""Kernels run on the tensors' GPU, not on the current one (issue 11 section 1).

Triton launches on ``torch.cuda.current_device()``, whatever device the tensors are on. Here, on a
machine without a GPU, a fake two-GPU layer says the tensors are on ``cuda:1`` where fastsd's
backend choice reads their devices (``_backend._devices``; the data stay on the CPU, where the
Triton interpreter runs the kernels) while the fake current device is 0, and each Triton launch
(and each call of the ``cuda`` backend's C++ op) records the current device. Every launch must see
1, whichever path it takes, and device 0 must be current again after the call. A ``gpu`` test
does the same on two real GPUs.
"""
import types

import pytest
import torch

import fastsd
from fastsd import _backend, _ext
from fastsd import icp as icp_module
from fastsd import reference

pytestmark = pytest.mark.skipif(bool(_backend.triton_import_error()) or not _backend.triton_interpreting(),
                                reason="the Triton kernels run under the interpreter here")

TENSOR_DEVICE = torch.device("cuda", 1)


class FakeGPUs:
    """torch.cuda's current device for two fake GPUs, and a record of what each launch saw."""

    def __init__(self):
        self.current = 0
        self.entered = 0  # how often a device guard switched devices
        self.launches = []  # (what, current device at launch)

    def current_device(self):
        return self.current

    def device(self, index):
        gpus = self

        class _Guard:
            def __enter__(self):
                self.saved, gpus.current = gpus.current, index
                gpus.entered += 1

            def __exit__(self, *exc):
                gpus.current = self.saved

        return _Guard()

    def launched(self, what):
        self.launches.append((what, self.current))


@pytest.fixture
def two_gpus(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    gpus = FakeGPUs()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", gpus.current_device)
    monkeypatch.setattr(torch.cuda, "device", gpus.device)
    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):  # every Triton launch
        gpus.launched(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    real_devices = _backend._devices  # what backend choice (and the guard) reads of the tensors
    monkeypatch.setattr(_backend, "_devices",
                        lambda tensors: tuple(TENSOR_DEVICE if d.type == "cpu" else d for d in real_devices(tensors)))
    _backend.clear_caches()
    yield gpus
    _backend.clear_caches()


@pytest.fixture
def fake_cuda_extension(monkeypatch, two_gpus):
    """The ``cuda`` backend's C++ ops (fastsd._C built with CUDA), standing in: each records the
    current device and returns the reference's result."""
    def op(name, ref):
        def call(*args):
            two_gpus.launched(name)
            return ref(*args)
        return call

    fake = types.SimpleNamespace(patch_swap=op("patch_swap", reference.patch_swap),
                                 patch_swap_backward=op("patch_swap_backward", reference.patch_swap_backward))
    monkeypatch.setattr(_ext, "load_error", lambda: None)
    monkeypatch.setattr(_ext, "has_cuda", lambda: True)
    monkeypatch.setattr(_ext, "ops", lambda: fake)
    _backend.clear_caches()
    return two_gpus


def _inputs(device, *shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(device) for shape in shapes]


def _patch_swap_fwd_bwd(device):
    x, g = _inputs(device, (4, 3, 8, 8), (4, 3, 8, 8))
    x.requires_grad_()
    mask = torch.tensor([True, False, False, True] * 4).view(4, 2, 2).to(device)
    out = fastsd.patch_swap(x, torch.tensor([1, 0, 3, 2]).to(device), mask)
    out.backward(g)
    return [out, x.grad]


def _losses_fwd_bwd(device):
    logits, teacher, feats, target = _inputs(device, (6, 10), (6, 10), (2, 4, 3, 3), (2, 4, 3, 3))
    logits.requires_grad_()
    feats.requires_grad_()
    labels, partner = torch.tensor([0, 0, 1, 1, 2, 2]).to(device), torch.tensor([1, 0, 3, 2, 5, 4]).to(device)
    losses = [fastsd.pair_kd_loss(logits, labels, partner), fastsd.kd_loss(logits, teacher)]
    losses += [fastsd.feature_alignment_loss(feats, target, kind=kind) for kind in ("mse", "cosine")]
    sum(losses).backward()
    return losses + [logits.grad, feats.grad]


def _icp_update(device):
    out = []
    for method in ("sgd", "adam", "ademamix"):
        x, g = _inputs(device, (2, 3, 5, 5), (2, 3, 5, 5))
        m, v, m2 = icp_module.new_state(x, method)
        icp_module.icp_update_(x, g, m, v, m2, method=method, step=1, step_size=0.1)
        out.append(x)
    return out


def _pairing_fwd_bwd(device):
    (x,) = _inputs(device, (6, 2, 8, 8))
    x.requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 1, 2]).to(device)
    out, partner, mask = fastsd.intra_class_patch_swap(x, labels, patch_size=2, ratio=0.5,
                                                       generator=torch.Generator(device=device).manual_seed(0))
    out.backward(torch.ones_like(out))
    return [out, partner, mask, x.grad]


OPS = {"patch_swap": _patch_swap_fwd_bwd, "losses": _losses_fwd_bwd, "icp_update": _icp_update,
       "pairing": _pairing_fwd_bwd}
EXPECTED = {  # the kernels each call launches
    "patch_swap": {"cell_select_kernel"},
    "losses": {"_pair_counts_kernel", "_pair_kd_kernel", "_kd_kernel", "_feature_elementwise_kernel",
               "_feature_cosine_kernel"},
    "icp_update": {"icp_sgd_update_kernel", "icp_adam_update_kernel"},
    "pairing": {"_pair_kernel", "_mask_kernel", "cell_select_kernel"},
}


@pytest.mark.parametrize("op", list(OPS))
def test_triton_launches_on_the_tensors_device(two_gpus, op):
    with fastsd.use_backend("triton"):
        OPS[op]("cpu")
    assert {what for what, _ in two_gpus.launches} == EXPECTED[op]
    wrong = [(what, dev) for what, dev in two_gpus.launches if dev != TENSOR_DEVICE.index]
    assert not wrong, f"launched on the current device instead of the tensors' cuda:1: {wrong}"
    assert two_gpus.current == 0  # the caller's current device is restored


def test_cuda_extension_runs_on_the_tensors_device(fake_cuda_extension):
    with fastsd.use_backend("cuda"):
        _patch_swap_fwd_bwd("cpu")
    assert [w for w, _ in fake_cuda_extension.launches] == ["patch_swap", "patch_swap_backward"]
    assert {dev for _, dev in fake_cuda_extension.launches} == {TENSOR_DEVICE.index}
    assert fake_cuda_extension.current == 0


def test_no_guard_when_the_device_is_current(two_gpus):
    two_gpus.current = TENSOR_DEVICE.index
    with fastsd.use_backend("triton"):
        _icp_update("cpu")
    assert two_gpus.launches and two_gpus.entered == 0


def test_cpu_ops_are_not_wrapped():
    x = torch.randn(2, 3, 4, 4)
    for backend in ("torch", "cpp"):
        if _backend.reasons("patch_swap", backend, x):
            continue
        with fastsd.use_backend(backend):
            fn = _backend.select("patch_swap", x, torch.tensor([1, 0]), torch.ones(2, 1, 1, dtype=torch.bool))
        assert fn is _backend._REGISTRY["patch_swap"][backend].fn


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("op", list(OPS))
def test_kernels_on_second_gpu(op, monkeypatch):
    """On two real GPUs: tensors on cuda:1 with device 0 current. Every Triton launch sees device 1
    current, the results match the same call on cuda:0, and device 0 is current afterwards."""
    from triton.runtime.jit import JITFunction

    seen = []
    real_run = JITFunction.run

    def run(self, *args, **kwargs):
        seen.append(torch.cuda.current_device())
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", run)
    results = {}
    for index in (0, 1):
        seen.clear()
        with torch.cuda.device(0), fastsd.use_backend("triton"):
            results[index] = [t.detach().cpu() for t in OPS[op](torch.device("cuda", index))]
            assert torch.cuda.current_device() == 0
        assert seen and set(seen) == {index}, seen
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b)
