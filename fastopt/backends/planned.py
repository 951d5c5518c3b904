"""What the compiled backends (cpu, triton, cuda) share: a cached plan per param group, bound to
each step's grads, and the fallbacks when a plan cannot take them (Note [the plan cache]).

A subclass says how to build a plan for a segment (``_build``, None when the segment's tensors
cannot be planned; every plan has ``bind_grads()``), how a plan computes the norm
(``_plan_norm``) and how it steps (``_plan_step``). A segment that is not bound this step takes
``_fallback_step``: the reference rules, or a backend's list ops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import reference as ref
from .._plan import Bucket, Segment
from .reference import GradTransform, ReferenceBackend, RULES, _step_segment


class PlannedBackend(ReferenceBackend):
    # -- what a subclass provides ------------------------------------------------------------

    def _build(self, bucket: Bucket, seg: Segment) -> Optional[Any]:
        raise NotImplementedError

    def _bind(self, plan: Any, seg: Segment) -> bool:
        """Bind this step's grads (read from the plan's owners); False when the plan cannot take
        them (a missing grad, another layout, a param with new storage)."""
        return plan.bind_grads()

    def _plan_norm(self, plan: Any, norm_type: float, xform: GradTransform,
                   max_norm: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def _plan_step(self, rule: str, plan: Any, bucket: Bucket, hp: dict, xform: GradTransform) -> None:
        raise NotImplementedError

    def _fallback_norm(self, bucket: Bucket, seg: Segment, norm_type: float, xform: GradTransform) -> Tensor:
        grads = ref.prepare_grads(seg.grads, inv_scale=xform.inv_scale, clip_value=xform.clip_value)
        return ref.grad_norm(grads, norm_type)

    def _fallback_step(self, rule: str, bucket: Bucket, seg: Segment, hp: dict, xform: GradTransform) -> None:
        _step_segment(RULES[rule], seg, hp, xform)

    # -- binding this step's grads ---------------------------------------------------------------

    def _plans(self, bucket: Bucket) -> list:
        plans = bucket.cache.get("plans")
        if plans is None:
            plans = bucket.cache["plans"] = [self._build(bucket, seg) for seg in bucket.segments]
        return plans

    def bind(self, bucket: Bucket) -> bool:
        bucket.cache["bound"] = [False] * len(bucket.segments)
        bucket.cache["compiling"] = torch.compiler.is_compiling()
        if bucket.cache["compiling"]:  # Dynamo cannot trace the host side of a plan
            return super().bind(bucket)
        bound, stale = [], False
        for seg, plan in zip(bucket.segments, self._plans(bucket)):
            ok = plan is not None and self._bind(plan, seg)
            bound.append(ok)
            if not ok:
                stale = stale or plan is not None
                if not seg.refresh_grads():
                    return False  # a planned param lost its grad: the optimizer rebuilds its plan
        if stale:  # new param storage, or grads a plan cannot take: plans are rebuilt next step
            bucket.cache.pop("plans")
        bucket.cache["bound"] = bound
        return True

    # -- the step --------------------------------------------------------------------------------

    def grad_norm(self, bucket: Bucket, norm_type: float, xform: GradTransform) -> Tensor:
        return self._norm(bucket, norm_type, xform, None)[0]

    def norm_and_coef(self, bucket: Bucket, norm_type: float, xform: GradTransform,
                      max_norm: float) -> tuple[Tensor, Tensor]:
        norm, coef = self._norm(bucket, norm_type, xform, max_norm)
        return norm, (coef if coef is not None else ref.clip_coefficient(norm, max_norm))

    def _norm(self, bucket: Bucket, norm_type: float, xform: GradTransform,
              max_norm: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
        bound = bucket.cache["bound"]
        plans = bucket.cache.get("plans") or [None] * len(bound)
        if len(bound) == 1 and bound[0]:  # the common case: the plan may compute the coefficient too
            return self._plan_norm(plans[0], norm_type, xform, max_norm)
        norms = [
            self._plan_norm(plan, norm_type, xform, None)[0] if ok
            else self._fallback_norm(bucket, seg, norm_type, xform)
            for seg, plan, ok in zip(bucket.segments, plans, bound)
        ]
        return (norms[0] if len(norms) == 1 else ref.norm_of_norms(norms, norm_type)), None

    def step(self, rule: str, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        plans = bucket.cache.get("plans") or [None] * len(bucket.segments)
        for seg, plan, ok, hp in zip(bucket.segments, plans, bucket.cache["bound"], hparams):
            if ok:
                self._plan_step(rule, plan, bucket, hp, xform)
            else:
                self._fallback_step(rule, bucket, seg, hp, xform)
