"""SGD, the specification (torch.optim.SGD's algorithm)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._scalars import Scalar, add_scaled_, as_scalar, update_grads


@torch.no_grad()
def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    r"""One SGD step, in place; ``steps`` already incremented: step 1 is a buffer's first step, on
    which it becomes the grad (torch keeps no count for SGD; the caller's, Note [SGD's first step],
    csrc/include/fastopt/update_math.h). ``momentum_buffers`` is empty when ``momentum`` is 0.

    .. math::
        g \leftarrow \pm\nabla + \lambda\theta,\quad
        b \leftarrow \mu b + (1-\tau) g \;(b \leftarrow g \text{ on the first step}),\quad
        g \leftarrow g + \mu b \text{ (nesterov) or } b,\quad \theta \leftarrow \theta - \gamma g
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    grads = update_grads(params, grads, maximize, weight_decay)
    if momentum != 0:
        later = torch._foreach_mul(momentum_buffers, momentum)
        torch._foreach_add_(later, grads, alpha=1 - dampening)  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        for buf, g, new, step in zip(momentum_buffers, grads, later, steps):
            buf.copy_(torch.where(step.reshape(()) == 1, g, new))  # the first step: buf = grad.clone()
        if nesterov:
            grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum)
        else:
            grads = momentum_buffers
    neg_lr = (-as_scalar(lr, device)).to(dtype)
    add_scaled_(params, grads, [neg_lr] * len(params))  # param.add_(grad, alpha=-lr)


@torch.no_grad()
def sparse_sgd(param: Tensor, grad: Tensor, *, lr: Scalar, maximize: bool = False) -> None:
    """SGD without momentum or weight decay for one sparse (COO) gradient, as torch.optim.SGD does
    it: only the rows in ``grad`` change."""
    grad = -grad if maximize else grad
    param.add_(grad, alpha=-float(lr))  # torch reads a tensor lr as a number here (_to_scalar)
