"""Per-step scalars of the reference rules, computed on the device without a host sync.

Note [scalars in float64]: torch.optim (foreach=False) computes its bias corrections and step sizes
as Python floats (float64) and rounds them once to the tensor dtype inside the elementwise op. The
reference does the same arithmetic on 0-dim float64 device tensors, so it never calls ``.item()``
and still rounds exactly once.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


def as_scalar(value: Scalar, device: torch.device) -> Tensor:
    """A 0-dim tensor on ``device`` holding ``value``: float64 for a Python float; a tensor keeps
    its own dtype, because torch.optim computes ``lr / bias_correction`` in the lr tensor's dtype."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=device, non_blocking=True)
    # No host-to-device copy, no sync. Note [no recompiles for new hyperparameter values]: a
    # multiplication, not torch.tensor(value) or torch.full (whose fill value Dynamo specializes),
    # so that under torch.compile a float that changes between steps (an lr driven by a
    # scheduler) becomes a graph input after one recompile, as in torch.optim, instead of a
    # constant that Dynamo guards on at every new value.
    return torch.ones((), dtype=torch.float64, device=device) * value


def stacked_steps(steps: list[Tensor]) -> Tensor:
    """The per-tensor step counts as one float64 vector (one element per tensor)."""
    return torch.stack([s.reshape(()) for s in steps]).to(torch.float64)


def per_tensor(values: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """Split a float64 vector into 0-dim tensors of ``dtype`` (one rounding, see Note [scalars in float64])."""
    return list(values.to(dtype).unbind(0))


# Note [torch's rounding, device scalars]: torch.optim's for-loop passes its step sizes to
# `addcdiv_(value=)` and `add_(alpha=)` as Python numbers; the spec keeps them as device tensors (no
# host sync, no recompile per value), which those arguments cannot be. These two compose the same
# value from ops that take tensors and round exactly as the one op does on the CPU (the C++ kernels
# follow the same rule: Note [torch's fused multiply-adds], csrc/include/fastopt/update_math.h).


def update_grads(params: list[Tensor], grads: list[Tensor], maximize: bool, weight_decay: float) -> list[Tensor]:
    """The grads a rule's update uses, as torch.optim's for-loop makes them first: negated for
    ``maximize``, then ``grad.add(param, alpha=weight_decay)`` (L2 decay; 0: none). New tensors,
    the given grads are not written."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return grads


def addcdiv_(params: list[Tensor], t1: list[Tensor], t2: list[Tensor], values: list[Tensor]) -> None:
    """``params[i].addcdiv_(t1[i], t2[i], value=values[i])``: ATen's CPU kernel rounds
    ``value * t1``, divides that by ``t2``, then adds: three ops, each rounded."""
    update = torch._foreach_mul(t1, values)
    torch._foreach_div_(update, t2)
    torch._foreach_add_(params, update)


def add_scaled_(params: list[Tensor], others: list[Tensor], alphas: list[Tensor]) -> None:
    """``params[i].add_(others[i], alpha=alphas[i])``: ``addcmul`` with value 1 rounds as ``add``
    with ``alpha`` does, once where ATen fuses the product into the sum and twice where it does
    not."""
    torch._foreach_addcmul_(params, others, alphas)
