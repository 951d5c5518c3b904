"""Gradient preparation, the specification: AMP unscale, value clipping and global-norm clipping.

The order is torch's recipe (``scaler.unscale_`` → ``clip_grad_value_`` → ``clip_grad_norm_`` →
step), applied out of place: fastopt never writes ``param.grad``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update math runs in: float64 for float64 storage, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def prepare_grads(
    grads: list[Tensor],
    *,
    inv_scale: Optional[Tensor] = None,
    clip_value: Optional[float] = None,
    clip_coef: Optional[Tensor] = None,
) -> list[Tensor]:
    """New gradient tensors in the compute dtype: ``clamp(g * inv_scale, ±clip_value) * clip_coef``.

    ``inv_scale`` and ``clip_coef`` are 0-dim device tensors (or None)."""
    if not grads:
        return []
    dtype = compute_dtype(grads[0].dtype)
    out = [g.to(dtype, copy=True) for g in grads]
    if inv_scale is not None:
        torch._foreach_mul_(out, inv_scale.to(dtype))
    if clip_value is not None:
        torch._foreach_clamp_min_(out, -clip_value)
        torch._foreach_clamp_max_(out, clip_value)
    if clip_coef is not None:
        torch._foreach_mul_(out, clip_coef.to(dtype))
    return out


def norm_of_norms(norms: list[Tensor], norm_type: float) -> Tensor:
    """Combine partial norms (of disjoint sets of elements) into the norm of their union."""
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    # float64 as soon as one part is (torch.stack's promotion in clip_grad_norm_: the total norm and
    # the coefficient are then float64, rounded to float32 where float32 grads are scaled)
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(
        torch.stack([n.reshape(()).to(device=device, dtype=dtype, non_blocking=True) for n in norms]),
        norm_type,
    )


@torch.no_grad()
def grad_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """The ``norm_type`` norm of all elements of ``grads`` (torch.nn.utils.clip_grad_norm_'s
    two-level reduction: per-tensor norms, then the norm of those). NaN and inf propagate.
    Empty tensors contribute nothing (torch's inf-norm refuses them; fastopt does not)."""
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros(())
    return norm_of_norms(list(torch._foreach_norm(grads, norm_type)), norm_type)


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)``, exactly as clip_grad_norm_ computes it."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
