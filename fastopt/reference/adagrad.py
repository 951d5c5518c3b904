"""Adagrad, the specification (torch.optim.Adagrad's algorithm)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._scalars import Scalar, addcdiv_, as_scalar, per_tensor, stacked_steps, update_grads


@torch.no_grad()
def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Scalar,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
) -> None:
    r"""One dense Adagrad step, in place; ``steps`` already incremented (t).

    .. math::
        g \leftarrow \pm\nabla + \lambda\theta,\quad s \leftarrow s + g^2,\quad
        \theta \leftarrow \theta - \frac{\gamma}{1 + (t-1)\,\eta}\,\frac{g}{\sqrt{s} + \epsilon}
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    grads = update_grads(params, grads, maximize, weight_decay)
    t = stacked_steps(steps)
    lr_t = as_scalar(lr, device)
    neg_clr = per_tensor(-lr_t / (1 + (t - 1) * lr_decay).to(lr_t.dtype), dtype)

    torch._foreach_addcmul_(state_sums, grads, grads, value=1)
    std = torch._foreach_sqrt(state_sums)
    torch._foreach_add_(std, eps)
    addcdiv_(params, grads, std, neg_clr)  # param.addcdiv_(grad, std, value=-clr)


@torch.no_grad()
def sparse_adagrad(
    param: Tensor, grad: Tensor, state_sum: Tensor, step: Tensor, *, lr: Scalar, lr_decay: float,
    eps: float, maximize: bool = False,
) -> None:
    """Adagrad for one sparse (COO) gradient, as torch.optim.Adagrad does it: only the rows present
    in ``grad`` change. ``step`` already incremented. Weight decay is not defined for sparse grads."""
    grad = (-grad if maximize else grad).coalesce()  # the update is non-linear: indices must be unique
    indices, values = grad._indices(), grad._values()
    t = step.to(torch.float64)
    lr_t = as_scalar(lr, param.device)
    clr = lr_t / (1 + (t - 1) * lr_decay).to(lr_t.dtype)
    state_sum.add_(torch.sparse_coo_tensor(indices, values.pow(2), grad.size()))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    delta = torch.sparse_coo_tensor(indices, values / std_values, grad.size())
    param.add_(delta * (-clr).to(param.dtype))
