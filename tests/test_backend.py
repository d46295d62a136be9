"""Backend choice (fastsd/_backend.py), the extension's status, and python -m fastsd.info."""
import subprocess
import sys

import pytest
import torch

import fastsd
from fastsd import _backend, _ext, info

X = torch.randn(2, 3, 8, 8)
P = torch.tensor([1, 0])
M = torch.ones(2, 2, 2, dtype=torch.bool)


def test_auto_picks_fastest_runnable_on_cpu():
    fn = _backend.select("patch_swap", X, P, M)
    expected = "cpp" if _ext.load_error() is None else "torch"
    assert fn is _backend._REGISTRY["patch_swap"][expected].fn
    # the interpreter is never chosen automatically, even when TRITON_INTERPRET=1 (tests)
    assert "triton" in _backend.available("patch_swap", X) or _backend.triton_import_error()


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTSD_BACKEND", "torch")
    assert _backend.select("patch_swap", X, P, M) is _backend._REGISTRY["patch_swap"]["torch"].fn
    monkeypatch.setenv("FASTSD_BACKEND", "cuda")
    with pytest.raises(fastsd.BackendUnavailableError, match="cuda.*inputs are on cpu"):
        fastsd.patch_swap(X, P, M)
    monkeypatch.setenv("FASTSD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTSD_BACKEND"):
        fastsd.patch_swap(X, P, M)
    # the context manager wins over the environment
    with fastsd.use_backend("torch"):
        assert torch.equal(fastsd.patch_swap(X, P, M), X[P])


def test_use_backend_validates_and_restores():
    with pytest.raises(ValueError, match="backend"):
        with fastsd.use_backend("gpu"):
            pass
    with fastsd.use_backend("torch"):
        with fastsd.use_backend("auto"):
            assert _backend.forced_backend() is None
        assert _backend.forced_backend() == "torch"
    assert _backend.forced_backend() is None


def test_use_backend_reentered_raised_through_and_as_a_decorator():
    force_torch = fastsd.use_backend("torch")
    with force_torch:
        with fastsd.use_backend("cpp"):
            with force_torch:  # the same object inside itself
                assert _backend.forced_backend() == "torch"
            assert _backend.forced_backend() == "cpp"
        assert _backend.forced_backend() == "torch"
    assert _backend.forced_backend() is None
    with pytest.raises(KeyError):
        with fastsd.use_backend("cpp"):
            raise KeyError("not swallowed")
    assert _backend.forced_backend() is None

    @fastsd.use_backend("cpp")
    def forced():
        return _backend.forced_backend()

    assert forced() == "cpp" and _backend.forced_backend() is None


def test_error_lists_every_backend_when_none_can_run(monkeypatch):
    monkeypatch.setitem(_backend._REGISTRY, "only_cuda", {"cuda": _backend.Impl(lambda *a: None)})
    with pytest.raises(fastsd.BackendUnavailableError) as err:
        _backend.select("only_cuda", X)
    text = str(err.value)
    for name in _backend.PREFERENCE:
        assert f"  {name}:" in text
    assert "inputs are on cpu" in text and "has no torch implementation" in text


def test_several_devices_is_a_reason():
    assert "several devices" in " ".join(_backend.reasons("patch_swap", "torch", X, P.to("meta")) +
                                          _backend.reasons("patch_swap", "cpp", X, P.to("meta")))


def test_missing_extension_is_explained(monkeypatch):
    _ext.load_error.cache_clear()
    _ext.has_cuda.cache_clear()
    _backend.clear_caches()
    monkeypatch.setitem(sys.modules, "fastsd._C", None)  # import fastsd._C now raises ImportError
    monkeypatch.delattr(fastsd, "_C", raising=False)
    try:
        err = _ext.load_error()
        assert err is not None and "fastsd._C is not available" in err
        assert any("fastsd._C is not available" in r for r in _backend.reasons("patch_swap", "cpp", X))
        with fastsd.use_backend("auto"):  # falls back to the reference
            assert torch.equal(fastsd.patch_swap(X, P, M), X[P])
    finally:
        monkeypatch.delitem(sys.modules, "fastsd._C")
        _ext.load_error.cache_clear()
        _ext.has_cuda.cache_clear()
        _backend.clear_caches()


