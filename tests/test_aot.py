"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Each ``AOT_SPECS`` entry of each fastsd.kernels module (see tests/triton_tools.py) is compiled to
PTX and cubin for sm_90; for sm_80 the specs that between them show every element type and every
code-path constexpr of each kernel (triton_tools.code_path_specs; FASTSD_AOT_ARCHS=80:all,90:all for
all of them). This catches what the interpreter lets through: type errors in lowering,
non-power-of-2 blocks, unsupported ops. The specs of an arch compile in one batch (two worker
subprocesses, TRITON_INTERPRET unset), on the first test that asks; the rest read the per-process
cache.
"""
import re

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


def test_no_kernel_uses_atomics(compiled):
    """Every backward and every loss is a gather or a fixed-order sum (deterministic, bit for bit run
    to run on a GPU): no Triton kernel compiles an atomic. The interpreter cannot show it, since it
    runs the programs one after another."""
    read = [r for r in compiled.values() if r.error is None]
    assert read and all(r.ttir for r in read)
    used = sorted({r.name for r in read if re.search(r"\btt\.atomic_\w+", r.ttir)})
    assert not used, f"kernels with atomics: {used}"


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


def test_code_path_specs_cover_every_code_path():
    """What sm_80 and the oldest Triton compile shows, for each kernel, every element type of each
    pointer argument and every code-path constexpr value that any of its specs has."""
    def paths(specs):
        return {(s["fn"].fn.__name__, p) for s in specs for p in triton_tools._code_paths(s)}

    chosen = triton_tools.code_path_specs()
    assert paths(chosen) == paths(SPECS)
    assert len(chosen) < len(SPECS)
    # the cover sees what picks code: mix's uint8 data beside its uint8 box flags, the gradient
    assert ("mix_kernel", ("ptr", "x_ptr", "*u8")) in paths(chosen)
    assert any(p[0] == "COMPUTE_GRAD" and p[1] is True for _, p in paths(chosen))
