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

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _ext
from .._plan import Bucket, Segment, local
from .planned import PlannedBackend
from .reference import GradTransform


def _lr(lr: Union[float, Tensor]) -> Tensor:
    # A tensor lr keeps its dtype: the ops reproduce torch's arithmetic in that dtype. A float is
    # filled in as it is (Note [no recompiles for new hyperparameter values], reference/_scalars.py).
    return lr.detach() if isinstance(lr, Tensor) else torch.ones((), dtype=torch.float64) * lr


def _grad_args(x: GradTransform) -> tuple:
    return (x.inv_scale, x.clip_value, x.clip_coef, x.found_inf)


def _params_out(seg: Segment) -> list[Tensor]:
    return seg.params if seg.masters is not None else []


def _adam_hp(hp: dict) -> tuple:
    return (_lr(hp["lr"]), hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], hp["amsgrad"],
            hp["maximize"], hp["decoupled_weight_decay"])


def _adagrad_hp(hp: dict) -> tuple:
    return (_lr(hp["lr"]), hp["lr_decay"], hp["weight_decay"], hp["eps"], hp["maximize"])


def _rmsprop_hp(hp: dict) -> tuple:
    return (_lr(hp["lr"]), hp["alpha"], hp["eps"], hp["weight_decay"], hp["momentum"], hp["centered"],
            hp["maximize"])


def _adam_lists(seg: Segment, grads: list[Tensor]) -> tuple:
    st = seg.states
    return (seg.targets, grads, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq", []), seg.steps,
            _params_out(seg))


def _adagrad_lists(seg: Segment, grads: list[Tensor]) -> tuple:
    return (seg.targets, grads, seg.states["sum"], seg.steps, _params_out(seg))


def _rmsprop_lists(seg: Segment, grads: list[Tensor]) -> tuple:
    st = seg.states
    return (seg.targets, grads, st["square_avg"], st.get("grad_avg", []), st.get("momentum_buffer", []),
            seg.steps, _params_out(seg))


# rule -> (the slot lists of a segment, the hyperparameters in op order, op name)
_RULES = {
    "adam": (_adam_lists, _adam_hp, "adam"),
    "adagrad": (_adagrad_lists, _adagrad_hp, "adagrad"),
    "rmsprop": (_rmsprop_lists, _rmsprop_hp, "rmsprop"),
}


def compiled_plan(prefix: str, bucket: Bucket, seg: Segment):
    """A plan of ``fastopt._C`` (``prefix`` "cpu" or "cuda") for the segment (params that
    PlannedBackend.can_plan accepted). The grads slot holds the params as placeholders (the
    layout and dtype of the grads a plan takes); bind_grads() fills it every step from the owners'
    grads (a real view for complex params)."""
    lists, _, name = _RULES[bucket.rule]
    owners = [local(p) for p in seg.owners] if seg.sharded else list(seg.owners)  # Note [DTensor shards]
    return getattr(_ext._C, f"{prefix}_{name}_plan")(*lists(seg, seg.params), owners)


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
        return compiled_plan("cpu", bucket, seg)

    def _plan_norm(self, plan, norm_type: float, xform: GradTransform, max_norm) -> tuple:
        return plan.grad_norm(norm_type, xform.inv_scale, xform.clip_value), None

    def _plan_step(self, rule: str, plan, bucket: Bucket, hp: dict, xform: GradTransform) -> None:
        _, hp_args, name = _RULES[rule]
        getattr(_ext._C, f"cpu_{name}_step")(plan, *hp_args(hp), *_grad_args(xform))

    def _fallback_norm(self, bucket: Bucket, seg: Segment, norm_type: float, xform: GradTransform) -> Tensor:
        grads = [g.contiguous() for g in seg.grads]
        return torch.ops.fastopt.multi_tensor_norm(grads, norm_type, xform.inv_scale, xform.clip_value)

    def _fallback_step(self, rule: str, bucket: Bucket, seg: Segment, hp: dict, xform: GradTransform) -> None:
        lists, hp_args, name = _RULES[rule]
        getattr(torch.ops.fastopt, f"{name}_")(*lists(seg, seg.grads), *hp_args(hp), *_grad_args(xform))
