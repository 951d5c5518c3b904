"""What the compiled backends (cpu, triton, cuda) share: a cached plan per param group, bound to
each step's grads, and the fallback for the params a plan cannot take (Note [the plan life
cycle], fastopt/_plan.py).

A subclass says how to build a plan for a segment (``_build``; every plan has ``bind_grads()``,
which returns None when the plan is stale, else the counts (bound, relaid, absent)), how a plan
computes the norm (``_plan_norm``) and how it steps (``_plan_step``). The params a plan cannot take
(a segment's *rest*) and every segment under ``torch.compile`` take ``_fallback_step``: the
reference rules, or a backend's list ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .. import reference as ref
from .._plan import Bucket, OwnerRecord, Segment, StepStats, dense, local, plain_tensors, shard_spec, walks_with
from ..rules import Rule
from .base import GradTransform
from .reference import ReferenceBackend, _step_segment, release


@dataclass
class SegmentPlan:
    """A segment as a compiled backend runs it: the compiled plan of the params it can take, and
    the rest, which takes the fallback path every step."""

    plan: Any  # None when no param of the segment can be planned
    rest: Optional[Segment]
    rest_records: list  # OwnerRecord of each rest param: a changed one makes the plan stale
    rest_now: Optional[Segment] = None  # this step's rest params that have a grad


class PlannedBackend(ReferenceBackend):
    # -- what a subclass provides ------------------------------------------------------------

    def _build(self, bucket: Bucket, seg: Segment) -> Any:
        raise NotImplementedError

    def _plan_norm(self, plan: Any, norm_type: float, xform: GradTransform,
                   max_norm: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def _plan_step(self, rule: Rule, plan: Any, bucket: Bucket, hp: dict, xform: GradTransform) -> None:
        raise NotImplementedError

    def _fallback_norm(self, bucket: Bucket, seg: Segment, norm_type: float, xform: GradTransform) -> Tensor:
        grads = ref.prepare_grads(seg.grads, inv_scale=xform.inv_scale, clip_value=xform.clip_value)
        return ref.grad_norm(grads, norm_type)

    def _fallback_step(self, rule: Rule, bucket: Bucket, seg: Segment, hp: dict, xform: GradTransform) -> None:
        _step_segment(rule, seg, hp, xform)

    # -- build ---------------------------------------------------------------------------------

    @staticmethod
    def can_plan(seg: Segment, i: int) -> bool:
        """Whether the kernels can walk param ``i`` of ``seg`` linearly with its state: every
        tensor dense, laid out like the param, in the dtype the kernels expect."""
        p = seg.params[i]
        expected = [(t, dtype) for _, t, dtype in seg.expected_state(i)]
        if seg.masters is not None:
            expected.append((seg.masters[i], torch.float32))
        step = seg.steps[i]
        if p.layout != torch.strided or not dense(p) or not plain_tensors(p, step, *(t for t, _ in expected)):
            return False
        return (all(walks_with(t, p) and t.dtype == dtype and t.device == p.device for t, dtype in expected)
                and step.numel() == 1 and step.dtype == torch.float32 and step.device == p.device)

    def _plan_segment(self, bucket: Bucket, seg: Segment) -> SegmentPlan:
        ok = [i for i in range(len(seg.params)) if self.can_plan(seg, i)]
        planned = set(ok)
        others = [i for i in range(len(seg.params)) if i not in planned]
        plan = None
        if ok:
            try:
                plan = self._build(bucket, seg if not others else seg.subset(ok))
            except (RuntimeError, ValueError, TypeError):  # refused by the plan: the fallback takes all
                others = list(range(len(seg.params)))
        if others and seg.sharded:  # the optimizer sent only shards that can_plan takes
            raise RuntimeError(f"fastopt ({self.name}): the kernels refused the DTensor shards of params {others}")
        rest = None if not others else (seg if len(others) == len(seg.params) else seg.subset(others))
        return SegmentPlan(plan, rest, [OwnerRecord(p) for p in rest.owners] if rest is not None else [])

    def _plans(self, bucket: Bucket) -> list[SegmentPlan]:
        if bucket.run.plans is None:
            bucket.run.plans = [self._plan_segment(bucket, seg) for seg in bucket.segments]
        return bucket.run.plans

    # -- bind ----------------------------------------------------------------------------------

    def bind(self, bucket: Bucket, stats: StepStats) -> bool:
        bucket.run.compiling = torch.compiler.is_compiling()
        if bucket.run.compiling:  # Dynamo cannot trace the host side of a plan
            return super().bind(bucket, stats)
        for sp, seg in zip(self._plans(bucket), bucket.segments):
            if sp.plan is not None:
                counts = sp.plan.bind_grads(*self._shards_now(bucket, seg)) if seg.sharded else sp.plan.bind_grads()
                if counts is None:
                    return self._stale(bucket)
                stats.count_kernel(*counts)
            if sp.rest is not None:
                sp.rest_now = sp.rest.with_grads(self.name)
                if sp.rest_now is None or not all(r.matches(p) for r, p in zip(sp.rest_records, sp.rest.owners)):
                    return self._stale(bucket)
                stats.count_fallback(self.fallback_kind(bucket, sp.rest_now), len(sp.rest_now.params))
        return True

    @staticmethod
    def _shards_now(bucket: Bucket, seg: Segment) -> tuple[list, list]:
        """This step's local shards of a sharded segment's params and grads (Note [DTensor
        shards]); a grad laid out unlike its param is given as a DTensor, which the plan refuses
        (stale: the optimizer re-plans and sends that param to the reference rules)."""
        owners, grads = [], []
        for p in seg.owners:
            g = p.grad
            owners.append(local(p))
            grads.append(None if g is None else (local(g) if shard_spec(g) == bucket.spec else g))
        return owners, grads

    @staticmethod
    def _stale(bucket: Bucket) -> bool:
        bucket.run.plans = None
        return False

    # -- the step --------------------------------------------------------------------------------

    def _parts(self, bucket: Bucket) -> tuple[list, list[Segment]]:
        """This step's bound plans and the segments that take the fallback path."""
        if bucket.run.compiling:
            return [], bucket.run.now
        plans = bucket.run.plans
        return ([sp.plan for sp in plans if sp.plan is not None],
                [sp.rest_now for sp in plans if sp.rest_now is not None and sp.rest_now.params])

    def _norm(self, bucket: Bucket, norm_type: float, xform: GradTransform,
              max_norm: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
        plans, rest = self._parts(bucket)
        if len(plans) == 1 and not rest:  # the common case: the plan may compute the coefficient too
            return self._plan_norm(plans[0], norm_type, xform, max_norm)
        norms = ([self._plan_norm(plan, norm_type, xform, None)[0] for plan in plans]
                 + [self._fallback_norm(bucket, seg, norm_type, xform) for seg in rest])
        if not norms:
            return torch.zeros((), device=bucket.device), None
        return (norms[0] if len(norms) == 1 else ref.norm_of_norms(norms, norm_type)), None

    def grad_norm(self, bucket: Bucket, norm_type: float, xform: GradTransform) -> Tensor:
        return self._norm(bucket, norm_type, xform, None)[0]

    def norm_and_coef(self, bucket: Bucket, norm_type: float, xform: GradTransform,
                      max_norm: float) -> tuple[Tensor, Tensor]:
        norm, coef = self._norm(bucket, norm_type, xform, max_norm)
        return norm, (coef if coef is not None else ref.clip_coefficient(norm, max_norm))

    def step(self, rule: Rule, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        if bucket.run.compiling:
            for seg, hp in zip(bucket.run.now, hparams):
                self._fallback_step(rule, bucket, seg, hp, xform)
            release(bucket)
            return
        for sp, hp in zip(bucket.run.plans, hparams):
            if sp.plan is not None:
                self._plan_step(rule, sp.plan, bucket, hp, xform)
                sp.plan.release_grads()  # Note [grads held only for the step] (grad_binding.h)
            if sp.rest_now is not None:
                if sp.rest_now.params:
                    self._fallback_step(rule, bucket, sp.rest_now, hp, xform)
                sp.rest_now.grads = []
                sp.rest_now = None
