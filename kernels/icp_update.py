"""Triton kernels of the ICP input update (SPEC section 5), in place, one pass over memory.

With g the input gradient and t the 1-based step (formulas as in fastsd/reference/icp.py)::

    sgd:       x = clamp(x - step_size * g)
    adam:      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
               x = clamp(x - (step_size / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps))
    ademamix:  as adam, with m2 = b3 m2 + (1 - b3) g and the numerator m / (1 - b1^t) + alpha m2,
               scaled by step_size

Each element of x, g, m, v (and m2) is loaded once and x, m, v (m2) are stored once. The state is
float32 (float64 for float64 x) and the arithmetic runs in it; x and g may be 16-bit and are
converted right after the load (the interpreter's bf16 arithmetic is wrong, and the GPU wants fp32
anyway). Square root and division are the correctly rounded ones (sqrt.rn / div.rn), like torch's,
so the kernel and the reference agree to an ulp. The bias corrections are computed on the host
from the step number (a Python int): no device scalar, no host sync, and a CUDA graph capturing
step t bakes in step t's constants. Every scalar is a float64 kernel parameter (annotated: the JIT
would pass a Python float as float32), used as it is by the float64 update and rounded once to
float32 by the others.

Every program but those of the last partial block runs a full block unmasked (128-bit accesses,
whatever n is); the rest is split over programs of TAIL elements, one a thread. n is int64 and
never specialised, so one compiled variant serves every size (AOT_SPECS lists them all).

All tensors are flat views of storages with identical strides (the caller guarantees it): the
update is elementwise, so any dense layout (NCHW or channels_last) works. Offsets are int64.
"""
from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from fastsd.reference.icp import bias_corrections, compute_dtype


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    if F64:
        return tl.sqrt(x)  # sqrt.rn.f64
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(a, b, F64: tl.constexpr):
    if F64:
        return a / b  # div.rn.f64
    else:
        return tl.div_rn(a, b)


@triton.jit
def _clamp(x, lo, hi, HAS_CLAMP: tl.constexpr):
    # torch.clamp's semantics: a missing bound is -inf / +inf; a NaN x stays NaN (both compares are
    # false for it); a NaN bound, which makes every x NaN, is the launcher's (a NaN step). A compare
    # and a select per bound: NaN-propagating min/max take ~20 instructions an element in float64.
    if HAS_CLAMP:
        x = tl.where(x < lo, lo, x)
        x = tl.where(x > hi, hi, x)
    return x


@triton.jit
def _scalar(s, F64: tl.constexpr):
    # Scalars arrive as float64 (the parameters are annotated): exact for the float64 update,
    # rounded to nearest once per thread for the float32 one, as the JIT would round a Python float.
    if F64:
        return s
    else:
        return tl.cast(s, tl.float32)


@triton.jit
def _load(ptr, offs, n, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=offs < n, other=0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, n, value, MASKED: tl.constexpr):
    value = value.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, value, mask=offs < n)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _sgd_step(x_ptr, g_ptr, offs, n, step_size, lo, hi, MASKED: tl.constexpr, F64: tl.constexpr,
              HAS_CLAMP: tl.constexpr):
    cdt = tl.float64 if F64 else tl.float32
    x = _load(x_ptr, offs, n, MASKED).to(cdt)
    g = _load(g_ptr, offs, n, MASKED).to(cdt)
    _store(x_ptr, offs, n, _clamp(x - step_size * g, lo, hi, HAS_CLAMP), MASKED)


@triton.jit
def _adam_step(x_ptr, g_ptr, m_ptr, v_ptr, m2_ptr, offs, n, c, MASKED: tl.constexpr, F64: tl.constexpr,
               ADEMAMIX: tl.constexpr, HAS_CLAMP: tl.constexpr):
    # c: the scalars, in the kernel's parameter order from scale to hi, in the compute dtype.
    scale, inv_bc1, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2 = c[:7]
    beta3, one_minus_beta3, alpha, eps, lo, hi = c[7:]
    cdt = tl.float64 if F64 else tl.float32
    x = _load(x_ptr, offs, n, MASKED).to(cdt)
    g = _load(g_ptr, offs, n, MASKED).to(cdt)
    m = _load(m_ptr, offs, n, MASKED)
    v = _load(v_ptr, offs, n, MASKED)

    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = _sqrt(v, F64) * inv_sqrt_bc2 + eps
    if ADEMAMIX:
        m2 = _load(m2_ptr, offs, n, MASKED)
        m2 = beta3 * m2 + one_minus_beta3 * g
        _store(m2_ptr, offs, n, m2, MASKED)
        numer = m * inv_bc1 + alpha * m2
    else:
        numer = m

    _store(x_ptr, offs, n, _clamp(x - scale * _div(numer, denom, F64), lo, hi, HAS_CLAMP), MASKED)
    _store(m_ptr, offs, n, m, MASKED)
    _store(v_ptr, offs, n, v, MASKED)


