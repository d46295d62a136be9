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
step t bakes in step t's constants.

All tensors are flat views of storages with identical strides (the caller guarantees it): the
update is elementwise, so any dense layout (NCHW or channels_last) works. Offsets are int64.
"""
from __future__ import annotations

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
    # A missing bound is -inf / +inf. NaN stays NaN, as in torch.clamp.
    if HAS_CLAMP:
        x = tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
    return x


@triton.jit
def _load_xg(x_ptr, g_ptr, n, BLOCK: tl.constexpr, F64: tl.constexpr):
    # This program's block: int64 offsets, the tail mask, and x and g converted to the compute dtype.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    cdt = tl.float64 if F64 else tl.float32
    x = tl.load(x_ptr + offs, mask=valid, other=0).to(cdt)
    g = tl.load(g_ptr + offs, mask=valid, other=0).to(cdt)
    return offs, valid, x, g


@triton.jit
def _store_x(x_ptr, offs, valid, x, lo, hi, HAS_CLAMP: tl.constexpr):
    # Clamp the updated x and store it back in x's dtype.
    x = _clamp(x, lo, hi, HAS_CLAMP)
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=valid)


@triton.jit
def icp_sgd_update_kernel(
    x_ptr,  # input dtype, updated in place
    g_ptr,  # input dtype
    n,
    step_size,
    lo,
    hi,
    BLOCK: tl.constexpr,
    F64: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):
    offs, valid, x, g = _load_xg(x_ptr, g_ptr, n, BLOCK, F64)
    _store_x(x_ptr, offs, valid, x - step_size * g, lo, hi, HAS_CLAMP)


@triton.jit
def icp_adam_update_kernel(
    x_ptr,  # input dtype, updated in place
    g_ptr,  # input dtype
    m_ptr,  # state dtype (fp32, fp64 for fp64 x), updated in place
    v_ptr,
    m2_ptr,  # ademamix's slow EMA; ignored (may alias m) when ADEMAMIX is False
    n,
    scale,  # adam: step_size / (1 - b1^t); ademamix: step_size
    inv_bc1,  # 1 / (1 - b1^t), used by ademamix's numerator
    inv_sqrt_bc2,  # 1 / sqrt(1 - b2^t)
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    beta3,
    one_minus_beta3,
    alpha,
    eps,
    lo,
    hi,
    BLOCK: tl.constexpr,
    F64: tl.constexpr,
    ADEMAMIX: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):
    offs, valid, x, g = _load_xg(x_ptr, g_ptr, n, BLOCK, F64)
    m = tl.load(m_ptr + offs, mask=valid, other=0)
    v = tl.load(v_ptr + offs, mask=valid, other=0)

    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = _sqrt(v, F64) * inv_sqrt_bc2 + eps
    if ADEMAMIX:
        m2 = tl.load(m2_ptr + offs, mask=valid, other=0)
        m2 = beta3 * m2 + one_minus_beta3 * g
        tl.store(m2_ptr + offs, m2, mask=valid)
        numer = m * inv_bc1 + alpha * m2
    else:
        numer = m

    _store_x(x_ptr, offs, valid, x - scale * _div(numer, denom, F64), lo, hi, HAS_CLAMP)
    tl.store(m_ptr + offs, m, mask=valid)
    tl.store(v_ptr + offs, v, mask=valid)


# --- launch configuration ------------------------------------------------------------------------

NUM_WARPS = 4
# 8 elements a thread: two 16-byte loads of each fp32 stream.
GPU_BLOCK = 1024
# Under the interpreter, cost grows with the number of programs, not with the block size.
_INTERPRETER_MAX_BLOCK = 1 << 16

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _block(x: torch.Tensor) -> int:
    if x.device.type == "cpu":  # only reachable under TRITON_INTERPRET=1
        return max(GPU_BLOCK, min(triton.next_power_of_2(x.numel()), _INTERPRETER_MAX_BLOCK))
    return GPU_BLOCK


def icp_update_(x, g, m, v, m2, method, step, step_size, beta1, beta2, beta3, alpha, eps, clamp_lo, clamp_hi):
    """In-place update of x (and m, v, m2); same arguments and result as
    :func:`fastsd.reference.icp.icp_update_`. All tensors dense with x's strides (the caller
    checks); state of dtype ``compute_dtype(x.dtype)``."""
    n = x.numel()
    if n == 0:
        return
    block = _block(x)
    grid = (triton.cdiv(n, block),)
    f64 = compute_dtype(x.dtype) == torch.float64
    has_clamp = clamp_lo is not None or clamp_hi is not None
    lo = float(clamp_lo) if clamp_lo is not None else float("-inf")
    hi = float(clamp_hi) if clamp_hi is not None else float("inf")
    if method == "sgd":
        icp_sgd_update_kernel[grid](
            x, g, n, float(step_size), lo, hi,
            BLOCK=block, F64=f64, HAS_CLAMP=has_clamp, num_warps=NUM_WARPS,
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
        BLOCK=block, F64=f64, ADEMAMIX=ademamix, HAS_CLAMP=has_clamp, num_warps=NUM_WARPS,
    )


# --- ahead-of-time compilation specs (tests) -------------------------------------------------------


def _aligned(names, arg_names):
    # What the JIT specialises on for typical inputs: 16-byte aligned tensors and numel % 16 == 0
    # (e.g. B x 3 x 32 x 32), which is what lets the loads and stores be 128-bit wide.
    return {(arg_names.index(a),): [["tt.divisibility", 16]] for a in names}


def _aot_specs():
    specs = []
    for dtype, ty in _TL_DTYPES.items():
        sty = _TL_DTYPES[compute_dtype(dtype)]
        f64 = dtype == torch.float64
        for has_clamp in (False, True):
            clamp = "clamp" if has_clamp else "noclamp"
            specs.append({
                "name": f"icp_update_sgd_{ty}_{clamp}",
                "fn": icp_sgd_update_kernel,
                "signature": {
                    "x_ptr": f"*{ty}", "g_ptr": f"*{ty}", "n": "i32",
                    "step_size": "fp32", "lo": "fp32", "hi": "fp32",
                    "BLOCK": "constexpr", "F64": "constexpr", "HAS_CLAMP": "constexpr",
                },
                "constexprs": {"BLOCK": GPU_BLOCK, "F64": f64, "HAS_CLAMP": has_clamp},
                "attrs": _aligned(("x_ptr", "g_ptr", "n"), ["x_ptr", "g_ptr", "n"]),
                "options": {"num_warps": NUM_WARPS},
            })
            for ademamix in (False, True):
                signature = {"x_ptr": f"*{ty}", "g_ptr": f"*{ty}", "m_ptr": f"*{sty}", "v_ptr": f"*{sty}",
                             "m2_ptr": f"*{sty}", "n": "i32"}
                for name in ("scale", "inv_bc1", "inv_sqrt_bc2", "beta1", "one_minus_beta1", "beta2",
                             "one_minus_beta2", "beta3", "one_minus_beta3", "alpha", "eps", "lo", "hi"):
                    signature[name] = "fp32"
                signature.update({"BLOCK": "constexpr", "F64": "constexpr", "ADEMAMIX": "constexpr",
                                  "HAS_CLAMP": "constexpr"})
                specs.append({
                    "name": f"icp_update_{'ademamix' if ademamix else 'adam'}_{ty}_{clamp}",
                    "fn": icp_adam_update_kernel,
                    "signature": signature,
                    "constexprs": {"BLOCK": GPU_BLOCK, "F64": f64, "ADEMAMIX": ademamix,
                                   "HAS_CLAMP": has_clamp},
                    "attrs": _aligned(("x_ptr", "g_ptr", "m_ptr", "v_ptr", "m2_ptr", "n"), list(signature)),
                    "options": {"num_warps": NUM_WARPS},
                })
    return specs


# Every (dtype, method, clamp) variant the launcher uses on the GPU, for triton.compile without a GPU.
AOT_SPECS = _aot_specs()
