"""What every backend is (Note [backends are executors]): the protocol the functional step
(fastopt/functional.py) drives, and the gradient transform it hands them.

Note [backends are executors]: a backend knows how to run a rule over a bucket's tensors, not what
any rule is: the rule comes as its declaration (fastopt/rules.py), whose name and hyperparameters
a compiled backend passes on to its plan or op as they are. Per step the functional step calls
``bind`` on every bucket, then ``grad_norm`` (or, with one bucket, ``norm_and_coef``) when clipping,
then ``step``, which also lets go of the step's grads (Note [grads held only for the step]). What a
backend keeps between these calls, and between steps, lives in the bucket's typed ``run``
(fastopt/_plan.py, BucketRun).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._plan import Bucket, Segment, StepStats


@dataclass
class GradTransform:
    """What is done to the gradients before the update, as 0-dim tensors on the bucket's device."""

    grad_scale: Optional[Tensor] = None  # AMP: the grads are scaled by this
    clip_value: Optional[float] = None
    clip_coef: Optional[Tensor] = None  # global-norm clipping: min(max_norm / (norm + 1e-6), 1)
    found_inf: Optional[Tensor] = None  # AMP: non-zero skips the step entirely

    _inv_scale: Optional[Tensor] = field(default=None, repr=False)

    @property
    def inv_scale(self) -> Optional[Tensor]:
        """1 / grad_scale as GradScaler.unscale_ computes it (float64, rounded once to float32).
        Computed on first use: the GPU kernels read grad_scale itself and need no extra launches.
        (Not functools.cached_property: on Python 3.11 it takes an RLock, a graph break under
        torch.compile.)"""
        if self.grad_scale is not None and self._inv_scale is None:
            self._inv_scale = self.grad_scale.double().reciprocal().float()
        return self._inv_scale



@runtime_checkable
class Backend(Protocol):
    name: str

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        """None when this backend runs on tensors of ``device_type``, else why not."""

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether it updates params stored in ``dtype`` (real view for complex)."""

    def can_plan(self, seg: Segment, i: int) -> bool:
        """Whether its kernels can walk param ``i`` of ``seg`` with its state (False: no plans)."""

    def fallback_kind(self, bucket: Bucket, seg: Segment) -> str:
        """What runs a fallback step of ``seg``: "kernel" (compiled list ops) or "reference"."""

    def bind(self, bucket: Bucket, stats: StepStats) -> bool:
        """Take this step's grads (counted in ``stats``); False when the plan is stale."""

    def grad_norm(self, bucket: Bucket, norm_type: float, xform: GradTransform) -> Tensor:
        """The norm of the bucket's unscaled, value-clipped grads."""

    def norm_and_coef(self, bucket: Bucket, norm_type: float, xform: GradTransform,
                      max_norm: float) -> tuple[Tensor, Tensor]:
        """The norm and the clip coefficient, for a plan with this one bucket (a GPU backend
        computes both in one launch)."""

    def step(self, rule, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        """One update of every segment (``hparams`` per segment), then let go of the grads."""