def test_info_command_runs(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "patch_swap" in out and "fastsd._C" in out
    assert "cuda: inputs are on cpu" in out  # the reasons for unavailable backends are printed
    proc = subprocess.run([sys.executable, "-m", "fastsd.info", "--short"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "available:" in proc.stdout


def test_old_triton_is_not_offered():
    assert _backend.triton_version_reason("3.8.0") is None and _backend.triton_version_reason("4.0.1+git") is None
    assert _backend.triton_version_reason(_backend.TRITON_OLDEST_TESTED) is None
    assert _backend.triton_version_reason("3.5.0") is None
    assert "older than 3.4" in _backend.triton_version_reason("3.3.1")


def test_old_interpreter_with_new_numpy_is_not_offered(monkeypatch):
    """Triton 3.6's interpreter fails on NumPy 2.4 (loop bounds as 1-element arrays): the Triton
    backend is not offered on CPU tensors there, with the reason; compiled (CUDA) use is unaffected."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    _backend.triton_interpreter_error.cache_clear()
    try:
        why = _backend.triton_interpreter_error()
        assert why and "NumPy 2.4.6" in why and "Triton >= 3.8" in why
        monkeypatch.setattr(numpy, "__version__", "2.3.5")
        _backend.triton_interpreter_error.cache_clear()
        assert _backend.triton_interpreter_error() is None
        monkeypatch.setattr(triton, "__version__", "3.8.0")
        monkeypatch.setattr(numpy, "__version__", "2.5.0")
        _backend.triton_interpreter_error.cache_clear()
        assert _backend.triton_interpreter_error() is None
    finally:
        _backend.triton_interpreter_error.cache_clear()


def test_stand_in_runs_for_a_forced_backend_without_a_kernel(monkeypatch):
    """An op with no kernel of the forced backend (or one that cannot take the inputs) runs its aten
    reference only where the reference is registered as a stand-in; fastsd.info's reasons say which."""
    ref, cpp = (lambda *a: "ref"), (lambda *a: "cpp")
    monkeypatch.setitem(_backend._REGISTRY, "stands_in", {"torch": _backend.Impl(ref, stand_in=True),
                                                          "cpp": _backend.Impl(cpp, lambda x: ["too big"] * (x.numel() > 2))})
    monkeypatch.setitem(_backend._REGISTRY, "no_stand_in", {"torch": _backend.Impl(ref), "cpp": _backend.Impl(cpp)})
    _backend.clear_caches()
    x = torch.zeros(2)
    with _backend.use_backend("cuda"):
        assert _backend.select("stands_in", x) is ref
        with pytest.raises(_backend.BackendUnavailableError, match="has no cuda implementation"):
            _backend.select("no_stand_in", x)
    with _backend.use_backend("cpp"):
        assert _backend.select("no_stand_in", x)() == "cpp"
        assert _backend.select("stands_in", x)() == "cpp"
        assert _backend.select("stands_in", torch.zeros(3)) is ref
    assert "runs the aten reference" in _backend.reasons("stands_in", "cuda", x)[0]
    assert _backend.reasons("stands_in", "cpp", torch.zeros(3)) == ["too big (forced, it runs the aten reference, fastsd.reference)"]
    assert "aten" not in _backend.reasons("no_stand_in", "cuda", x)[0]
    with pytest.raises(ValueError, match="stand in"):
        _backend.register("stands_in", "cpp", stand_in=True)


def test_pairing_ops_list_no_kernels_they_lack():
    """The pairing ops have no C++ or CUDA kernel: fastsd.info must not list one (they used to be
    registered under those names), and a forced cpp still runs them."""
    for op in ("intra_class_pairs", "patch_swap_mask", "scale_grad"):
        assert set(_backend._REGISTRY[op]) <= {"torch", "triton", "cpp"} and "cuda" not in _backend._REGISTRY[op], op
    assert "cpp" not in _backend._REGISTRY["intra_class_pairs"]
    labels = torch.tensor([0, 1, 0, 1])
    with _backend.use_backend("cpp"):
        out, partner, mask = fastsd.intra_class_patch_swap(torch.randn(4, 3, 8, 8), labels,
                                                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels[partner], labels)


def test_mask_kernel_limits_are_reasons_not_a_silent_fallback():
    from fastsd.kernels import pairing as kernels

    partner = torch.arange(4)
    fine = torch.rand(4, kernels.MAX_CELLS + 2)
    fn = fastsd.pairing._mask_triton_reasons
    assert "cells" in fn(partner, fine, cells=kernels.MAX_CELLS + 1)[0]
    assert fn(partner, fine, cells=kernels.MAX_CELLS) == []
    assert "noise is torch.float16" in fn(partner, fine.half(), cells=4)[0]


def test_auto_takes_the_cuda_mix_and_patch_swap_kernels_first(monkeypatch):
    """The mix op and patch swap's forward: the CUDA C++ kernel before Triton's where both can run
    (measured on an H100, fastsd._backend.CUDA_FIRST); every other op keeps PREFERENCE (Triton first
    on CUDA)."""
    for op in ("mix", "mix_", "patch_swap"):
        assert _backend.preference(op) == ("cuda", "triton", "cpp", "torch")
    for op in ("patch_swap_backward", "mix_backward", "kd_loss", "pair_kd_loss", "patch_swap_mask"):
        assert _backend.preference(op) == _backend.PREFERENCE
    monkeypatch.setattr(_backend, "_cached_device_reasons", lambda *a: [])  # every backend runs CUDA tensors
    _backend._auto_candidates.cache_clear()
    try:
        cuda = (torch.device("cuda", 0),)
        assert _backend._auto_candidates("mix", cuda, False)[:2] == ("cuda", "triton")
        assert _backend._auto_candidates("mix_", cuda, False)[:2] == ("cuda", "triton")
        assert _backend._auto_candidates("patch_swap", cuda, False)[:2] == ("cuda", "triton")
        assert _backend._auto_candidates("patch_swap_backward", cuda, False)[:2] == ("triton", "cuda")
    finally:
        _backend._auto_candidates.cache_clear()
        _backend._SELECTED.clear()  # (clear_caches() would clear the lambda above)


def test_a_choice_that_depends_on_nothing_but_the_devices_is_kept_and_checked(monkeypatch):
    """select() keeps the choice of a backend that wins whatever the tensors (its devices' reasons
    pass, it has no op-specific reasons), per op, forced backend, interpreter switch and devices; a
    swapped Impl, a forced backend, an environment variable or other devices are seen at once, and a
    choice that depended on the tensors' own properties is made again every call."""
    first, second, ref = (lambda *a: "first"), (lambda *a: "second"), (lambda *a: "ref")
    only_floats = lambda x: [] if x.is_floating_point() else ["floating point only"]  # noqa: E731
    monkeypatch.setitem(_backend._REGISTRY, "kept", {"cpp": _backend.Impl(first), "torch": _backend.Impl(ref)})
    monkeypatch.setitem(_backend._REGISTRY, "by_dtype",
                        {"cpp": _backend.Impl(first, only_floats), "torch": _backend.Impl(ref)})
    _backend.clear_caches()
    x, i = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    key = ("kept", None, _backend.triton_interpreting(), (x.device,))
    if _ext.load_error() is not None:
        pytest.skip("fastsd._C is not available: auto takes the torch backend")
    assert _backend.select("kept", x) is first and key in _backend._SELECTED
    assert _backend.select("kept", x) is first
    monkeypatch.setitem(_backend._REGISTRY["kept"], "cpp", _backend.Impl(second))  # swapped in place
    assert _backend.select("kept", x) is second
    with _backend.use_backend("torch"):
        assert _backend.select("kept", x) is ref
    monkeypatch.setenv("FASTSD_BACKEND", "torch")
    assert _backend.select("kept", x) is ref
    monkeypatch.delenv("FASTSD_BACKEND")
    assert _backend.select("kept", x) is second
    with pytest.raises(fastsd.BackendUnavailableError):  # other devices, another key
        with _backend.use_backend("cpp"):
            _backend.select("kept", x.to("meta"))
    # the first candidate's reasons look at the tensor: never kept
    assert _backend.select("by_dtype", x) is first and _backend.select("by_dtype", i) is ref
    assert _backend.select("by_dtype", x) is first
    assert not any(k[0] == "by_dtype" for k in _backend._SELECTED)
    _backend.register("kept_too", "torch")(ref)  # any registration forgets every kept choice
    try:
        assert not _backend._SELECTED
    finally:
        del _backend._REGISTRY["kept_too"]
        _backend.clear_caches()


def test_devices_of_mixed_inputs_in_order():
    meta = torch.zeros(1, device="meta")
    assert _backend._devices((X, 3, P)) == (X.device,)
    assert _backend._devices((X, meta, P, meta)) == (X.device, meta.device)
    assert _backend._devices((1, None)) == ()
