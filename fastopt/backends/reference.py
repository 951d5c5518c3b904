"""The ``reference`` backend: runs the specification rules of ``fastopt.reference`` over a plan.

It is correct on any device torch supports and always available; it is not fast (torch foreach
ops, several passes over memory). Every compiled backend is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from .._plan import Bucket, Segment, StepStats
from ..rules import Rule


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


class ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        return None

    def fallback_kind(self, bucket: Bucket, seg: Segment) -> str:
        """What runs a fallback step of ``seg``: "kernel" (compiled list ops) or "reference"."""
        return "reference"

    def bind(self, bucket: Bucket, stats: StepStats) -> bool:
        """Take this step's gradients (params without one are left out, as torch does); False
        when one became sparse (the plan is stale and gets rebuilt)."""
        now = [seg.with_grads(self.name) for seg in bucket.segments]
        if any(seg is None for seg in now):
            return False
        bucket.cache["now"] = now
        for seg in now:
            stats.count_fallback(self.fallback_kind(bucket, seg), len(seg.params))
        return True

    def grad_norm(self, bucket: Bucket, norm_type: float, xform: GradTransform) -> Tensor:
        """The norm of the bucket's unscaled, value-clipped gradients."""
        grads = [g for seg in bucket.cache["now"] for g in seg.grads]
        grads = ref.prepare_grads(grads, inv_scale=xform.inv_scale, clip_value=xform.clip_value)
        return ref.grad_norm(grads, norm_type)

    def norm_and_coef(self, bucket: Bucket, norm_type: float, xform: GradTransform,
                      max_norm: float) -> tuple[Tensor, Tensor]:
        """The bucket's gradient norm and the clip coefficient when it is the only bucket (the
        GPU backends compute both in one launch)."""
        norm = self.grad_norm(bucket, norm_type, xform)
        return norm, ref.clip_coefficient(norm, max_norm)

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether this backend updates params stored in ``dtype`` (real view for complex)."""
        return True

    def step(self, rule: Rule, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        for segment, hp in zip(bucket.cache["now"], hparams):
            _step_segment(rule, segment, hp, xform)
        release(bucket)


def release(bucket: Bucket) -> None:
    """Let go of the step's grads once it has run (Note [grads held only for the step],
    csrc/include/fastopt/grad_binding.h): zero_grad(set_to_none=True) then frees them."""
    for segment in bucket.cache.pop("now", None) or ():
        segment.grads = []


@torch.no_grad()
def _step_segment(rule: Rule, seg: Segment, hp: dict, xform: GradTransform) -> None:
    """Run one rule on work copies in the compute dtype, then store them back.

    Note [reference AMP skip]: working on copies makes the found_inf skip a select at store time,
    with no host sync: ``dst = where(found_inf, dst, work)``, and the step count is decremented
    back. Low-precision storage is rounded exactly once, at the store.
    """
    grads = ref.prepare_grads(
        seg.grads, inv_scale=xform.inv_scale, clip_value=xform.clip_value, clip_coef=xform.clip_coef
    )
    if not grads:
        return
    dtype = grads[0].dtype
    work = [t.to(dtype, copy=True) for t in seg.targets]
    states = {k: [t.to(dtype, copy=True) for t in v] for k, v in seg.states.items()}
    torch._foreach_add_(seg.steps, 1)

    rule.run_spec(work, grads, states, seg.steps, hp)

    pairs = list(zip(seg.targets, work))
    for key, tensors in seg.states.items():
        pairs += zip(tensors, states[key])
    if seg.masters is not None:
        pairs += zip(seg.params, work)
    if xform.found_inf is None:
        for dst, src in pairs:
            dst.copy_(src)
    else:
        skip = xform.found_inf != 0
        for dst, src in pairs:
            dst.copy_(torch.where(skip, dst, src.to(dst.dtype)))
        torch._foreach_sub_(seg.steps, skip.to(seg.steps[0].dtype))
