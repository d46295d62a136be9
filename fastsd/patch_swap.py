"""Patch swap (SPEC section 3): the public op, its torch.library registration and its backends.

Layers, top to bottom:

* :func:`patch_swap` - validates arguments (metadata only) and calls the registered op, or in an
  eager call its implementation and autograd directly (:mod:`fastsd._eager`);
* ``torch.ops.fastsd.patch_swap`` (returns ``(out, inverse_partner)``) /
  ``torch.ops.fastsd.patch_swap_backward`` (takes ``inverse_partner`` when the caller has it) -
  ``torch.library`` custom ops with fake kernels and autograd, so ``torch.compile(fullgraph=True)``
  sees them whole;
* one implementation per backend, chosen by :mod:`fastsd._backend`: the Triton kernels in
  ``fastsd.kernels.patch_swap``, the C++/CUDA kernels ``torch.ops.fastsd_C.patch_swap``, and the
  reference in :mod:`fastsd.reference.patch_swap`.

The backward pass is a gather (``grad_x[j] = g[j] * (1 - mask[j]) + g[q[j]] * mask[q[j]]``, q the
inverse permutation): no atomics, bitwise deterministic on every backend.

Launches on CUDA (issue 12, counted by tests/test_launches.py): the forward sorts partner once; the
sorted values prove it a permutation (checked on the host side of the launch, or inside the Triton
kernel where it asserts them on the device) and the sort's indices are the inverse permutation,
which the forward returns for the backward to reuse (no second sort). A partner from fastsd's own
pairing (:func:`fastsd.intra_class_patch_swap`) is an involution, its own inverse: neither sorted
nor checked.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import _backend, _eager, _ext
from . import _validate as V
from . import reference

PATCH_SWAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)
_PERMUTATION = "partner must be a permutation of range(B)"


def assert_permutation(fn: str, sorted_partner: torch.Tensor) -> torch.Tensor:
    """Assert on the device, without a host sync, that ``sorted_partner`` (partner sorted) is
    ``range(B)``, i.e. that partner is a permutation (an arange, a compare, a reduction and the
    assert), and return that ``arange(B)``. On CUDA a failure is an asynchronous device-side assert
    (like PyTorch's own index checks); on the CPU a ValueError at once."""
    idx = torch.arange(sorted_partner.numel(), device=sorted_partner.device, dtype=sorted_partner.dtype)
    V.device_check(fn, (sorted_partner == idx).all(), _PERMUTATION)
    return idx


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=V.memory_format(x))


# --- the registered ops ------------------------------------------------------------------------


