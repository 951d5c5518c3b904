"""Adam / AdamW, the specification (torch.optim.Adam's algorithm, foreach=False order of operations)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._scalars import Scalar, addcdiv_, as_scalar, per_tensor, stacked_steps, update_grads


@torch.no_grad()
def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> None:
    r"""One Adam step, in place, for tensors of one device and one dtype.

    ``steps`` hold the step count *after* this step's increment (t below).

    .. math::
        g &\leftarrow \pm\nabla \;(+\lambda\theta \text{ if L2 decay}),\quad
        \theta \leftarrow \theta(1-\gamma\lambda) \text{ if decoupled} \\
        m &\leftarrow \mathrm{lerp}(m, g, 1-\beta_1),\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \quad \hat v = \max(\hat v, v) \text{ if amsgrad} \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
                 \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    grads = update_grads(params, grads, maximize, 0.0 if decoupled_weight_decay else weight_decay)
    lr_t = as_scalar(lr, device)
    if weight_decay != 0 and decoupled_weight_decay:
        torch._foreach_mul_(params, (1 - lr_t * weight_decay).to(dtype))

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    t = stacked_steps(steps)
    bias_correction1 = 1 - torch.pow(beta1, t)
    bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    neg_step_size = per_tensor(-lr_t / bias_correction1.to(lr_t.dtype), dtype)

    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, per_tensor(bias_correction2_sqrt, dtype))
    torch._foreach_add_(denom, eps)
    addcdiv_(params, exp_avgs, denom, neg_step_size)  # param.addcdiv_(exp_avg, denom, value=-step_size)
