"""Reference ICP input update (SPEC section 5): one step of sgd / Adam / AdEMAMix on the input x.

With ``g`` the input gradient and t = ``step`` (1-based):

* ``sgd``:      ``u = g``
* ``adam``:     ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
  ``u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``
* ``ademamix``: as adam, plus the slow EMA ``m2 = b3 m2 + (1 - b3) g`` (no bias correction),
  ``u = (m / (1 - b1^t) + alpha m2) / (sqrt(v / (1 - b2^t)) + eps)``

then ``x = clamp(x - step_size * u, lo, hi)`` (no clamp when lo and hi are None).

Everything happens in place on x, m, v, m2. The state (m, v, m2) is float32 for 16- and 32-bit
inputs and float64 for float64 inputs; the arithmetic runs in the state's dtype and x is rounded to
its own dtype once per step.

The bias corrections depend only on the step number, a Python int: they are Python floats here, so
the update needs no device scalar and no host sync, and a CUDA graph that captures step t bakes in
step t's constants (they never change between replays because the number of steps is fixed).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

METHODS = ("sgd", "adam", "ademamix")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimiser state and of the update arithmetic for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_corrections(step: int, beta1: float, beta2: float):
    """``(1 / (1 - beta1^step), 1 / sqrt(1 - beta2^step))`` as Python floats."""
    return 1.0 / (1.0 - beta1 ** step), 1.0 / math.sqrt(1.0 - beta2 ** step)


def icp_update_(
    x: torch.Tensor,
    g: torch.Tensor,
    m: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    m2: Optional[torch.Tensor],
    method: str,
    step: int,
    step_size: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    clamp_lo: Optional[float],
    clamp_hi: Optional[float],
) -> None:
    """One in-place update of x (and of m, v, m2 for adam / ademamix); see the module docstring."""
    cdt = compute_dtype(x.dtype)
    g = g.to(cdt)
    if method == "sgd":
        scale, direction = step_size, g
    else:
        inv_bc1, inv_sqrt_bc2 = bias_corrections(step, beta1, beta2)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = v.sqrt().mul_(inv_sqrt_bc2).add_(eps)
        if method == "adam":
            scale, numer = step_size * inv_bc1, m
        else:
            m2.mul_(beta3).add_(g, alpha=1.0 - beta3)
            scale, numer = step_size, m.mul(inv_bc1).add_(m2, alpha=alpha)
        direction = numer.div(denom)
    if x.dtype == cdt:
        x.sub_(direction, alpha=scale)
        if clamp_lo is not None or clamp_hi is not None:
            x.clamp_(clamp_lo, clamp_hi)
    else:  # 16-bit x: update in fp32, round once
        x_new = x.to(cdt).sub_(direction, alpha=scale)
        if clamp_lo is not None or clamp_hi is not None:
            x_new.clamp_(clamp_lo, clamp_hi)
        x.copy_(x_new)
