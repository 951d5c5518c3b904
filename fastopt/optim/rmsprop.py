"""fastopt.RMSprop: drop-in for torch.optim.RMSprop."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor

from .. import rules
from ._docs import EXTRAS_DOC
from ._options import parse_extras
from .optimizer import FusedOptimizer


class RMSprop(FusedOptimizer):
    _rule = rules.RMSPROP
    _group_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    _state_names = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        **extras: Any,
    ) -> None:
        options, flags = parse_extras(
            type(self).__name__,
            {"capturable": capturable, "foreach": foreach, "differentiable": differentiable, **extras},
        )
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": flags["capturable"],
            "foreach": flags["foreach"],
            "maximize": maximize,
            "differentiable": flags["differentiable"],
        }
        super().__init__(params, defaults, options)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys


RMSprop.__doc__ = r"""Implements RMSprop (torch.optim.RMSprop's algorithm, arguments and state dict).

    .. math::
        g_t = \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1},\quad
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \text{ (centered)} \\
        d_t = \sqrt{v_t - \bar g_t^2} + \epsilon,\quad b_t = \mu b_{t-1} + g_t/d_t,\quad
        \theta_t = \theta_{t-1} - \gamma b_t \quad (b_t = g_t/d_t \text{ when } \mu = 0)

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        alpha (float, optional): smoothing constant (default: 0.99)
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        momentum (float, optional): momentum factor (default: 0)
        centered (bool, optional): normalize by an estimate of the gradient's variance
            (default: False)
        capturable, foreach, differentiable: torch.optim's flags, in torch's positions
        maximize (bool, optional): maximize the objective instead of minimizing (default: False)
""" + EXTRAS_DOC
