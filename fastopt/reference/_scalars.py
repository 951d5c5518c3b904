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
