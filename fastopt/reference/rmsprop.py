"""RMSprop, the specification (torch.optim.RMSprop's algorithm)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._scalars import Scalar, add_scaled_, addcdiv_, as_scalar, update_grads


@torch.no_grad()
def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: Scalar,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool = False,
    maximize: bool = False,
) -> None:
    r"""One RMSprop step, in place (the step count is kept by the caller; RMSprop does not use it).

    .. math::
        g \leftarrow \pm\nabla + \lambda\theta,\quad v \leftarrow \alpha v + (1-\alpha) g^2,\quad
        \bar g \leftarrow \mathrm{lerp}(\bar g, g, 1-\alpha) \text{ if centered} \\
        d = \sqrt{v - \bar g^2} + \epsilon \;(\bar g = 0 \text{ unless centered}),\quad
        b \leftarrow \mu b + g/d,\quad \theta \leftarrow \theta - \gamma b \;(b = g/d \text{ if } \mu = 0)
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    grads = update_grads(params, grads, maximize, weight_decay)
    neg_lr = (-as_scalar(lr, device)).to(dtype)

    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
    if centered:
        torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
        avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(avg, eps)

    neg_lrs = [neg_lr] * len(params)
    if momentum > 0:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_addcdiv_(momentum_buffers, grads, avg)
        add_scaled_(params, momentum_buffers, neg_lrs)  # param.add_(buf, alpha=-lr)
    else:
        addcdiv_(params, grads, avg, neg_lrs)  # param.addcdiv_(grad, avg, value=-lr)
