"""The ``cpu`` backend: compiled multi-tensor C++ ops from ``fastopt._C`` for CPU tensors.

One call updates every tensor of a param group inside a bucket (csrc/cpu/*.cpp): the work is
chunked across threads over the whole group, and gradient preparation (AMP unscale, value clip,
norm-clip coefficient), the found_inf skip and master weights are fused into the same pass. The
gradient norm for clipping is one more pass.

Two entry points run the same kernels:

* eager steps use a cached ``CpuPlan`` per param group (pointers, chunk table; Note [the plan
  cache]) whose grads are bound in C++ each step (Note [binding grads in C++]);
* under ``torch.compile``, and whenever a plan cannot take this step's grads (a layout it cannot
  walk linearly, say), the ``torch.ops.fastopt.*`` list ops, which accept any layout.

Note [one call per param group]: param groups have their own hyperparameters and flags, and so
their own state lists; the CPU ops take one group at a time. With one param group (the common
case) a step is exactly one norm call and one update call.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .. import _ext
from .._plan import Bucket, Segment, local
from ..rules import Rule
from .planned import PlannedBackend
from .base import GradTransform


def _lr(lr: Union[float, Tensor]) -> Tensor:
    # A tensor lr keeps its dtype: the ops reproduce torch's arithmetic in that dtype. A float is
    # filled in as it is (Note [no recompiles for new hyperparameter values], reference/_scalars.py).
    return lr.detach() if isinstance(lr, Tensor) else torch.ones((), dtype=torch.float64) * lr


def grad_args(x: GradTransform) -> tuple:
    return (x.inv_scale, x.clip_value, x.clip_coef, x.found_inf)


def _params_out(seg: Segment) -> list[Tensor]:
    """The op's params_out: the rounded params of the masters, or the compensation buffers of
    compensation="kahan" (Note [param store])."""
    if seg.masters is not None:
        return seg.params
    return seg.compensations if seg.compensations is not None else []


def rounding_args(seg: Segment) -> dict:
    """How the op or plan stores the segment (Note [stochastic state], Note [param store])."""
    return dict(stochastic_state=seg.stochastic_state, compensation=seg.compensation)


def segment_lists(rule: Rule, seg: Segment, grads: list[Tensor]) -> tuple:
    """A segment's tensor lists in the order of the rule's op (csrc/include/fastopt/update_op.h)."""
    return (seg.targets, grads, *rule.state_lists(seg.states), seg.steps, _params_out(seg))


def op_args(rule: Rule, hp: dict) -> tuple:
    """lr and the rule's hyperparameters as the C++ ops and CPU plans take them."""
    return (_lr(hp["lr"]), *rule.hyper_args(hp))


def compiled_plan(build: Callable, rule: Rule, seg: Segment):
    """A plan of ``fastopt._C`` (``build``: ``cpu_plan`` or ``cuda_plan``) of the rule for the
    segment (params that PlannedBackend.can_plan accepted). The grads slot holds the params as
    placeholders (the layout and dtype of the grads a plan takes); bind_grads() fills it every step
    from the owners' grads (a real view for complex params)."""
    owners = [local(p) for p in seg.owners] if seg.sharded else list(seg.owners)  # Note [DTensor shards]
    lists = [seg.targets, seg.params, *rule.state_lists(seg.states), _params_out(seg)]
    return build(rule.name, lists, seg.steps, owners, seg.seeds or [], **rounding_args(seg))


class CpuBackend(PlannedBackend):
    name = "cpu"

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors only, not {device_type}"
        if not _ext.has_cpu_ops():
            return _ext.load_error
        return None

    def fallback_kind(self, bucket: Bucket, seg: Segment) -> str:
        return "kernel"  # the list ops run the same C++ kernels, on contiguous copies if need be

    def _build(self, bucket: Bucket, seg: Segment):
        return compiled_plan(_ext._C.cpu_plan, bucket.rule, seg)

    def _plan_norm(self, plan, norm_type: float, xform: GradTransform, max_norm) -> tuple:
        return plan.grad_norm(norm_type, xform.inv_scale, xform.clip_value), None

    def _plan_step(self, rule: Rule, plan, bucket: Bucket, hp: dict, xform: GradTransform) -> None:
        _ext._C.cpu_step(plan, _lr(hp["lr"]), rule.hyper_args(hp), *grad_args(xform))

    def _fallback_norm(self, bucket: Bucket, seg: Segment, norm_type: float, xform: GradTransform) -> Tensor:
        grads = [g.contiguous() for g in seg.grads]
        return torch.ops.fastopt.multi_tensor_norm(grads, norm_type, xform.inv_scale, xform.clip_value)

    def _fallback_step(self, rule: Rule, bucket: Bucket, seg: Segment, hp: dict, xform: GradTransform) -> None:
        rule.list_op()(*segment_lists(rule, seg, seg.grads), *op_args(rule, hp), *grad_args(xform),
                       seeds=seg.seed_tensor, **rounding_args(seg))
