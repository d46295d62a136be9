"""The fused mix op (SPEC section 6): its public function, torch.library registration and backends.

Layers, as for :mod:`fastsd.patch_swap`:

* :func:`mix` - validates arguments and calls the registered op;
* ``torch.ops.fastsd.mix`` - a ``torch.library`` custom op with a fake kernel and autograd;
* one implementation per backend, chosen by :mod:`fastsd._backend`: the C++ CPU kernel
  ``torch.ops.fastsd_C.mix`` (csrc/cpu/mix.cpp: a CutMix row is at most three runs per image row,
  copied with memcpy; a MixUp row one vectorised pass), the Triton kernel in ``fastsd.kernels.mix``
  (CUDA tensors: one launch, each element read from one source in a CutMix row; in place, only the
  mixed pixels move), the CUDA C++ kernels (csrc/cuda/mix.cu: the same op and its backward; 16-byte
  vectors, one launch, in place only the vectors that hold mixed pixels; auto picks them before
  Triton's for the forward where fastsd._C has them, fastsd._backend.CUDA_FIRST, and they are the GPU
  backend of torch 2.4-2.7, whose Triton is older than fastsd takes) and the reference in
  :mod:`fastsd.reference.mix`.

The backward pass (``torch.ops.fastsd.mix_backward``: the Triton or CUDA C++ kernel on CUDA tensors,
:func:`fastsd.reference.mix_backward` elsewhere) is a gather through the inverse permutation: no
atomics, bitwise deterministic; its own backward is the forward op (both are linear).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _eager, _ext
from .. import _validate as V
from .. import reference
from ..patch_swap import _INT32_MAX, PATCH_SWAP_DTYPES, _has_cuda_kernel, _image_reasons, assert_permutation

MIX_DTYPES = PATCH_SWAP_DTYPES
LAM_DTYPES = (torch.float32, torch.float64)


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=V.memory_format(x))


def _mix_impl(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
              use_box: torch.Tensor, check: bool = False) -> torch.Tensor:
    """``check``: the value checks of :func:`mix` (partner a permutation, boxes in range, lam in
    [0, 1]), made here where the backend is known: by the Triton or CUDA C++ check kernel on CUDA
    (device-side asserts: a sort and one launch rather than 23), else by :func:`_check_values`."""
    return _run("mix", x, partner, boxes, lam, use_box, check)


def _run(op, x, partner, boxes, lam, use_box, check=False):
    """The backend of ``op`` ("mix", or "mix_backward" with x the output gradient) on x in its layout."""
    if x.shape[0] == 0:
        return _empty_out(x)
    fn = _backend.select(op, x, partner, boxes, lam, use_box)
    x = x.contiguous(memory_format=V.memory_format(x))
    if check and _asserts_on_device(fn, x):
        return fn(x, partner, boxes, lam, use_box, check=True)
    if check:
        _check_values("fastsd.mix", x, partner, boxes, lam)
    return fn(x, partner, boxes, lam, use_box)


def _asserts_on_device(fn, x: torch.Tensor) -> bool:
    """Whether backend ``fn`` asserts the values itself (the Triton kernels on CUDA tensors, where
    their ``tl.device_assert`` is compiled in, and the CUDA C++ backend's check kernel; the
    interpreter ignores ``tl.device_assert``, so on CPU tensors the glue checks). fastsd.bench.launches
    counts the CUDA side (fastsd._validate.kernel_asserts)."""
    return getattr(fn, "asserts_on_device", False) and V.kernel_asserts(x)


def _mix_backward_impl(grad: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
                       use_box: torch.Tensor) -> torch.Tensor:
    return _run("mix_backward", grad, partner, boxes, lam, use_box)


_mix_op = torch.library.custom_op("fastsd::mix", mutates_args=())(_mix_impl)
_mix_backward_op = torch.library.custom_op("fastsd::mix_backward", mutates_args=())(_mix_backward_impl)


@_mix_op.register_fake
def _(x, partner, boxes, lam, use_box, check=False):
    return _empty_out(x)


@_mix_backward_op.register_fake
def _(x, partner, boxes, lam, use_box):
    return _empty_out(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:5])  # partner, boxes, lam, use_box


def _backward(ctx, grad):
    partner, boxes, lam, use_box = ctx.saved_tensors
    needs_grad = torch.is_grad_enabled() and grad.requires_grad  # create_graph: a double backward
    out = _MIX_BACKWARD((grad, partner, boxes, lam, use_box), needs_grad, grad, partner, boxes, lam, use_box)
    return out, None, None, None, None, None


def _backward_of_backward(ctx, grad):
    # mix_backward is linear in grad; its adjoint is the forward op.
    partner, boxes, lam, use_box = ctx.saved_tensors
    needs_grad = torch.is_grad_enabled() and grad.requires_grad
    return _MIX((grad, partner, boxes, lam, use_box), needs_grad, grad, partner, boxes, lam, use_box), None, None, None, None


# The registered ops for torch.compile/export/opcheck; eager calls run the same functions directly
# (fastsd._eager: the custom op's dispatch costs as much as the whole 32 px pass).
_MIX = _eager.Path(_mix_op, _mix_impl, _setup_context, _backward)
_MIX_BACKWARD = _eager.Path(_mix_backward_op, _mix_backward_impl, _setup_context, _backward_of_backward)


def mix(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
        use_box: torch.Tensor) -> torch.Tensor:
    """CutMix and MixUp rows of a batch in one pass.

    Per row i, with p = partner[i] and (y0, y1, x0, x1) = boxes[i] (half-open):

    * ``use_box[i]`` (CutMix): ``out[i, :, h, w] = x[p, :, h, w]`` where y0 <= h < y1 and
      x0 <= w < x1, else ``x[i, :, h, w]``; an empty box (y0 == y1 or x0 == x1) copies the row,
      which is how a row left unmixed (timm's lam == 1) is expressed;
    * else (MixUp): ``out[i] = x[i] * lam[i] + x[p] * (1 - lam[i])``, exactly timm's expression:
      ``1 - lam`` in lam's dtype, the weights in the compute type (float64 for float64 x, else
      float32), each product and the sum rounded as PyTorch's eager ops round them; uint8 x: the
      float32 value rounded half to even and cast back (timm's FastCollateMixup).

    Args:
        x: ``[B, C, H, W]`` float32/float16/bfloat16/float64 or uint8 (no gradient), NCHW or
            channels_last. Never modified.
        partner: integer ``[B]``, a permutation of ``range(B)`` (flip, roll, random, intra-class).
        boxes: integer ``[B, 4]`` (y0, y1, x0, x1) with 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W.
        lam: float32 or float64 ``[B]`` in [0, 1] (read by MixUp rows).
        use_box: bool ``[B]``.

    Values (partner a permutation, boxes in range, lam in [0, 1]) are checked on the device without
    a host sync: a ValueError at once on the CPU, an asynchronous device-side assert on CUDA (by the
    backend's check kernel, CUDA C++ or Triton: a sort of partner and one launch).

    Returns:
        A new tensor with x's dtype, device and layout. Differentiable in x (a gather backward).
    """
    _check("fastsd.mix", x, partner, boxes, lam, use_box)
    return _mix(x, partner.long(), boxes.long(), lam, use_box, True)


def _check(fn, x, partner, boxes, lam, use_box) -> None:
    """What the public functions check on the host: types, shapes, devices (no values, no launch)."""
    V.tensor(fn, "x", x, ndim=4, dtypes=MIX_DTYPES, what="[B, C, H, W]")
    V.tensor(fn, "partner", partner, ndim=1, dtypes=V.INT_DTYPES, what="[B]")
    V.tensor(fn, "boxes", boxes, ndim=2, dtypes=V.INT_DTYPES, what="[B, 4]")
    V.tensor(fn, "lam", lam, ndim=1, dtypes=LAM_DTYPES, what="[B]")
    V.tensor(fn, "use_box", use_box, ndim=1, dtypes=(torch.bool,), what="[B]")
    V.same_device(fn, "x", x, partner=partner, boxes=boxes, lam=lam, use_box=use_box)
    B = x.shape[0]
    if boxes.shape != (B, 4):
        raise ValueError(f"{fn}: boxes must have shape [B={B}, 4] (y0, y1, x0, x1), got {tuple(boxes.shape)}")
    for name, t in (("partner", partner), ("lam", lam), ("use_box", use_box)):
        if t.shape[0] != B:
            raise ValueError(f"{fn}: {name} must have length B={B} (x.shape[0]), got {t.shape[0]}")
    if x.requires_grad and not x.is_floating_point():
        raise TypeError(f"{fn}: x of dtype {x.dtype} cannot require grad")


def _check_values(fn, x, partner, boxes, lam, involution=False) -> None:
    """The value checks of the public functions in ATen ops, on the device without a host sync: a
    ValueError at once on the CPU (the backends' kernels on CUDA assert them themselves). ``partner``
    and ``boxes`` int64, B > 0. ``involution`` (mix_): partner[partner[i]] == i, which makes it a
    permutation; else partner sorted is range(B)."""
    _, _, H, W = x.shape
    y0, y1, x0, x1 = boxes.unbind(1)
    ok = ((y0 >= 0) & (y0 <= y1) & (y1 <= H) & (x0 >= 0) & (x0 <= x1) & (x1 <= W)).all()
    V.device_check(fn, ok, f"boxes must satisfy 0 <= y0 <= y1 <= H={H} and 0 <= x0 <= x1 <= W={W}")
    V.device_check(fn, ((lam >= 0) & (lam <= 1)).all(), "lam must be in [0, 1]")
    if involution:
        B = partner.shape[0]
        back = partner[partner.clamp(0, B - 1)]
        ok = ((partner >= 0) & (partner < B)).all() & (back == torch.arange(B, device=partner.device)).all()
        V.device_check(fn, ok, "partner must be an involution (partner[partner[i]] == i) to mix in place")
    else:
        assert_permutation(fn, torch.sort(partner)[0])


def mix_(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
         use_box: torch.Tensor) -> torch.Tensor:
    """:func:`mix` in place, as timm's ``Mixup`` mixes its batch: returns ``x``, mixed.

    ``partner`` must be an involution (``partner[partner[i]] == i``: timm's ``flip(0)``, fastsd's
    intra-class pairs), so that each pair is read before it is written; then only the mixed pixels
    move (a CutMix row's box, a MixUp row whole) where the out-of-place pass reads and writes every
    pixel. ``x`` must be contiguous (NCHW or channels_last) and must not require grad.
    """
    fn = "fastsd.mix_"
    _check(fn, x, partner, boxes, lam, use_box)
    if x.requires_grad:
        raise TypeError(f"{fn}: x requires grad; mix it out of place (fastsd.mix.mix)")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{fn}: x must be contiguous (NCHW or channels_last) to be mixed in place")
    return _mix_inplace(x, partner.long(), boxes.long(), lam, use_box, True)


def mix_unchecked_(x, partner, boxes, lam, use_box) -> torch.Tensor:
    """:func:`mix_` without the value checks (see :func:`mix_unchecked`); returns x."""
    return _mix_inplace(x, partner, boxes, lam, use_box, False)


def _mix_inplace(x, partner, boxes, lam, use_box, check: bool) -> torch.Tensor:
    boxes, lam, use_box = boxes.contiguous(), lam.contiguous(), use_box.contiguous()
    _MIX_INPLACE((x, partner, boxes, lam, use_box), False, x, partner, boxes, lam, use_box, check)
    return x


def _mix_inplace_impl(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor, lam: torch.Tensor,
                      use_box: torch.Tensor, check: bool = False) -> None:
    """``check``: :func:`mix_`'s value checks (partner an involution, boxes in range, lam in [0, 1]),
    by the Triton or CUDA C++ check kernel on CUDA (device-side asserts, one launch), else by
    :func:`_check_values`."""
    if not x.shape[0]:
        return
    fn = _backend.select("mix_", x, partner, boxes, lam, use_box)
    if check and _asserts_on_device(fn, x):
        fn(x, partner, boxes, lam, use_box, check=True)
        return
    if check:
        _check_values("fastsd.mix_", x, partner, boxes, lam, involution=True)
    fn(x, partner, boxes, lam, use_box)


# A registered op too, so that torch.compile sees one mutating op (functionalized) rather than
# tracing into a backend (on CUDA a raw Triton launch whose compile options it may not keep).
_mix_inplace_op = torch.library.custom_op("fastsd::mix_", mutates_args=("x",))(_mix_inplace_impl)


@_mix_inplace_op.register_fake
def _(x, partner, boxes, lam, use_box, check=False):
    return None


_MIX_INPLACE = _eager.Path(_mix_inplace_op, _mix_inplace_impl)


def mix_unchecked(x, partner, boxes, lam, use_box) -> torch.Tensor:
    """:func:`mix` for arguments that are right by construction (fastsd.mix's own samplers: boxes
    clipped to the image, lam in [0, 1], partner a flip or roll): no value checks. int64 partner
    and boxes."""
    return _mix(x, partner, boxes, lam, use_box, False)


def _mix(x, partner, boxes, lam, use_box, check: bool) -> torch.Tensor:
    boxes, lam, use_box = boxes.contiguous(), lam.contiguous(), use_box.contiguous()
    # as the registered op: recorded by autograd where x or lam requires grad (lam gets none)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or lam.requires_grad)
    return _MIX((x, partner, boxes, lam, use_box), needs_grad, x, partner, boxes, lam, use_box, check)


# --- backends: fn(x, partner, boxes, lam, use_box) -> out ------------------------------------------

_backend.register("mix", "torch")(reference.mix)


@_backend.cached
def _cpp_has_mix() -> bool:
    return hasattr(_ext.ops(), "mix")  # False: a fastsd._C built before the mix kernel


def _cpp_reasons(*tensors, **kwargs):
    if not _cpp_has_mix():
        return ["fastsd._C has no mix kernel (built from older sources: rebuild it)"]
    return []


_cpp_reasons.process_only = True  # the extension's kernels (cached), never the arguments (_backend.Impl)



def _cuda_reasons(*tensors, **kwargs):
    if not _has_cuda_kernel("mix_check"):  # a fastsd._C whose CUDA build predates this version's mix kernels
        return ["fastsd._C lacks this version's CUDA mix kernels (built from older sources: rebuild it)"]
    x = tensors[0] if tensors else None
    if x is not None and x.dim() == 4 and (x.shape[0] > _INT32_MAX or math.prod(x.shape[1:]) > _INT32_MAX):
        # csrc/cuda/mix_ops.cpp indexes a sample in int32 (Triton's kernel has a 64-bit variant)
        return ["the CUDA C++ mix kernels take samples of fewer than 2**31 elements and batches of fewer than "
                "2**31 samples"]
    return _image_reasons(x)


@_backend.register("mix", "cpp", reasons=_cpp_reasons)
def _mix_cpp(x, partner, boxes, lam, use_box):
    return _ext.ops().mix(x, partner, boxes, lam, use_box)


@_backend.register("mix", "cuda", reasons=_cuda_reasons)
def _mix_cuda(x, partner, boxes, lam, use_box, check=False):
    if check:
        _check_on_device(x, partner, boxes, lam, involution=False)
    return _ext.ops().mix(x, partner, boxes, lam, use_box)


def _check_on_device(x, partner, boxes, lam, involution: bool) -> None:
    """The public functions' value checks by the CUDA check kernel (device-side asserts, as the
    Triton path's): a sort of partner (none for an involution) and one launch, where the ATen checks
    take about twenty."""
    _, _, H, W = x.shape
    partner, boxes, lam = partner.contiguous(), boxes.contiguous(), lam.contiguous()
    ordered = partner if involution else torch.sort(partner).values
    _ext.ops().mix_check(partner, ordered, boxes, lam, H, W, involution)


# The Triton kernel (kernels/mix.py) takes every dtype, layout and lam dtype of fastsd.mix; it reads
# partner, boxes, lam and use_box as flat arrays (contiguous: no-ops for what mix_unchecked passes).
@_backend.register("mix", "triton")
def _mix_triton(x, partner, boxes, lam, use_box, check=False):
    from ..kernels import mix as k

    return k.mix(x, partner.contiguous(), boxes.contiguous(), lam.contiguous(), use_box.contiguous(), check=check)


@_backend.register("mix_", "triton")
def _mix_inplace_triton(x, partner, boxes, lam, use_box, check=False):
    from ..kernels import mix as k

    k.mix_(x, partner.contiguous(), boxes.contiguous(), lam.contiguous(), use_box.contiguous(), check=check)


_mix_triton.asserts_on_device = _mix_inplace_triton.asserts_on_device = True


# fastsd._C has no CPU mix backward: the reference's gather (ATen's kernels) stands in where the cpp
# backend is forced.
_backend.register("mix_backward", "torch", stand_in=True)(reference.mix_backward)


@_backend.register("mix_backward", "cuda", reasons=_cuda_reasons)
def _mix_backward_cuda(grad, partner, boxes, lam, use_box):
    return _ext.ops().mix_backward(grad, partner, boxes, lam, use_box)  # inverts partner in C++


@_backend.register("mix_backward", "triton")
def _mix_backward_triton(grad, partner, boxes, lam, use_box):
    from ..kernels import mix as k

    return k.mix_backward(grad, partner.contiguous(), boxes.contiguous(), lam.contiguous(), use_box.contiguous())


@_backend.register("mix_", "torch")
def _mix_inplace_torch(x, partner, boxes, lam, use_box):
    x.copy_(reference.mix(x, partner, boxes, lam, use_box))


@_backend.register("mix_", "cpp", reasons=_cpp_reasons)
def _mix_inplace_cpp(x, partner, boxes, lam, use_box):
    _ext.ops().mix_(x, partner, boxes, lam, use_box)


@_backend.register("mix_", "cuda", reasons=_cuda_reasons)
def _mix_inplace_cuda(x, partner, boxes, lam, use_box, check=False):
    if check:
        _check_on_device(x, partner, boxes, lam, involution=True)
    _ext.ops().mix_(x, partner, boxes, lam, use_box)


_mix_cuda.asserts_on_device = _mix_inplace_cuda.asserts_on_device = True