@triton.jit
def _tail_offsets(pid, n, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    # Programs past the last full block take TAIL elements each (one a thread) of the rest.
    full = n // BLOCK  # a shift
    return full * BLOCK + (pid - full) * TAIL + tl.arange(0, TAIL)


@triton.jit(do_not_specialize=["n"])
def icp_sgd_update_kernel(
    x_ptr,  # input dtype, updated in place
    g_ptr,  # input dtype
    n: tl.int64,
    step_size: tl.float64,
    lo: tl.float64,
    hi: tl.float64,
    BLOCK: tl.constexpr,
    F64: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    TAIL: tl.constexpr,
):
    # Full blocks run unmasked, so their accesses are 128-bit whatever n is. The rest goes to
    # programs of TAIL elements, one a thread: masked accesses are scalar, and at a whole block of
    # them a thread the 16-bit adam kernels would take up to 152 registers. No loop either way.
    pid = tl.program_id(0).to(tl.int64)
    step_size, lo, hi = _scalar(step_size, F64), _scalar(lo, F64), _scalar(hi, F64)
    if pid * BLOCK + BLOCK <= n:
        _sgd_step(x_ptr, g_ptr, pid * BLOCK + tl.arange(0, BLOCK), n, step_size, lo, hi, False, F64, HAS_CLAMP)
    else:
        _sgd_step(x_ptr, g_ptr, _tail_offsets(pid, n, BLOCK, TAIL), n, step_size, lo, hi, True, F64, HAS_CLAMP)


@triton.jit(do_not_specialize=["n"])
def icp_adam_update_kernel(
    x_ptr,  # input dtype, updated in place
    g_ptr,  # input dtype
    m_ptr,  # state dtype (fp32, fp64 for fp64 x), updated in place
    v_ptr,
    m2_ptr,  # ademamix's slow EMA; ignored (may alias m) when ADEMAMIX is False
    n: tl.int64,
    scale: tl.float64,  # adam: step_size / (1 - b1^t); ademamix: step_size
    inv_bc1: tl.float64,  # 1 / (1 - b1^t), used by ademamix's numerator
    inv_sqrt_bc2: tl.float64,  # 1 / sqrt(1 - b2^t)
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    beta3: tl.float64,
    one_minus_beta3: tl.float64,
    alpha: tl.float64,
    eps: tl.float64,
    lo: tl.float64,
    hi: tl.float64,
    BLOCK: tl.constexpr,
    F64: tl.constexpr,
    ADEMAMIX: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    TAIL: tl.constexpr,
):
    # Blocks as in icp_sgd_update_kernel.
    pid = tl.program_id(0).to(tl.int64)
    c = (_scalar(scale, F64), _scalar(inv_bc1, F64), _scalar(inv_sqrt_bc2, F64), _scalar(beta1, F64),
         _scalar(one_minus_beta1, F64), _scalar(beta2, F64), _scalar(one_minus_beta2, F64), _scalar(beta3, F64),
         _scalar(one_minus_beta3, F64), _scalar(alpha, F64), _scalar(eps, F64), _scalar(lo, F64), _scalar(hi, F64))
    if pid * BLOCK + BLOCK <= n:
        _adam_step(x_ptr, g_ptr, m_ptr, v_ptr, m2_ptr, pid * BLOCK + tl.arange(0, BLOCK), n, c, False, F64,
                   ADEMAMIX, HAS_CLAMP)
    else:
        _adam_step(x_ptr, g_ptr, m_ptr, v_ptr, m2_ptr, _tail_offsets(pid, n, BLOCK, TAIL), n, c, True, F64,
                   ADEMAMIX, HAS_CLAMP)


# --- launch configuration ------------------------------------------------------------------------

NUM_WARPS = 4
# Per compute dtype: 8 fp32 or 4 fp64 elements a thread, two 16-byte loads of each state stream.
# (At 8 fp64 elements a thread ademamix took 130 registers: 19 % occupancy.)
GPU_BLOCK = {torch.float32: 1024, torch.float64: 512}
# Under the interpreter, cost grows with the number of programs and loop iterations, not with the
# block size.
_INTERPRETER_MAX_BLOCK = 1 << 16

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def gpu_config(dtype: torch.dtype) -> dict:
    """The launch constexprs on a GPU for inputs of ``dtype``."""
    return {"BLOCK": GPU_BLOCK[compute_dtype(dtype)], "TAIL": 32 * NUM_WARPS}


def _config(x: torch.Tensor) -> dict:
    config = gpu_config(x.dtype)
    if x.device.type == "cpu":  # only reachable under TRITON_INTERPRET=1: one program
        block = max(config["BLOCK"], min(triton.next_power_of_2(x.numel()), _INTERPRETER_MAX_BLOCK))
        config = {"BLOCK": block, "TAIL": block}
    return config


def icp_update_(x, g, m, v, m2, method, step, step_size, beta1, beta2, beta3, alpha, eps, clamp_lo, clamp_hi):
    """In-place update of x (and m, v, m2); same arguments and result as
    :func:`fastsd.reference.icp.icp_update_`. All tensors dense with x's strides (the caller
    checks); state of dtype ``compute_dtype(x.dtype)``.

    Every scalar reaches the kernel as a float64 parameter (the kernels annotate them): a Python
    float would be passed as float32 on a GPU (the interpreter keeps it exact), and a float64
    update with float32 constants is wrong (a bound of 0.7 becomes 0.69999999).
    """
    n = x.numel()
    if n == 0:
        return
    config = _config(x)
    block, tail = config["BLOCK"], config["TAIL"]
    grid = (n // block + triton.cdiv(n % block, tail),)
    f64 = compute_dtype(x.dtype) == torch.float64
    has_clamp = clamp_lo is not None or clamp_hi is not None
    lo = float(clamp_lo) if clamp_lo is not None else float("-inf")
    hi = float(clamp_hi) if clamp_hi is not None else float("inf")
    if math.isnan(lo) or math.isnan(hi):  # torch.clamp then gives NaN everywhere: so does a NaN step
        step_size = float("nan")
    if method == "sgd":
        icp_sgd_update_kernel[grid](
            x, g, n, float(step_size), lo, hi,
            F64=f64, HAS_CLAMP=has_clamp, num_warps=NUM_WARPS, **config,
        )
        return
    inv_bc1, inv_sqrt_bc2 = bias_corrections(step, beta1, beta2)
    ademamix = method == "ademamix"
    scale = step_size if ademamix else step_size * inv_bc1
    icp_adam_update_kernel[grid](
        x, g, m, v, m2 if ademamix else m, n,
        float(scale), float(inv_bc1), float(inv_sqrt_bc2),
        float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, float(beta3), 1.0 - beta3,
        float(alpha), float(eps), lo, hi,
        F64=f64, ADEMAMIX=ademamix, HAS_CLAMP=has_clamp, num_warps=NUM_WARPS, **config,
    )


# --- ahead-of-time compilation specs (tests) -------------------------------------------------------


_PARAM_TYPES = {"tl.int64": "i64", "tl.float64": "fp64", "tl.constexpr": "constexpr"}


def _aot_spec(name, kernel, pointers, constexprs):
    # Each parameter typed as a GPU launch types it: pointers from the tensors' dtypes, 16-byte
    # aligned (what the JIT specialises on for allocations, and what makes the accesses 128-bit);
    # n and the scalars as annotated, never specialised.
    params = inspect.signature(kernel.fn).parameters
    signature = {p: pointers.get(p) or _PARAM_TYPES[str(params[p].annotation)] for p in params}
    attrs = {(list(params).index(p),): [["tt.divisibility", 16]] for p in pointers}
    return {"name": name, "fn": kernel, "signature": signature, "constexprs": constexprs, "attrs": attrs,
            "options": {"num_warps": NUM_WARPS}}


def _aot_specs():
    specs = []
    for dtype, ty in _TL_DTYPES.items():
        cdt = compute_dtype(dtype)
        sty = _TL_DTYPES[cdt]
        base = {**gpu_config(dtype), "F64": cdt == torch.float64}
        for has_clamp in (False, True):
            clamp = "clamp" if has_clamp else "noclamp"
            specs.append(_aot_spec(f"icp_update_sgd_{ty}_{clamp}", icp_sgd_update_kernel,
                                   {"x_ptr": f"*{ty}", "g_ptr": f"*{ty}"}, {**base, "HAS_CLAMP": has_clamp}))
            for method in ("adam", "ademamix"):
                pointers = {"x_ptr": f"*{ty}", "g_ptr": f"*{ty}", "m_ptr": f"*{sty}", "v_ptr": f"*{sty}",
                            "m2_ptr": f"*{sty}"}
                specs.append(_aot_spec(f"icp_update_{method}_{ty}_{clamp}", icp_adam_update_kernel, pointers,
                                       {**base, "ADEMAMIX": method == "ademamix", "HAS_CLAMP": has_clamp}))
    return specs


# Every (dtype, method, clamp) variant the launcher uses on the GPU, for triton.compile without a GPU.
AOT_SPECS = _aot_specs()
