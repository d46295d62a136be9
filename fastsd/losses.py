"""Fused distillation losses (SPEC section 4): the public ops, their torch.library registration and backends.

Layers, top to bottom:

* :func:`pair_kd_loss`, :func:`kd_loss`, :func:`feature_alignment_loss` - validate the arguments
  (metadata only) and call the registered ops, or in an eager call their implementation and
  autograd directly (:mod:`fastsd._eager`);
* ``torch.ops.fastsd.pair_kd_loss`` / ``kd_loss`` / ``feature_alignment_loss`` - ``torch.library``
  custom ops returning ``(loss, grad)``: the gradient of the loss with respect to the student input,
  computed in the same pass as the loss when that input requires grad. Their autograd formula only
  multiplies the saved gradient by grad_output, on the device: no host synchronisation anywhere;
* one implementation per backend, chosen by :mod:`fastsd._backend`: the Triton kernels in
  ``fastsd.kernels.losses``, the C++ kernels ``torch.ops.fastsd_C.<op>`` (csrc/cpu/losses.cpp), and
  the reference in :mod:`fastsd.reference.losses` (differentiated with autograd).

Second derivatives are not supported (the saved gradient is treated as a constant).
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _backend, _eager, _ext
from . import _validate as V
from . import reference
from .reference import losses as _reference_losses  # noqa: F401  (reference.losses)

LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TEACHERS = ("confident", "symmetric")
KD_REDUCTIONS = ("batchmean", "sum", "mean", "none")
FEATURE_KINDS = ("mse", "l1", "smooth_l1", "cosine")
FEATURE_REDUCTIONS = ("mean", "sum", "none")
_KIND_CODE = {k: i for i, k in enumerate(FEATURE_KINDS)}


_LABELS = "labels must be in [0, K={K}) or equal ignore_index={ignore_index}"
_PAIRS = "partner must pair rows: partner[partner[i]] == i for every i (e.g. from intra_class_pairs)"


def _assert_pair_indices(labels: torch.Tensor, partner: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Assert labels and partner on the device in one check, without a host sync (10 small ops and
    the assert; the C++ CPU kernel checks as it reads them, and the Triton kernel on CUDA where its
    launcher takes ``check_indices``).

    ``partner[clamp(partner, 0, B - 1)] == arange(B)`` holds exactly for involutions of range(B): c =
    clamp(partner) then satisfies partner o c = id, so c is injective, a permutation, partner = c^-1
    takes values in range(B), c = partner, and partner o partner = id.

    On CUDA a failure is an asynchronous device-side assert naming both conditions; on the CPU a
    ValueError at once naming the argument that failed.
    """
    fn = "fastsd.pair_kd_loss"
    B = partner.shape[0]
    idx = torch.arange(B, device=partner.device)
    paired = partner[partner.clamp(0, B - 1)] == idx
    labelled = (labels.clamp(0, num_classes - 1) == labels) | (labels == ignore_index)
    labels_message = _LABELS.format(K=num_classes, ignore_index=ignore_index)
    try:
        torch._assert_async((paired & labelled).all(), f"{fn}: {labels_message}; {_PAIRS}")
    except RuntimeError:  # the CPU raised at once: the error path may read values to say which one
        raise ValueError(f"{fn}: {labels_message if not bool(labelled.all()) else _PAIRS}") from None


def _number(fn: str, name: str, value) -> float:
    if not V.is_real(value) or not math.isfinite(float(value)):
        raise TypeError(f"{fn}: {name} must be a finite number, got {value!r}")
    return float(value)


def _constant(t: torch.Tensor) -> torch.Tensor:
    """t, detached where it requires grad (a detach is a new tensor, about 1 us): the ops' autograd
    never gives it a gradient, and a graph must not hold it as an input."""
    return t.detach() if t.requires_grad else t


