"""Patch swap (SPEC section 3): the public op, its torch.library registration and its backends.

Layers, top to bottom:

* :func:`patch_swap` - validates arguments (metadata only) and calls the registered op;
* ``torch.ops.fastsd.patch_swap`` / ``torch.ops.fastsd.patch_swap_backward`` - ``torch.library``
  custom ops with fake kernels and autograd, so ``torch.compile(fullgraph=True)`` sees them whole;
* one implementation per backend, chosen by :mod:`fastsd._backend`: the Triton kernels in
  ``fastsd.kernels.patch_swap``, the C++/CUDA kernels ``torch.ops.fastsd_C.patch_swap``, and the
  reference in :mod:`fastsd.reference.patch_swap`.

The backward pass is a gather (``grad_x[j] = g[j] * (1 - mask[j]) + g[q[j]] * mask[q[j]]``, q the
inverse permutation): no atomics, bitwise deterministic on every backend.
"""
from __future__ import annotations

import torch

from . import _backend, _ext
from . import _validate as V
from . import reference

PATCH_SWAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)


def check_permutation(fn: str, partner: torch.Tensor) -> None:
    """Assert on the device that partner is a permutation of range(B), without a host sync.

    On CUDA this is an asynchronous device-side assert (like PyTorch's own index checks); on the
    CPU it raises at once, as a ValueError.
    """
    n = partner.numel()
    sorted_partner = torch.sort(partner).values
    is_perm = (sorted_partner == torch.arange(n, device=partner.device, dtype=partner.dtype)).all()
    try:
        torch._assert_async(is_perm, f"{fn}: partner must be a permutation of range(B)")
    except RuntimeError as exc:
        raise ValueError(f"{fn}: partner must be a permutation of range(B) ({exc})") from None


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=V.memory_format(x))


# --- the registered ops ------------------------------------------------------------------------


@torch.library.custom_op("fastsd::patch_swap", mutates_args=())
def _patch_swap_op(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return _empty_out(x)
    fn = _backend.select("patch_swap", x, partner, mask)
    if not getattr(fn, "checks_indices", False):  # as pair_kd_loss's C++ backend
        check_permutation("fastsd.patch_swap", partner)
    return fn(x.contiguous(memory_format=V.memory_format(x)), partner, mask)


@_patch_swap_op.register_fake
def _(x, partner, mask):
    return _empty_out(x)


@torch.library.custom_op("fastsd::patch_swap_backward", mutates_args=())
def _patch_swap_backward_op(grad: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if grad.shape[0] == 0:
        return _empty_out(grad)
    fn = _backend.select("patch_swap_backward", grad, partner, mask)
    return fn(grad.contiguous(memory_format=V.memory_format(grad)), partner, mask)


@_patch_swap_backward_op.register_fake
def _(grad, partner, mask):
    return _empty_out(grad)


def _setup_context(ctx, inputs, output):
    x, partner, mask = inputs
    ctx.save_for_backward(partner, mask)
    ctx.channels_last = V.memory_format(x) == torch.channels_last


def _backward(ctx, grad):
    partner, mask = ctx.saved_tensors
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    return _patch_swap_backward_op(grad.contiguous(memory_format=fmt), partner, mask), None, None


def _backward_of_backward(ctx, grad):
    # patch_swap_backward is linear in grad; its adjoint is the forward op.
    partner, mask = ctx.saved_tensors
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    return _patch_swap_op(grad.contiguous(memory_format=fmt), partner, mask), None, None


_patch_swap_op.register_autograd(_backward, setup_context=_setup_context)
_patch_swap_backward_op.register_autograd(_backward_of_backward, setup_context=_setup_context)


# --- the public function -------------------------------------------------------------------------


def patch_swap(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Swap cells of each image with its partner's.

    ``out[i, c, h, w] = x[partner[i], c, h, w]`` where ``mask[i, cell(h, w)]``, else
    ``x[i, c, h, w]``, with ``cell(h, w) = (floor(h * gh / H), floor(w * gw / W))`` (grids that do
    not divide the image, and full-resolution masks gh = H, gw = W, included).

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16/float64 or uint8 (no gradient), NCHW or
            channels_last. Never modified.
        partner: integer ``[B]``, a permutation of ``range(B)`` (e.g. from
            :func:`intra_class_pairs`). Checked on the device without a host sync: on CPU a
            non-permutation raises ValueError at once; on CUDA it triggers an asynchronous
            device-side assert, like PyTorch's own index checks.
        mask: bool or uint8 ``[B, gh, gw]`` with ``1 <= gh <= H`` and ``1 <= gw <= W``
            (nonzero means swap).

    Returns:
        A new tensor with x's dtype and device, channels_last when x is channels_last-contiguous,
        else contiguous. Differentiable in x: the backward pass is a gather (no atomics,
        bitwise deterministic).
    """
    fn = "fastsd.patch_swap"
    V.tensor(fn, "x", x, ndim=4, dtypes=PATCH_SWAP_DTYPES, what="[B, C, H, W]")
    V.tensor(fn, "partner", partner, ndim=1, dtypes=V.INT_DTYPES, what="[B]")
    V.tensor(fn, "mask", mask, ndim=3, dtypes=(torch.bool, torch.uint8), what="[B, gh, gw]")
    V.same_device(fn, "x", x, partner=partner, mask=mask)
    B, _, H, W = x.shape
    if partner.shape[0] != B:
        raise ValueError(f"{fn}: partner must have length B={B} (x.shape[0]), got {partner.shape[0]}")
    if mask.shape[0] != B:
        raise ValueError(f"{fn}: mask must have shape [B={B}, gh, gw], got {tuple(mask.shape)}")
    gh, gw = mask.shape[1:]
    if not (1 <= gh <= H and 1 <= gw <= W):
        raise ValueError(
            f"{fn}: mask grid (gh, gw)=({gh}, {gw}) must satisfy 1 <= gh <= H={H} and 1 <= gw <= W={W}"
        )
    if x.requires_grad and not x.is_floating_point():
        raise TypeError(f"{fn}: x of dtype {x.dtype} cannot require grad")
    return _patch_swap_op(x, partner.long(), mask.contiguous())


# --- backends ----------------------------------------------------------------------------------

_backend.register("patch_swap", "torch")(reference.patch_swap)
_backend.register("patch_swap_backward", "torch")(reference.patch_swap_backward)


@_backend.register("patch_swap", "cuda")
def _patch_swap_ext(x, partner, mask):
    return _ext.ops().patch_swap(x, partner, mask)


@_backend.register("patch_swap", "cpp")
def _patch_swap_cpp(x, partner, mask):
    return _patch_swap_ext(x, partner, mask)


# The CPU kernel checks that partner is a permutation as it inverts it (a ValueError with
# check_permutation's message): no sort and compare in Python on the CPU.
_patch_swap_cpp.checks_indices = True


@_backend.register("patch_swap_backward", "cpp")
@_backend.register("patch_swap_backward", "cuda")
def _patch_swap_backward_ext(grad, partner, mask):
    return _ext.ops().patch_swap_backward(grad, partner, mask)


@_backend.register("patch_swap", "triton")
def _patch_swap_triton(x, partner, mask):
    from .kernels import patch_swap as k

    return k.patch_swap(x, partner, mask)


@_backend.register("patch_swap_backward", "triton")
def _patch_swap_backward_triton(grad, partner, mask):
    from .kernels import patch_swap as k

    return k.patch_swap_backward(grad, partner, mask)
