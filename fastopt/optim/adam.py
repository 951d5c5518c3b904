"""fastopt.Adam and fastopt.AdamW: drop-ins for torch.optim.Adam and torch.optim.AdamW."""

from __future__ import annotations

from typing import Any, Union

from torch import Tensor

from .. import rules
from ._docs import EXTRAS_DOC
from ._options import parse_extras
from .optimizer import FusedOptimizer, number


class Adam(FusedOptimizer):
    _rule = rules.ADAM
    _group_keys = ("lr", "betas", "eps", "weight_decay")
    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _sparse_message = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        **extras: Any,
    ) -> None:
        options, flags = parse_extras(type(self).__name__, extras)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if flags["foreach"] and not flags["capturable"]:  # torch's refusals, kept for drop-in parity
            if isinstance(lr, Tensor):
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if isinstance(betas[0], Tensor):
                raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            **flags,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, options)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _hparams(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]  # the rule's beta1, beta2 (float: Note [scalars in float64])
        return super()._hparams({**group, "beta1": number(beta1), "beta2": number(beta2)})


class AdamW(Adam):
    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        **extras: Any,
    ) -> None:
        if "decoupled_weight_decay" in extras:
            raise TypeError("AdamW() got an unexpected keyword argument 'decoupled_weight_decay'")
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
            decoupled_weight_decay=True, **extras,
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW: always decoupled
            group["decoupled_weight_decay"] = True


Adam.__doc__ = r"""Implements Adam (torch.optim.Adam's algorithm, arguments, defaults and state dict).

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) \; (+\lambda\theta_{t-1} \text{ unless decoupled}),
        \quad \theta_{t-1} \leftarrow \theta_{t-1}(1-\gamma\lambda) \text{ if decoupled} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \quad v_t \leftarrow \max(v^{max}_{t-1}, v_t) \text{ if amsgrad} \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
                    \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay (default: 0)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing (default: False)
        decoupled_weight_decay (bool, optional): AdamW's decoupled weight decay (default: False)
""" + EXTRAS_DOC

AdamW.__doc__ = r"""Implements AdamW: :class:`fastopt.Adam` with ``decoupled_weight_decay=True``
    and ``weight_decay=1e-2`` by default (torch.optim.AdamW's arguments and state dict).

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay coefficient (default: 1e-2)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing (default: False)
""" + EXTRAS_DOC
