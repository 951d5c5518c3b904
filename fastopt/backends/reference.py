"""The ``reference`` backend: runs the specification rules of ``fastopt.reference`` over a plan.

It is correct on any device torch supports and always available; it is not fast (torch foreach
ops, several passes over memory). Every compiled backend is tested against it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ..reference import rounding
from .._plan import Bucket, OwnerRecord, Segment, StepStats, local, plain_tensors
from ..rules import Rule
from .base import GradTransform


class ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        return None

    def fallback_kind(self, bucket: Bucket, seg: Segment) -> str:
        """What runs a fallback step of ``seg``: "kernel" (compiled list ops) or "reference"."""
        return "reference"

    def bind(self, bucket: Bucket, stats: StepStats) -> bool:
        """Take this step's gradients (params without one are left out, as torch does); False
        when one became sparse or a param changed since the build (the plan is stale and gets
        rebuilt): a param's storage, dtype, shape or strides, as the compiled backends' plans
        notice it. Its segment holds what the build saw: the real view of a complex param's old
        storage, the bucket of its old dtype (a float32 param turned bf16 under
        compensation="kahan" would be stepped without its buffer)."""
        if not torch.compiler.is_compiling():  # Dynamo guards on what it traced
            if bucket.run.records is None:
                bucket.run.records = [[_record(p) for p in seg.owners] for seg in bucket.segments]
            elif not all(r is None or r.matches(local(p)) for seg, records in zip(bucket.segments, bucket.run.records)
                         for r, p in zip(records, seg.owners)):
                bucket.run.records = None
                return False
        now = [seg.with_grads(self.name) for seg in bucket.segments]
        if any(seg is None for seg in now):
            return False
        bucket.run.now = now
        for seg in now:
            stats.count_fallback(self.fallback_kind(bucket, seg), len(seg.params))
        return True

    def grad_norm(self, bucket: Bucket, norm_type: float, xform: GradTransform) -> Tensor:
        """The norm of the bucket's unscaled, value-clipped gradients."""
        grads = [g for seg in bucket.run.now for g in seg.grads]
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

    @staticmethod
    def can_plan(seg: Segment, i: int) -> bool:
        """The reference rules keep no plan: they take any param as it is."""
        return False

    def step(self, rule: Rule, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        for segment, hp in zip(bucket.run.now, hparams):
            _step_segment(rule, segment, hp, xform)
        release(bucket)


def _record(p: Tensor) -> Optional[OwnerRecord]:
    """A param as the plan was built (its local shard for a DTensor); None for a tensor subclass
    without memory of its own (the reference rules step it as it is)."""
    t = local(p)
    return OwnerRecord(t) if plain_tensors(t) else None


def release(bucket: Bucket) -> None:
    """Let go of the step's grads once it has run (Note [grads held only for the step],
    csrc/include/fastopt/grad_binding.h): zero_grad(set_to_none=True) then frees them."""
    for segment in bucket.run.now or ():
        segment.grads = []
    bucket.run.now = None


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
    if seg.compensations is not None:  # Note [param store] (update_math.h): the update runs on p + c
        torch._foreach_add_(work, [c.to(dtype) for c in seg.compensations])
    states = {k: [t.to(dtype, copy=True) for t in v] for k, v in seg.states.items()}
    torch._foreach_add_(seg.steps, 1)

    rule.run_spec(work, grads, states, seg.steps, hp)

    pairs = _param_stores(seg, work)
    for key, tensors in seg.states.items():
        values = states[key]
        if seg.stochastic_state:  # Note [stochastic state] (update_math.h): the kernels' bits
            slot, rounded = rule.state_slot(key), []
            for v, seed, step, target in zip(values, seg.seeds, seg.steps, seg.targets):
                stream, half = rounding.slot_bits(seed, slot)
                rounded.append(rounding.stochastic_round_bf16(v, stream, step, index=rounding.memory_index(target),
                                                              half=half))
            values = rounded
        pairs += zip(tensors, values)
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


def _param_stores(seg: Segment, work: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(destination, value) of the updated params (``work``, in the compute dtype) as Note [param
    store] (update_math.h) stores them: rounded to nearest by the copy; "kahan": the param rounded
    to nearest and its compensation the rest, w - p (0 where p is not finite); "stochastic": the
    bits of state slot 3."""
    if seg.compensation == "kahan":
        pairs = []
        for p, c, w in zip(seg.params, seg.compensations, work):
            rounded = w.to(p.dtype)
            back = rounded.to(w.dtype)
            pairs += [(p, rounded), (c, torch.where(back.isfinite(), w - back, torch.zeros_like(w)))]
        return pairs
    if seg.compensation == "stochastic":
        pairs = []
        for p, w, seed, step in zip(seg.params, work, seg.seeds, seg.steps):
            stream, half = rounding.slot_bits(seed, rounding.PARAM_SLOT)
            pairs.append((p, rounding.stochastic_round_bf16(w, stream, step, index=rounding.memory_index(p),
                                                              half=half)))
        return pairs
    return list(zip(seg.targets, work))