def _choice(fn: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# Autograd shared by the three ops: the op returns (loss, grad); backward is grad * grad_output.


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    # The gradient output is never differentiated: don't let autograd fill a zero tensor of its
    # size for it in the backward (a full-size allocation for nothing).
    ctx.set_materialize_grads(False)


# scale_grad, the backward of the three losses: grad * scale, scale cast to grad's dtype (as torch's
# multiply), a new tensor. scale is a scalar (0-d), one value per row of a 2-D grad (ends empty), or
# one value per segment [ends[l-1], ends[l]) of a flat grad.
# On CUDA tensors torch's multiply is one kernel that reads and writes each element once: it stands
# in for a Triton or CUDA kernel, which would do no better.
@_backend.register("scale_grad", "torch", stand_in=True)
def _scale_grad_torch(grad: torch.Tensor, scale: torch.Tensor, ends: List[int],
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    scale = scale.to(grad.dtype)
    out = torch.empty_like(grad) if out is None else out
    if scale.dim() == 0:
        return torch.mul(grad, scale, out=out)
    if not ends:
        return torch.mul(grad, scale[:, None], out=out)
    start = 0
    for l, end in enumerate(ends):
        torch.mul(grad[start:end], scale[l], out=out[start:end])
        start = end
    return out


@_backend.register("scale_grad", "cpp")
def _scale_grad_cpp(grad, scale, ends):
    # The same multiply, into a huge-page backed buffer when large (csrc/cpu/alloc.h): no page fault
    # per 4 KiB of a fresh gradient. A Meta kernel (csrc/cpu/scale_grad.cpp) lets torch.compile trace it.
    return _ext.ops().scale_grad(grad, scale, ends)


def _donated(grad: torch.Tensor) -> bool:
    """True inside a backward after which autograd frees the graph (no retain_graph, no create_graph),
    on a plain tensor outside any tracing: a saved tensor that nothing outside the graph holds is
    then read for the last time and can be reused for the result (autograd's "donated buffers").
    False while torch.compile or any dispatch mode traces (they plan memory themselves, and a traced
    graph must not mutate what its forward saved) and on torch releases without the query (2.4)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    return _get_current_dispatch_mode() is None and not keep_graph()


def _scaled(grad: torch.Tensor, grad_loss: Optional[torch.Tensor], ends: Sequence[int] = ()) -> Optional[torch.Tensor]:
    """grad * grad_output (a scalar, one value per row for per-row losses, or one per segment), on the device.

    ``grad`` is the saved gradient output of a loss op, which the public functions never hand out:
    when the graph is freed after this backward it is scaled in place (no allocation, peak memory
    one gradient); else (retain_graph, create_graph, compile) into a new tensor."""
    if grad_loss is None:  # only the (non-differentiable) gradient output was used downstream
        return None
    if grad.dim() == 1 and grad.numel() == 0:
        raise RuntimeError("fastsd: this loss was computed with compute_grad=False; call the public function "
                           "(it sets compute_grad when the input requires grad)")
    if _donated(grad):
        return _scale_grad_torch(grad, grad_loss, list(ends), out=grad)
    return _backend.select("scale_grad", grad, grad_loss)(grad, grad_loss, list(ends))


# --- pair KD ------------------------------------------------------------------------------------


def _pair_kd(logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, temperature: float,
             kd_weight: float, ce_weight: float, symmetric: bool, ignore_index: int,
             compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    B, K = logits.shape
    if B == 0:
        return logits.new_zeros(()), logits.new_zeros(logits.shape if compute_grad else (0,))
    fn = _backend.select("pair_kd_loss", logits, labels, partner)
    args = (logits.contiguous(), labels.contiguous(), partner.contiguous(), temperature, kd_weight, ce_weight,
            symmetric, ignore_index, compute_grad)
    if getattr(fn, "checks_indices", False):  # the C++ CPU kernel checks as it reads them: a ValueError
        return fn(*args)
    asserts = getattr(fn, "asserts_on_device", None)
    if asserts is not None and asserts(labels):  # the Triton kernel asserts them on the GPU
        return fn(*args, check_indices=True)
    _assert_pair_indices(labels, partner, K, ignore_index)
    return fn(*args)


_pair_kd_op = torch.library.custom_op("fastsd::pair_kd_loss", mutates_args=())(_pair_kd)


@_pair_kd_op.register_fake
def _(logits, labels, partner, temperature, kd_weight, ce_weight, symmetric, ignore_index, compute_grad):
    return logits.new_empty(()), logits.new_empty(logits.shape if compute_grad else (0,))


def _pair_kd_backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    return _scaled(grad, grad_loss), None, None, None, None, None, None, None, None


_PAIR_KD = _eager.Path(_pair_kd_op, _pair_kd, _setup_context, _pair_kd_backward)


def pair_kd_loss(logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, temperature: float = 4.0,
                 kd_weight: float = 1.0, ce_weight: float = 1.0, teacher: str = "confident",
                 ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy plus the intra-class pair distillation term of ICPS, fused.

    ``ce_weight * mean_i CE(z_i, y_i)`` over rows whose label is not ``ignore_index``, plus
    ``kd_weight * T^2 * mean_pairs KL(stopgrad(softmax(z_t / T)) || softmax(z_s / T))``: in each pair
    (i, partner[i]) with i != partner[i], the teacher t is the member with the higher temperature-1
    probability of its own label (ties: the lower index) and s the other. ``teacher="symmetric"``
    takes both directions, each with the target side detached, averaged. The teacher row gets no KD
    gradient; every row gets its CE gradient.

    Choices where SPEC is silent: a pair with an ignored label contributes no KD term (it is not
    counted among the pairs); a mean over nothing (no labelled row, no pair) is 0, not NaN; a NaN
    confidence counts as a tie. Masked terms are selected out, never multiplied by 0: a row with an
    ignored label is not read at all (its gradient is exactly 0 even if it holds NaN or Inf, where
    ``F.cross_entropy`` leaves NaN), and NaN / Inf of a student never reach its teacher's gradient.

    Args:
        logits: ``[B, K]`` float32/float16/bfloat16/float64 (rows made contiguous if they are not).
        labels: integer ``[B]``, each in ``[0, K)`` or ``ignore_index``.
        partner: integer ``[B]`` with ``partner[partner[i]] == i`` (e.g. :func:`intra_class_pairs`);
            ``partner[i] == i`` is a singleton.
        temperature: T > 0 of the KD term.

    labels and partner are checked without a host sync: on the CPU a bad value raises ValueError at
    once (the C++ kernel checks them as it reads them); on CUDA it triggers an asynchronous
    device-side assert.

    Returns:
        A scalar in logits' dtype (computed in float32, or float64 for float64 logits). Its gradient
        is computed in the forward pass when logits requires grad.
    """
    fn = "fastsd.pair_kd_loss"
    V.tensor(fn, "logits", logits, ndim=2, dtypes=LOSS_DTYPES, what="[B, K]")
    V.tensor(fn, "labels", labels, ndim=1, dtypes=V.INT_DTYPES, what="[B]")
    V.tensor(fn, "partner", partner, ndim=1, dtypes=V.INT_DTYPES, what="[B]")
    V.same_device(fn, "logits", logits, labels=labels, partner=partner)
    B, K = logits.shape
    if labels.shape[0] != B:
        raise ValueError(f"{fn}: labels must have length B={B} (logits.shape[0]), got {labels.shape[0]}")
    if partner.shape[0] != B:
        raise ValueError(f"{fn}: partner must have length B={B} (logits.shape[0]), got {partner.shape[0]}")
    if K < 1:
        raise ValueError(f"{fn}: logits must have at least one class, got shape {tuple(logits.shape)}")
    temperature = V.positive_float(fn, "temperature", temperature)
    kd_weight = _number(fn, "kd_weight", kd_weight)
    ce_weight = _number(fn, "ce_weight", ce_weight)
    _choice(fn, "teacher", teacher, TEACHERS)
    if not V.is_integer(ignore_index):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    labels, partner = labels.long(), partner.long()
    loss, _ = _PAIR_KD((logits, labels, partner), compute_grad, logits, labels, partner, temperature, kd_weight,
                       ce_weight, teacher == "symmetric", int(ignore_index), compute_grad)
    return loss


# --- classic KD ---------------------------------------------------------------------------------


def _kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str,
        compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    B, K = student.shape
    grad_shape = student.shape if compute_grad else (0,)
    if B == 0:  # as F.kl_div: a mean over nothing is NaN, a sum 0
        loss = student.new_full((), float("nan") if reduction in ("batchmean", "mean") else 0.0)
        return (student.new_empty(0) if reduction == "none" else loss), student.new_zeros(grad_shape)
    red = {"batchmean": 1.0 / B, "mean": 1.0 / (B * K), "sum": 1.0, "none": 1.0}[reduction]
    fn = _backend.select("kd_loss", student, teacher)
    return fn(student.contiguous(), teacher.contiguous(), temperature, temperature ** 2 * red, temperature * red,
              reduction == "none", compute_grad)


_kd_op = torch.library.custom_op("fastsd::kd_loss", mutates_args=())(_kd)


@_kd_op.register_fake
def _(student, teacher, temperature, reduction, compute_grad):
    loss = student.new_empty((student.shape[0],) if reduction == "none" else ())
    return loss, student.new_empty(student.shape if compute_grad else (0,))


def _kd_backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    return _scaled(grad, grad_loss), None, None, None, None


_KD = _eager.Path(_kd_op, _kd, _setup_context, _kd_backward)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """Classic distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, the teacher detached.

    Args:
        student_logits, teacher_logits: ``[B, K]``, one float dtype. The teacher never receives a
            gradient, even when it requires grad.
        reduction: ``"batchmean"`` (sum / B, the default, as ``F.kl_div``'s), ``"sum"``, ``"mean"``
            (sum / (B * K), as ``F.kl_div``'s), or ``"none"``: one value per row, ``[B]`` (not per
            element as ``F.kl_div``: that would write a full [B, K] tensor).

    Returns:
        The loss in the logits' dtype; its gradient is computed in the forward pass.
    """
    fn = "fastsd.kd_loss"
    V.tensor(fn, "student_logits", student_logits, ndim=2, dtypes=LOSS_DTYPES, what="[B, K]")
    V.tensor(fn, "teacher_logits", teacher_logits, ndim=2, dtypes=LOSS_DTYPES, what="[B, K]")
    V.same_device(fn, "student_logits", student_logits, teacher_logits=teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"{fn}: teacher_logits must have student_logits' shape {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"{fn}: teacher_logits must have student_logits' dtype {student_logits.dtype}, "
                        f"got {teacher_logits.dtype}")
    if student_logits.shape[1] < 1:
        raise ValueError(f"{fn}: student_logits must have at least one class, got shape {tuple(student_logits.shape)}")
    temperature = V.positive_float(fn, "temperature", temperature)
    _choice(fn, "reduction", reduction, KD_REDUCTIONS)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    teacher_logits = _constant(teacher_logits)
    loss, _ = _KD((student_logits, teacher_logits), compute_grad, student_logits, teacher_logits, temperature,
                  reduction, compute_grad)
    return loss


# --- feature alignment ----------------------------------------------------------------------------


def _channels_last(x: torch.Tensor) -> bool:
    """Dense with dim 1 innermost (channels_last / channels_last_3d, and their any-rank analogue)."""
    return x.dim() > 2 and x.movedim(1, -1).is_contiguous()


def _normalise(student: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """The layout the kernels take: student contiguous or channels-last (else made contiguous),
    target in the same layout (a copy only when it differs)."""
    if student.is_contiguous():
        return student, target.contiguous(), False
    if _channels_last(student):
        return student, target.movedim(1, -1).contiguous().movedim(-1, 1), True
    return student.contiguous(), target.contiguous(), False


def _grad_views(flat: torch.Tensor, shapes, channels_last) -> List[torch.Tensor]:
    """Layer gradients as views of the flat buffer, each in its student's memory order."""
    out, offset = [], 0
    for shape, cl in zip(shapes, channels_last):
        n = math.prod(shape)
        seg = flat[offset:offset + n]
        offset += n
        if cl:
            moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
            out.append(seg.view(moved).movedim(-1, 1))
        else:
            out.append(seg.view(shape))
    return out


def _feature(student: List[torch.Tensor], target: List[torch.Tensor], channels_last: List[bool], kind: str,
             scales: List[float], reduction: str, compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    fn = _backend.select("feature_alignment_loss", *student, *target, kind=kind)
    return fn(list(student), list(target), list(channels_last), kind, list(scales), reduction == "none",
              compute_grad)


_feature_op = torch.library.custom_op("fastsd::feature_alignment_loss", mutates_args=())(_feature)


@_feature_op.register_fake
def _(student, target, channels_last, kind, scales, reduction, compute_grad):
    loss = student[0].new_empty((len(student),) if reduction == "none" else ())
    return loss, student[0].new_empty(sum(s.numel() for s in student) if compute_grad else 0)


def _feature_setup_context(ctx, inputs, output):
    student, _target, channels_last, _kind, _scales, reduction, _compute_grad = inputs
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.shapes = [tuple(s.shape) for s in student]
    ctx.channels_last = list(channels_last)
    ctx.per_layer = reduction == "none"
    ctx.set_materialize_grads(False)  # as _setup_context: no zero tensor for the gradient output


def _feature_backward(ctx, grad_loss, _grad_grad):
    (flat,) = ctx.saved_tensors
    no_grad = [None] * len(ctx.shapes)  # the targets are constants
    if grad_loss is None:  # only the (non-differentiable) gradient output was used downstream
        return no_grad, no_grad, None, None, None, None, None
    ends = list(itertools.accumulate(math.prod(shape) for shape in ctx.shapes)) if ctx.per_layer else []
    scaled = _scaled(flat, grad_loss, ends)  # one grad_output per layer when per_layer
    return _grad_views(scaled, ctx.shapes, ctx.channels_last), no_grad, None, None, None, None, None


_FEATURE = _eager.Path(_feature_op, _feature, _feature_setup_context, _feature_backward, lists=True)


def feature_alignment_loss(student: Union[torch.Tensor, Sequence[torch.Tensor]],
                           target: Union[torch.Tensor, Sequence[torch.Tensor]], kind: str = "mse",
                           weights: Union[None, str, Sequence[float]] = None,
                           reduction: str = "mean") -> torch.Tensor:
    """Layer-wise feature alignment of ICP: ``sum_l w_l * loss_l``, all layers in one kernel launch.

    Args:
        student: one tensor or a sequence (one per layer) of float tensors of rank >= 2, ``[N, C, ...]``.
        target: the same number of tensors, each of its student's shape and all of one dtype; a
            constant (it never receives a gradient, even when it requires grad).
        kind: ``"mse"``, ``"l1"``, ``"smooth_l1"`` (beta 1), or ``"cosine"``: ``1 - cos`` along dim 1
            (``a.b / (max(|a|, 1e-8) * max(|b|, 1e-8))``), averaged over the remaining positions.
        weights: None (all 1), ``"cosine"`` (``w_l = cos(l * pi / (4 * (L - 1)))``, ``[1]`` for one
            layer), or one float per layer.
        reduction: ``"mean"`` or ``"sum"`` of each layer's per-element (per-position for cosine)
            losses; ``"none"`` returns ``[w_l * mean_l]``, a 1-D tensor of length L (its sum is the
            ``"mean"`` result).

    Contiguous and channels-last maps are read in place (a target in the other layout is copied to
    its student's); other layouts are made contiguous. Layers must not be empty.

    Returns:
        The loss in the inputs' dtype. The gradient of every layer is computed in the forward pass
        into one buffer; the backward multiplies it by grad_output (one multiply for all layers).
    """
    fn = "fastsd.feature_alignment_loss"
    single = isinstance(student, torch.Tensor)
    if single != isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: student and target must both be tensors or both sequences of tensors, "
                        f"got {type(student).__name__} and {type(target).__name__}")
    for name, value in (("student", student), ("target", target)):
        if not single and not isinstance(value, (list, tuple)):
            raise TypeError(f"{fn}: {name} must be a tensor or a sequence of tensors, got {type(value).__name__}")
    students = [student] if single else list(student)
    targets = [target] if single else list(target)
    if not students:
        raise ValueError(f"{fn}: student must hold at least one layer")
    if len(targets) != len(students):
        raise ValueError(f"{fn}: target must have one tensor per student layer ({len(students)}), got {len(targets)}")
    L = len(students)
    names = ["student", "target"] if single else None
    dtype, device = None, getattr(students[0], "device", None)
    for l, (s, t) in enumerate(zip(students, targets)):
        sn, tn = names or (f"student[{l}]", f"target[{l}]")
        V.tensor(fn, sn, s, min_ndim=2, dtypes=LOSS_DTYPES)
        V.tensor(fn, tn, t, min_ndim=2, dtypes=LOSS_DTYPES)
        dtype = dtype or s.dtype
        for name, x in ((sn, s), (tn, t)):
            if x.dtype != dtype:
                raise TypeError(f"{fn}: every student and target tensor must have one dtype ({dtype}), "
                                f"{name} has {x.dtype}")
        if t.shape != s.shape:
            raise ValueError(f"{fn}: {tn} must have {sn}'s shape {tuple(s.shape)}, got {tuple(t.shape)}")
        if s.numel() == 0:
            raise ValueError(f"{fn}: {sn} is empty (shape {tuple(s.shape)})")
        if s.device != device or t.device != device:  # the message names the argument
            V.same_device(fn, "student" if single else "student[0]", students[0], **{sn: s, tn: t})
    _choice(fn, "kind", kind, FEATURE_KINDS)
    _choice(fn, "reduction", reduction, FEATURE_REDUCTIONS)
    if weights is not None and not isinstance(weights, str):
        if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
            raise TypeError(f"{fn}: weights must be None, 'cosine' or a sequence of floats, got {type(weights).__name__}")
        if len(weights) != L:
            raise ValueError(f"{fn}: weights must have one value per layer ({L}), got {len(weights)}")
        weights = [_number(fn, f"weights[{l}]", w) for l, w in enumerate(weights)]
    elif isinstance(weights, str) and weights != "cosine":
        raise ValueError(f"{fn}: weights must be None, 'cosine' or a sequence of floats, got {weights!r}")
    w = reference.layer_weights(weights, L)

    norm = [_normalise(s, _constant(t)) for s, t in zip(students, targets)]
    students = [n[0] for n in norm]
    targets = [n[1] for n in norm]
    channels_last = [n[2] for n in norm]
    if kind == "cosine":
        counts = [s.numel() // s.shape[1] for s in students]  # positions
    else:
        counts = [s.numel() for s in students]
    scales = [wl if reduction == "sum" else wl / n for wl, n in zip(w, counts)]
    compute_grad = torch.is_grad_enabled() and any(s.requires_grad for s in students)
    loss, _ = _FEATURE(students + targets, compute_grad, students, targets, channels_last, kind, scales, reduction,
                       compute_grad)
    return loss


# --- backends ------------------------------------------------------------------------------------


_backend.register("pair_kd_loss", "torch")(reference.losses.pair_kd_loss_and_grad)
_backend.register("kd_loss", "torch")(reference.losses.kd_loss_and_grad)


@_backend.register("pair_kd_loss", "cpp")
def _pair_kd_cpp(*args):
    return _ext.ops().pair_kd_loss(*args)


# The C++ kernel checks labels and partner as it reads them (a ValueError with _assert_pair_indices'
# messages): no extra passes over them on the CPU.
_pair_kd_cpp.checks_indices = True


@_backend.register("kd_loss", "cpp")
def _kd_cpp(*args):
    return _ext.ops().kd_loss(*args)


@_backend.register("feature_alignment_loss", "torch")
def _feature_torch(student, target, channels_last, kind, scales, per_layer, compute_grad):
    per, grads = [], []
    for s, t, scale in zip(student, target, scales):
        loss, g = reference.losses.feature_layer_loss_and_grad(s, t, kind, scale, compute_grad)
        per.append(loss)
        grads.append(g)
    per = torch.stack(per)
    flat = student[0].new_empty(sum(s.numel() for s in student) if compute_grad else 0)
    if compute_grad:
        for view, g in zip(_grad_views(flat, [tuple(s.shape) for s in student], channels_last), grads):
            view.copy_(g)
    return (per if per_layer else per.sum()).to(student[0].dtype), flat


@_backend.register("feature_alignment_loss", "cpp")
def _feature_cpp(student, target, channels_last, kind, scales, per_layer, compute_grad):
    return _ext.ops().feature_alignment_loss(student, target, channels_last, _KIND_CODE[kind], scales, per_layer,
                                             compute_grad)


def _triton_dtype_reasons(*tensors, **kwargs) -> List[str]:
    bad = sorted({str(t.dtype) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()
                  and t.dtype == torch.float64})
    return [f"the Triton kernels take float32/float16/bfloat16, not {', '.join(bad)}"] if bad else []


def _triton_feature_reasons(*tensors, kind="mse") -> List[str]:
    why = _triton_dtype_reasons(*tensors)
    if kind == "cosine":
        from .kernels import losses as k

        wide = [t.shape[1] for t in tensors if t.shape[1] > k.MAX_COSINE_CHANNELS]
        if wide:
            why.append(f"the Triton cosine kernel holds at most {k.MAX_COSINE_CHANNELS} channels, got {max(wide)}")
    return why


@_backend.register("pair_kd_loss", "triton", reasons=_triton_dtype_reasons)
def _pair_kd_triton(*args, check_indices=False):
    from .kernels import losses as k

    return k.pair_kd_loss(*args, check_indices=True) if check_indices else k.pair_kd_loss(*args)


def _pair_kd_triton_asserts(labels: torch.Tensor) -> bool:
    """Issue 12: the Triton launcher's ``check_indices`` makes the counts kernel (which reads every
    label and partner already) assert them with ``tl.device_assert`` on CUDA, where it is compiled in
    (the interpreter ignores it: on CPU tensors the glue checks)."""
    from .kernels import losses as k

    return V.kernel_asserts(labels) and V.launcher_takes(k.pair_kd_loss, "check_indices")


_pair_kd_triton.asserts_on_device = _pair_kd_triton_asserts


@_backend.register("kd_loss", "triton", reasons=_triton_dtype_reasons)
def _kd_triton(*args):
    from .kernels import losses as k

    return k.kd_loss(*args)


@_backend.register("feature_alignment_loss", "triton", reasons=_triton_feature_reasons)
def _feature_triton(student, target, channels_last, kind, scales, per_layer, compute_grad):
    from .kernels import losses as k

    return k.feature_alignment_loss(student, target, channels_last, kind, scales, per_layer, compute_grad)
