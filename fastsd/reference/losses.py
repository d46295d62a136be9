"""Reference distillation losses (SPEC section 4): the formulas, as directly as PyTorch says them.

These are differentiable PyTorch expressions: the "torch" backend and the float64 test oracle
take their gradients with autograd.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8


def pair_kd_loss(logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, temperature: float = 4.0,
                 kd_weight: float = 1.0, ce_weight: float = 1.0, teacher: str = "confident",
                 ignore_index: int = -100) -> torch.Tensor:
    """``ce_weight * mean_valid CE(z_i, y_i) + kd_weight * T^2 * mean_pairs KL(sg(p_t^T) || p_s^T)``.

    In each pair (i, partner[i]), i != partner[i], both labels valid: the teacher t is the member
    with the higher temperature-1 probability of its own label (ties, NaN included: the lower
    index), s the other; ``teacher="symmetric"`` averages both directions. An empty mean (no valid
    row, no pair) is 0.

    Masked terms are selected out, never multiplied by 0: a row with an ignored label (it has no CE
    term and is in no pair) is not read, so its loss contribution and its whole gradient are exactly
    0 whatever it holds (NaN / Inf included; F.cross_entropy would leave NaN in its gradient), and a
    teacher row's gradient has no KD part, so NaN / Inf of its student never reach it.
    """
    B = logits.shape[0]
    labels, partner = labels.long(), partner.long()
    index = torch.arange(B, device=logits.device)
    valid = labels != ignore_index
    # Every term reads its rows through a where: autograd's backward of a where selects, so the
    # gradient of a row that the term does not use is exactly 0 (no 0 * NaN from the log_softmax).
    log_p = F.log_softmax(torch.where(valid[:, None], logits, 0), dim=1)
    ce_rows = -log_p.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    ce = torch.where(valid, ce_rows, 0).sum() / valid.sum().clamp(min=1).to(logits.dtype)

    paired = (partner != index) & valid & valid[partner]
    confidence = -ce_rows.detach()  # log p(y_i) at temperature 1
    other = confidence[partner]
    # The lower index teaches unless its partner is strictly more confident (NaN: a tie).
    is_teacher = torch.where(index < partner, ~(other > confidence), confidence > other)
    student = paired & ~is_teacher if teacher == "confident" else paired
    weight = 1.0 if teacher == "confident" else 0.5  # symmetric: every paired row is a student, half weight
    log_q = F.log_softmax(torch.where(student[:, None], logits, 0) / temperature, dim=1)
    target = F.log_softmax(torch.where(paired[:, None], logits, 0) / temperature, dim=1)[partner].detach()
    # KL(p_partner || p_i) at temperature T, the partner's side detached.
    kl_rows = F.kl_div(log_q, target, reduction="none", log_target=True).sum(1)
    n_pairs = (paired.sum() / 2).clamp(min=1).to(logits.dtype)
    kd = temperature ** 2 * torch.where(student, weight * kl_rows, 0).sum() / n_pairs
    return ce_weight * ce + kd_weight * kd


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, teacher detached.

    reduction: "batchmean" (sum / B), "sum", "mean" (sum / (B * K), as torch's kl_div), "none"
    (per row, ``[B]``).
    """
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    rows = temperature ** 2 * F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "batchmean":
        return total / max(student_logits.shape[0], 1)
    if reduction == "mean":
        return total / max(student_logits.numel(), 1)
    return total


def layer_weights(weights: Union[None, str, Sequence[float]], num_layers: int) -> List[float]:
    """None -> all 1; "cosine" -> ``cos(l * pi / (4 * (L - 1)))`` (``[1]`` for one layer); else the list."""
    if weights is None:
        return [1.0] * num_layers
    if isinstance(weights, str):  # "cosine"
        if num_layers == 1:
            return [1.0]
        return [math.cos(l * math.pi / (4 * (num_layers - 1))) for l in range(num_layers)]
    return [float(w) for w in weights]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """``a . b / (max(|a|, eps) * max(|b|, eps))`` along dim 1 (torch's definition)."""
    dot = (a * b).sum(1)
    return dot / (a.norm(dim=1).clamp_min(eps) * b.norm(dim=1).clamp_min(eps))


def feature_alignment_loss(student, target, kind: str = "mse", weights=None,
                           reduction: str = "mean") -> torch.Tensor:
    """``sum_l w_l * loss_l`` with loss_l the ``reduction`` of the per-element (per-position for
    cosine) loss of layer l; ``"none"`` returns ``[w_l * mean_l]`` (so its sum is the "mean" result).
    The target is a constant.
    """
    if isinstance(student, torch.Tensor):
        student, target = [student], [target]
    w = layer_weights(weights, len(student))
    out = []
    for s, t, wl in zip(student, target, w):
        t = t.detach()
        if kind == "mse":
            e = (s - t) ** 2
        elif kind == "l1":
            e = (s - t).abs()
        elif kind == "smooth_l1":
            e = F.smooth_l1_loss(s, t, reduction="none", beta=1.0)
        else:  # cosine
            e = 1 - cosine_similarity(s, t)
        out.append(wl * (e.sum() if reduction == "sum" else e.mean()))
    losses = torch.stack(out)
    return losses if reduction == "none" else losses.sum()


