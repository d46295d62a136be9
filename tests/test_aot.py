"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Each ``AOT_SPECS`` entry of each fastsd.kernels module (see tests/triton_tools.py) is compiled to
PTX and cubin for sm_90; for sm_80 one spec of each kernel for each set of element types and each
1-element-chunk path (triton_tools.per_dtype_specs; FASTSD_AOT_ARCHS=80:all,90:all for all of them). This catches what the interpreter lets through: type errors in lowering,
non-power-of-2 blocks, unsupported ops. All specs compile in one batch (two worker subprocesses,
TRITON_INTERPRET unset), on the first test that asks; the rest read the per-process cache.
"""
import pytest

import triton_tools

SPECS = triton_tools.all_aot_specs()
PAIRS = triton_tools.aot_pairs()


REPRESENTATIVE = [s["name"] for s in triton_tools.representative_specs()]


@pytest.fixture(scope="module")
def compiled(request):
    """The pairs of the selected test_aot_compiles tests (all of them unless ``-k`` picks some),
    compiled in one batch."""
    selected = [(item.callspec.params["name"], item.callspec.params["arch"]) for item in request.session.items
                if getattr(item, "originalname", None) == "test_aot_compiles"]
    return triton_tools.aot_compile_all(selected or PAIRS)


def test_every_kernel_module_has_specs():
    modules = {s["module"] for s in SPECS}
    missing = [m for m in triton_tools.kernel_modules() if m not in modules and not m.rsplit(".", 1)[1].startswith("_")]
    assert not missing, f"kernel modules without AOT_SPECS: {missing}"


@pytest.mark.parametrize("name, arch", PAIRS, ids=[f"{n}-sm_{a}" for n, a in PAIRS])
def test_aot_compiles(compiled, name, arch):
    result = compiled[(name, arch)]
    assert result.error is None, f"{name} does not compile for sm_{arch}: {result.error}"
    assert result.cubin, f"{name}: empty cubin for sm_{arch}"
    assert ".entry" in result.ptx and f".target sm_{arch}" in result.ptx, f"{name}: unexpected PTX for sm_{arch}"


@pytest.fixture(scope="module")
def representatives():
    return triton_tools.aot_compile_all([(n, 90) for n in REPRESENTATIVE])


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_compiles(representatives, name):
    """One spec per kernel, and the same with every integer argument equal to 1 (the JIT makes those
    constexprs). ``make test-triton-oldest`` runs these under TRITON_MIN_VERSION's Triton: the
    backend is offered with any Triton from that one on."""
    result = representatives[(name, 90)]
    assert result.error is None, f"{name} does not compile for sm_90: {result.error}"
    assert ".entry" in result.ptx
