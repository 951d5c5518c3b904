"""The step plan: the optimizer's tensors grouped by (device, dtype), built once and reused.

Note [the plan cache]: building the per-bucket tensor lists (and, in the compiled backends, the
chunk and pointer tables) costs host time proportional to the number of tensors. It is built when
the set of parameters with gradients changes (or after ``add_param_group`` / ``load_state_dict``)
and reused otherwise; each step only binds the gradients (``backend.bind``), because
``zero_grad(set_to_none=True)`` reallocates them. Checking that the plan still holds is O(1) in
the common case: a planned param that lost its grad fails the bind, a param left out of the plan
for want of a grad is in ``Plan.absent``, and the state keys of every group are compared.
A param given new storage (``p.data = ...``) is noticed by the compiled backends, which compare
data pointers. Not noticed: a state tensor *replaced* in ``optimizer.state[p]`` by hand (changing
it in place is fine); call ``optimizer.load_state_dict`` instead, which rebuilds the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor


def real_view(t: Tensor) -> Tensor:
    """Complex tensors are updated as their real view (torch.optim does the same)."""
    return torch.view_as_real(t) if t.is_complex() else t


@dataclass
class Segment:
    """The tensors of one param group inside a bucket, in parameter order."""

    group: dict
    owners: list[Tensor] = field(default_factory=list)  # the parameters as the user holds them
    params: list[Tensor] = field(default_factory=list)  # what the update reads and writes
    masters: Optional[list[Tensor]] = None  # fp32 master copies (master weights on)
    states: dict[str, list[Tensor]] = field(default_factory=dict)  # per state key, aligned with params
    steps: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)  # refreshed every step
    is_complex: bool = False

    def refresh_grads(self) -> bool:
        """Collect this step's grads; False when one is missing or sparse (the plan is stale)."""
        grads = [p.grad for p in self.owners]
        for g in grads:
            if g is None or g.is_sparse:
                return False
        self.grads = [real_view(g) for g in grads] if self.is_complex else grads
        return True

    @property
    def targets(self) -> list[Tensor]:
        """The tensors the update math runs on: the fp32 masters when there are, else the params."""
        return self.masters if self.masters is not None else self.params


@dataclass
class Bucket:
    """Every tensor of one (device, storage dtype) across all param groups: one launch's worth."""

    device: torch.device
    dtype: torch.dtype
    backend: Any
    rule: str  # the update rule ("adam", "adagrad", "rmsprop")
    segments: list[Segment] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # backend-private data (pointer tables, ...)

    @property
    def grads(self) -> list[Tensor]:
        return [g for s in self.segments for g in s.grads]


@dataclass
class Plan:
    buckets: list[Bucket]
    sparse: list[tuple[Tensor, dict]]  # (param, group) with a sparse grad (Adagrad only)
    absent: list[Tensor]  # params that had no grad when the plan was built
    state_keys: tuple  # the state keys of every param group (they follow the group's flags)

    def still_holds(self, state_keys: tuple) -> bool:
        """The cheap part of the staleness check (the grads of planned params are checked by the
        backends' bind)."""
        return (
            state_keys == self.state_keys
            and all(p.grad is None for p in self.absent)
            and all(p.grad is not None and p.grad.is_sparse for p, _ in self.sparse)
        )
