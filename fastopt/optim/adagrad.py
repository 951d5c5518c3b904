"""fastopt.Adagrad: drop-in for torch.optim.Adagrad."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor

from .. import reference as ref
from .. import rules
from ._docs import EXTRAS_DOC
from ._options import parse_extras
from ._state_buffer import StateLayout
from .optimizer import FusedOptimizer


class Adagrad(FusedOptimizer):
    _rule = rules.ADAGRAD
    _group_keys = ("lr", "lr_decay", "weight_decay", "eps", "initial_accumulator_value")
    _state_names = ("sum",)
    _supports_sparse = True

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: Optional[bool] = None,
        *,
        maximize: bool = False,
        **extras: Any,
    ) -> None:
        options, flags = parse_extras(type(self).__name__, {"foreach": foreach, **extras})
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": flags["foreach"],
            "maximize": maximize,
            "differentiable": flags["differentiable"],
            "fused": flags["fused"],
        }
        super().__init__(params, defaults, options)
        # torch.optim.Adagrad creates its state eagerly; so do we, so that state dicts match
        # (in one buffer per key: Note [state in one buffer], optim/_state_buffer.py)
        layout = StateLayout.for_this_step()
        ordinal = 0
        for group in self.param_groups:
            for p in group["params"]:
                self._ensure_state(p, group, ordinal, layout)
                ordinal += 1
        if layout is not None:
            layout.place()

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("sum",)

    def _initial_value(self, key: str, group: dict) -> float:
        return group["initial_accumulator_value"]

    def _check_sparse(self, param: Tensor, group: dict) -> None:
        if group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        if param.is_complex() or self._uses_master(param):
            raise NotImplementedError(
                "Adagrad: sparse gradients are supported for real parameters without master weights"
            )

    def _sparse_step(self, param: Tensor, group: dict) -> None:
        state = self.state[param]
        state["step"] += 1
        hp = self._hparams(group)
        ref.sparse_adagrad(
            param, param.grad, state["sum"], state["step"], lr=hp["lr"], lr_decay=hp["lr_decay"],
            eps=hp["eps"], maximize=hp["maximize"],
        )


Adagrad.__doc__ = r"""Implements Adagrad (torch.optim.Adagrad's algorithm, arguments and state dict).

    .. math::
        g_t = \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1},\quad
        s_t = s_{t-1} + g_t^2,\quad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1 + (t-1)\eta}\,\frac{g_t}{\sqrt{s_t} + \epsilon}

    Sparse gradients are supported as in torch (no weight decay; not with clipping or GradScaler).

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        lr_decay (float, optional): learning rate decay :math:`\eta` (default: 0)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        initial_accumulator_value (float, optional): initial value of the sum of squares
            (default: 0)
        eps (float, optional): term added to the denominator (default: 1e-10)
        foreach (bool, optional): accepted for compatibility (default: None)
        maximize (bool, optional): maximize the objective instead of minimizing (default: False)
""" + EXTRAS_DOC