@torch.library.custom_op("fastsd::patch_swap", mutates_args=())
def _patch_swap_op(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor,
                   partner_is_involution: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, inverse_partner): ``inverse_partner[partner[i]] == i``, the indices of the sort that
    checks partner, for the backward. ``partner_is_involution`` is the caller's promise that partner
    is an involution (fastsd's own pairing): its own inverse, neither sorted nor checked, and
    ``inverse_partner`` is then empty."""
    return _patch_swap_run(x, partner, mask, partner_is_involution, True)


def _patch_swap_run(x, partner, mask, partner_is_involution: bool, need_inverse: bool):
    """The op's body. ``need_inverse=False`` (the eager path, :mod:`fastsd._eager`): where the backend
    checks partner itself, the sort that would only give the inverse is skipped and
    ``inverse_partner`` is empty (the backward then inverts partner, as with an involution)."""
    if x.shape[0] == 0:
        return _empty_out(x), partner.new_empty(0)
    fn = _backend.select("patch_swap", x, partner, mask)
    x = x.contiguous(memory_format=V.memory_format(x))
    if partner_is_involution:
        return fn(x, partner, mask), partner.new_empty(0)
    checks_indices = getattr(fn, "checks_indices", False)
    if checks_indices and not need_inverse:
        return fn(x, partner, mask), partner.new_empty(0)
    sorted_partner, inverse_partner = torch.sort(partner)
    if checks_indices:  # the C++ CPU kernel checks as it inverts: a ValueError
        return fn(x, partner, mask), inverse_partner
    if _asserts_on_device(fn, x):  # the Triton kernel or the CUDA check kernel asserts sorted_partner == range(B)
        return fn(x, partner, mask, sorted_partner=sorted_partner), inverse_partner
    assert_permutation("fastsd.patch_swap", sorted_partner)
    return fn(x, partner, mask), inverse_partner


@_patch_swap_op.register_fake
def _(x, partner, mask, partner_is_involution=False):
    return _empty_out(x), partner.new_empty(0 if partner_is_involution else partner.shape[0])


@torch.library.custom_op("fastsd::patch_swap_backward", mutates_args=())
def _patch_swap_backward_op(grad: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor,
                            inverse_partner: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``inverse_partner``: q with ``q[partner[i]] == i`` where the caller has it; else the backend
    inverts partner."""
    return _patch_swap_backward_run(grad, partner, mask, inverse_partner)


def _patch_swap_backward_run(grad, partner, mask, inverse_partner):
    if grad.shape[0] == 0:
        return _empty_out(grad)
    fn = _backend.select("patch_swap_backward", grad, partner, mask)
    return fn(grad.contiguous(memory_format=V.memory_format(grad)), partner, mask, inverse_partner)


@_patch_swap_backward_op.register_fake
def _(grad, partner, mask, inverse_partner=None):
    return _empty_out(grad)


def _setup_context(ctx, inputs, output):
    x, partner, mask, involution = inputs
    inverse_partner = partner if involution else output[1]
    ctx.save_for_backward(partner, mask, inverse_partner)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.channels_last = V.memory_format(x) == torch.channels_last


def _backward(ctx, grad, _grad_inverse):
    if grad is None:  # only the (non-differentiable) inverse was used downstream
        return None, None, None, None
    partner, mask, inverse_partner = ctx.saved_tensors
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    if inverse_partner.shape[0] != partner.shape[0]:  # B = 0, or the eager path skipped the sort
        inverse_partner = None
    grad = grad.contiguous(memory_format=fmt)
    needs_grad = torch.is_grad_enabled() and grad.requires_grad  # create_graph: a double backward
    tensors = (grad, partner, mask) if inverse_partner is None else (grad, partner, mask, inverse_partner)
    return _BACKWARD(tensors, needs_grad, grad, partner, mask, inverse_partner), None, None, None


def _setup_context_backward(ctx, inputs, output):
    grad, partner, mask, _inverse_partner = inputs
    ctx.save_for_backward(partner, mask)
    ctx.channels_last = V.memory_format(grad) == torch.channels_last


def _backward_of_backward(ctx, grad):
    # patch_swap_backward is linear in grad; its adjoint is the forward op.
    partner, mask = ctx.saved_tensors
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    grad = grad.contiguous(memory_format=fmt)
    return _FORWARD((grad, partner, mask), torch.is_grad_enabled() and grad.requires_grad,
                    grad, partner, mask, False)[0], None, None, None


def _patch_swap_eager(x, partner, mask, partner_is_involution):
    return _patch_swap_run(x, partner, mask, partner_is_involution, False)


_FORWARD = _eager.Path(_patch_swap_op, _patch_swap_eager, _setup_context, _backward)
_BACKWARD = _eager.Path(_patch_swap_backward_op, _patch_swap_backward_run, _setup_context_backward,
                        _backward_of_backward)


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
            (nonzero means swap; a bool mask's bytes are 0 or 1, as PyTorch requires of every
            bool tensor: one made by viewing other bytes as bool is not a valid mask).

    Returns:
        A new tensor with x's dtype and device, channels_last when x is channels_last-contiguous,
        else contiguous. Differentiable in x: the backward pass is a gather (no atomics,
        bitwise deterministic).
    """
    return _patch_swap(x, partner, mask, partner_is_involution=False)


def swap_pairs(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`patch_swap` for a partner from fastsd's own pairing (:func:`fastsd.intra_class_pairs`),
    an involution by construction: it is its own inverse, so it is neither sorted nor checked (one
    kernel forward, one backward on the Triton path)."""
    return _patch_swap(x, partner, mask, partner_is_involution=True)


def _patch_swap(x, partner, mask, partner_is_involution: bool) -> torch.Tensor:
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
    partner, mask = partner.long(), mask.contiguous()
    return _FORWARD((x, partner, mask), torch.is_grad_enabled() and x.requires_grad,
                    x, partner, mask, partner_is_involution)[0]


# --- backends ----------------------------------------------------------------------------------
# Forward: fn(x, partner, mask) -> out (the Triton one also takes sorted_partner, below).
# Backward: fn(grad, partner, mask, inverse_partner) -> grad_x; inverse_partner may be None.

_backend.register("patch_swap", "torch")(reference.patch_swap)


@_backend.register("patch_swap_backward", "torch")
def _patch_swap_backward_torch(grad, partner, mask, inverse_partner):
    return reference.patch_swap_backward(grad, partner, mask)  # the oracle inverts partner itself


def _patch_swap_ext(x, partner, mask):
    return _ext.ops().patch_swap(x, partner, mask)


_INT32_MAX = 2 ** 31 - 1


def _cuda_reasons(*tensors, **kwargs):
    """Why the CUDA C++ kernels cannot run these inputs (auto then takes Triton's): a plane or a cell
    row past their int32 indexing (csrc/cuda/patch_swap_ops.cpp), or a fastsd._C built without an
    image for this GPU. (patch_swap's forward is in fastsd._backend.CUDA_FIRST.)"""
    x = tensors[0] if tensors else None
    mask = tensors[2] if len(tensors) > 2 else None
    if x is not None and x.dim() == 4:
        B, C, H, W = x.shape
        gh, gw = tuple(mask.shape[1:]) if mask is not None and mask.dim() == 3 else (1, 1)
        row = W * (C if V.memory_format(x) == torch.channels_last else 1)
        if max(H * row, W * gw, H * gh, B) > _INT32_MAX:
            return ["the CUDA C++ patch swap kernels take planes (H x W, x C in channels_last) of fewer than "
                    "2**31 elements"]
    return _image_reasons(x)


def _image_reasons(x) -> List[str]:
    """A reason where x is on a GPU that fastsd._C's CUDA kernels have no image for (both ops' kernels)."""
    if x is not None and x.is_cuda and not _kernel_image(x.device.index):
        return [f"fastsd._C has no CUDA kernel for this GPU (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(x.device)))}): built for other GPUs"]
    return []


@_backend.cached
def _kernel_image(index: int) -> bool:
    """Whether fastsd._C's CUDA kernels run on GPU ``index``: a build for other GPUs has no image for
    it (the launch fails with "no kernel image"), which auto must pass over where it takes these
    kernels first (fastsd._backend.CUDA_FIRST; every kernel of the build has the same images). One
    launch of patch swap's kernel on a one-element image, once per device and process; no host sync."""
    dev = torch.device("cuda", index)
    try:
        _ext.ops().patch_swap(torch.zeros(1, 1, 1, 1, device=dev), torch.zeros(1, dtype=torch.int64, device=dev),
                              torch.zeros(1, 1, 1, dtype=torch.bool, device=dev))
    except RuntimeError:
        return False
    return True


@_backend.register("patch_swap", "cuda", reasons=_cuda_reasons)
def _patch_swap_cuda(x, partner, mask, sorted_partner=None):
    if sorted_partner is not None:  # the permutation check: a device-side assert, one launch
        _ext.ops().patch_swap_check(sorted_partner)
    return _patch_swap_ext(x, partner, mask)


def _cuda_asserts(x: torch.Tensor) -> bool:
    """The CUDA C++ backend asserts ``sorted_partner == range(B)`` on the GPU by its check kernel
    (csrc/cuda/patch_swap_kernel.cuh, ``permutation_check_thread``) where fastsd._C has it; an
    older build leaves the check to the glue's ATen ops."""
    return V.kernel_asserts(x) and _has_cuda_kernel("patch_swap_check")


@_backend.cached  # a few microseconds a call otherwise, on every select() and checked call
def _has_cuda_kernel(name: str) -> bool:
    """Whether fastsd._C has this version's CUDA kernel of op ``name`` (False where it failed to load
    or was built without CUDA; an older build lacks the check kernels): also the mix op's test
    (fastsd.mix.op, fastsd.mix._rows)."""
    return _ext.has_cuda() and hasattr(_ext.ops(), name) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastsd_C::{name}", torch._C.DispatchKey.CUDA)


_patch_swap_cuda.asserts_on_device = _cuda_asserts


@_backend.register("patch_swap", "cpp")
def _patch_swap_cpp(x, partner, mask):
    return _patch_swap_ext(x, partner, mask)


# The CPU kernel checks that partner is a permutation as it inverts it (a ValueError with
# assert_permutation's message): no compare in Python on the CPU.
_patch_swap_cpp.checks_indices = True


@_backend.register("patch_swap_backward", "cpp")
@_backend.register("patch_swap_backward", "cuda", reasons=_cuda_reasons)
def _patch_swap_backward_ext(grad, partner, mask, inverse_partner):
    return _ext.ops().patch_swap_backward(grad, partner, mask)  # inverts partner in C++


def _asserts_on_device(fn, x: torch.Tensor) -> bool:
    asserts = getattr(fn, "asserts_on_device", None)
    return asserts is not None and asserts(x)


@_backend.register("patch_swap", "triton")
def _patch_swap_triton(x, partner, mask, sorted_partner=None):
    from .kernels import patch_swap as k

    if sorted_partner is None:
        return k.patch_swap(x, partner, mask)
    return k.patch_swap(x, partner, mask, sorted_partner=sorted_partner)


def _triton_asserts(x: torch.Tensor) -> bool:
    """The Triton forward asserts ``sorted_partner == range(B)`` itself on CUDA (``tl.device_assert``,
    compiled in there; the interpreter ignores it, so on CPU tensors the glue checks)."""
    from .kernels import patch_swap as k

    return V.kernel_asserts(x) and V.launcher_takes(k.patch_swap, "sorted_partner")


_patch_swap_triton.asserts_on_device = _triton_asserts


@_backend.register("patch_swap_backward", "triton")
def _patch_swap_backward_triton(grad, partner, mask, inverse_partner):
    from .kernels import patch_swap as k

    if inverse_partner is None or not V.launcher_takes(k.patch_swap_backward, "inverse_partner"):
        return k.patch_swap_backward(grad, partner, mask)
    return k.patch_swap_backward(grad, partner, mask, inverse_partner=inverse_partner)