# ------------------------------------------------------------------------------------------------
# The same losses with their gradient written out: the "torch" backend (inside a custom op there is
# no autograd), in the argument conventions of the backends (see fastsd/losses.py). The tests check
# these gradients against autograd of the formulas above.


def _opmath(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pair_kd_loss_and_grad(logits, labels, partner, temperature, kd_weight, ce_weight, symmetric, ignore_index,
                          compute_grad):
    """(loss, d loss / d logits) of :func:`pair_kd_loss`, in float32 (float64 for float64 logits).

    As there, every masked term is selected out (torch.where), never multiplied by 0: NaN / Inf of
    a row reach only the terms that read it."""
    x = logits.to(_opmath(logits))
    B, K = x.shape
    labels, partner = labels.long(), partner.long()
    index = torch.arange(B, device=x.device)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    log_p = F.log_softmax(x, dim=1)
    ce_rows = torch.where(valid, -log_p.gather(1, safe[:, None]).squeeze(1), 0)
    n_valid = valid.sum().clamp(min=1)
    paired = (partner != index) & valid & valid[partner]
    confidence, other = -ce_rows, -ce_rows[partner]
    is_teacher = torch.where(index < partner, ~(other > confidence), confidence > other)
    student = paired if symmetric else paired & ~is_teacher
    weight = 0.5 if symmetric else 1.0
    n_pairs = (paired.sum() / 2).clamp(min=1)
    log_q = F.log_softmax(x / temperature, dim=1)
    q = log_q.exp()
    kl_rows = torch.where(student, weight * (q[partner] * (log_q[partner] - log_q)).sum(1), 0)
    loss = (ce_weight * ce_rows.sum() / n_valid
            + kd_weight * temperature ** 2 * kl_rows.sum() / n_pairs)
    grad = logits.new_empty(0)
    if compute_grad:
        onehot = F.one_hot(safe, K).to(x.dtype)
        g = torch.where(valid[:, None], (ce_weight / n_valid) * (log_p.exp() - onehot), 0)
        g = g + torch.where(student[:, None], (kd_weight * temperature / n_pairs) * weight * (q - q[partner]), 0)
        grad = g.to(logits.dtype)
    return loss.to(logits.dtype), grad


def kd_loss_and_grad(student, teacher, temperature, loss_scale, grad_scale, per_row, compute_grad):
    """rows = KL(softmax(t / T) || softmax(s / T)); (loss_scale * rows or its sum, grad_scale * (q - p))."""
    dt = _opmath(student)
    log_q = F.log_softmax(student.to(dt) / temperature, dim=1)
    log_p = F.log_softmax(teacher.to(dt) / temperature, dim=1)
    p = log_p.exp()
    rows = (p * (log_p - log_q)).sum(1)
    loss = loss_scale * (rows if per_row else rows.sum())
    grad = (grad_scale * (log_q.exp() - p)).to(student.dtype) if compute_grad else student.new_empty(0)
    return loss.to(student.dtype), grad


def feature_layer_loss_and_grad(s, t, kind, scale, compute_grad):
    """``scale * sum`` of one layer's per-element (per-position for cosine) losses, and its gradient."""
    dt = _opmath(s)
    s, t = s.to(dt), t.to(dt)
    g = None
    if kind == "cosine":
        dot = (s * t).sum(1, keepdim=True)
        ns, nt = s.norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
        axy = ns.clamp_min(COSINE_EPS) * nt.clamp_min(COSINE_EPS)
        cos = dot / axy
        loss = scale * (1 - cos).sum()
        if compute_grad:
            kx = torch.where(ns > COSINE_EPS, cos / (ns * ns), torch.zeros_like(ns))
            g = scale * (kx * s - t / axy)
    else:
        d = s - t
        if kind == "mse":
            e, g = d * d, 2 * d
        elif kind == "l1":
            e, g = d.abs(), d.sign()
        else:
            small = d.abs() < 1
            # the gradient is clamp(d, -1, 1): it keeps a NaN d, as torch's smooth_l1 backward does
            e, g = torch.where(small, 0.5 * d * d, d.abs() - 0.5), d.clamp(-1.0, 1.0)
        loss = scale * e.sum()
        g = scale * g
    return loss, g
