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
from .. import reference as ref
from .._plan import Bucket, Segment
from .reference import GradTransform, ReferenceBackend


def _lr(lr: Union[float, Tensor]) -> Tensor:
    # A tensor lr keeps its dtype: the ops reproduce torch's arithmetic in that dtype.
    return lr.detach() if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)


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


class CpuBackend(ReferenceBackend):
    name = "cpu"

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors only, not {device_type}"
        if not _ext.has_cpu_ops():
            return _ext.load_error
        return None

    # -- binding this step's grads ---------------------------------------------------------------

    def _plans(self, bucket: Bucket) -> list:
        """One CpuPlan per segment (None for complex params: their grads need a real view)."""
        plans = bucket.cache.get("plans")
        if plans is None:
            lists, _, name = _RULES[bucket.rule]
            build = getattr(_ext._C, f"cpu_{name}_plan")
            plans = []
            for seg in bucket.segments:
                plan = None
                if not seg.is_complex:
                    # The grads slot holds the params as placeholders (same layout and dtype as
                    # the grads a plan can take); bind_grads() fills it every step.
                    plan = build(*lists(seg, seg.params))
                    plan.set_owners(seg.owners)
                plans.append(plan)
            bucket.cache["plans"] = plans
        return plans

    def bind(self, bucket: Bucket) -> bool:
        bucket.cache["bound"] = [False] * len(bucket.segments)
        if torch.compiler.is_compiling():
            return super().bind(bucket)
        try:
            plans = self._plans(bucket)
        except RuntimeError:  # a layout or dtype a plan refuses: the list ops take it (or say why)
            return super().bind(bucket)
        bound, stale = [], False
        for seg, plan in zip(bucket.segments, plans):
            if plan is not None and plan.bind_grads():
                bound.append(True)
                continue
            stale = stale or plan is not None
            bound.append(False)
            if not seg.refresh_grads():
                return False
        if stale:  # storage changed, or grads the plan cannot take: rebuilt next step
            bucket.cache.pop("plans")
        bucket.cache["bound"] = bound
        return True

    # -- the step --------------------------------------------------------------------------------

    def grad_norm(self, bucket: Bucket, norm_type: float, xform: GradTransform) -> Tensor:
        norms = []
        for i, seg in enumerate(bucket.segments):
            if bucket.cache["bound"][i]:
                norms.append(bucket.cache["plans"][i].grad_norm(norm_type, xform.inv_scale, xform.clip_value))
            else:
                grads = [g.contiguous() for g in seg.grads]
                norms.append(torch.ops.fastopt.multi_tensor_norm(grads, norm_type, xform.inv_scale,
                                                                 xform.clip_value))
        return norms[0] if len(norms) == 1 else ref.norm_of_norms(norms, norm_type)

    def step(self, rule: str, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        lists, hp_args, name = _RULES[rule]
        for i, (seg, hp) in enumerate(zip(bucket.segments, hparams)):
            if bucket.cache["bound"][i]:
                step = getattr(_ext._C, f"cpu_{name}_step")
                step(bucket.cache["plans"][i], *hp_args(hp), *_grad_args(xform))
            else:
                op = getattr(torch.ops.fastopt, f"{name}_")
                op(*lists(seg, seg.grads), *hp_args(hp), *_grad_args(xform))
