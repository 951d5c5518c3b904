"""The step plan: the optimizer's tensors grouped by (device, dtype), built once and reused.

Note [the plan cache]: building the per-bucket tensor lists (and, in the compiled backends, the
chunk and pointer tables) costs host time proportional to the number of tensors. It is built when
the set of parameters with gradients changes (or after ``add_param_group`` / ``load_state_dict``)
and reused otherwise; each step only refreshes the gradient list, because
``zero_grad(set_to_none=True)`` reallocates gradients.
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

    def refresh_grads(self) -> None:
        self.grads = [real_view(p.grad) for p in self.owners]

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
    segments: list[Segment] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # backend-private data (pointer tables, ...)

    @property
    def grads(self) -> list[Tensor]:
        return [g for s in self.segments for g in s.grads]


@dataclass
class Plan:
    key: tuple
    buckets: list[Bucket]
    sparse: list[tuple[Tensor, dict]]  # (param, group) with a sparse grad (Adagrad only)
