"""Reference patch swap (SPEC section 3)."""
from __future__ import annotations

import torch


def cell_index(size: int, cells: int, device=None) -> torch.Tensor:
    """Cell of each pixel along one axis: ``floor(i * cells / size)`` for i in range(size)."""
    return torch.arange(size, device=device, dtype=torch.int64) * cells // size


def upsample_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, gh, gw]`` cell mask -> ``[B, H, W]`` bool pixel mask (pixel (h, w) takes its cell's value)."""
    gh, gw = mask.shape[-2:]
    rows = cell_index(height, gh, mask.device)
    cols = cell_index(width, gw, mask.device)
    return mask.bool()[:, rows][:, :, cols]


def inverse_partner(partner: torch.Tensor) -> torch.Tensor:
    """q with ``q[partner[i]] == i`` (a sort: deterministic, no atomics)."""
    return torch.argsort(partner)


def patch_swap(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[i, c, h, w] = x[partner[i], c, h, w]`` where ``mask[i, cell(h, w)]``, else ``x[i, c, h, w]``."""
    m = upsample_mask(mask, x.shape[2], x.shape[3]).unsqueeze(1)
    return torch.where(m, x[partner.long()], x)


def patch_swap_backward(grad: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad_x[j] = g[j] * (1 - mask[j]) + g[q[j]] * mask[q[j]]`` with q the inverse of partner."""
    q = inverse_partner(partner.long())
    m = upsample_mask(mask, grad.shape[2], grad.shape[3]).unsqueeze(1)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    return torch.where(m, zero, grad) + torch.where(m[q], grad[q], zero)
