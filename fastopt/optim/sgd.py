"""fastopt.SGD: drop-in for torch.optim.SGD."""

from __future__ import annotations

from typing import Any, Union

from torch import Tensor

from .. import reference as ref
from .. import rules
from ._docs import EXTRAS_DOC
from ._options import parse_extras
from .optimizer import FusedOptimizer, number


class SGD(FusedOptimizer):
    _rule = rules.SGD
    _group_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    _state_names = ("momentum_buffer",)
    _supports_sparse = True

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: Union[float, Tensor] = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        **extras: Any,
    ) -> None:
        options, flags = parse_extras(type(self).__name__, extras)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": flags["foreach"],
            "differentiable": flags["differentiable"],
            "fused": flags["fused"],
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults, options)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()  # torch keeps no state without momentum

    def _hparams(self, group: dict) -> dict:
        # a tensor weight_decay is read as a number, as torch's add(alpha=weight_decay) reads it
        return super()._hparams({**group, "weight_decay": number(group["weight_decay"])})

    def _check_sparse(self, param: Tensor, group: dict) -> None:
        if group["momentum"] != 0:
            raise NotImplementedError("fastopt.SGD: sparse gradients are supported without momentum only")
        if group["weight_decay"] != 0:  # torch.optim.SGD fails mid-step: add(sparse, dense) is not supported
            raise RuntimeError("SGD: weight_decay is not compatible with sparse gradients")
        if param.is_complex() or self._uses_master(param):
            raise NotImplementedError("SGD: sparse gradients are supported for real parameters without master weights")

    def _sparse_step(self, param: Tensor, group: dict) -> None:
        ref.sparse_sgd(param, param.grad, lr=group["lr"], maximize=group["maximize"])


SGD.__doc__ = r"""Implements stochastic gradient descent, optionally with momentum (torch.optim.SGD's
    algorithm, arguments and state dict).

    .. math::
        g_t = \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1},\quad
        b_t = \mu b_{t-1} + (1-\tau) g_t \;(b_1 = g_1),\quad
        \theta_t = \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov, else } b_t)
        \quad (\theta_t = \theta_{t-1} - \gamma g_t \text{ when } \mu = 0)

    As in torch, the momentum buffer starts as the first step's gradient (dampening applies from
    the second step), and ``momentum=0`` keeps no state. Sparse gradients are supported without
    momentum and weight decay (not with clipping or GradScaler).

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening for momentum (default: 0)
        weight_decay (float, Tensor, optional): weight decay (L2 penalty) (default: 0)
        nesterov (bool, optional): Nesterov momentum (needs a momentum and zero dampening)
            (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing (default: False)
        foreach, differentiable, fused: torch.optim's flags
""" + EXTRAS_DOC
