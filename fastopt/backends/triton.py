"""The ``triton`` backend: one-launch multi-tensor Triton kernels (``fastopt.triton_kernels``).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before fastopt was
imported (Triton's interpreter: how the kernels are tested without a GPU). Params stored in
float64 (computed in float64), float32, float16 or bfloat16 (computed in float32).

Per param group, a ``MultiTensorPlan`` (Note [multi-tensor tables]) is built once and cached in
the bucket; each step binds the grads (re-uploading the grad pointer table only when a grad was
reallocated), then launches the norm kernel when clipping (it also writes the clip coefficient)
and one update kernel. A param whose state a plan cannot walk with it (laid out differently)
takes the reference path (Note [the plan life cycle]); a grad laid out unlike its param is copied
into its layout for the step.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from .._plan import Bucket, Segment, local
from ..rules import Rule
from .planned import PlannedBackend
from .base import GradTransform

_kernels = None
_import_error: Optional[str] = None


def kernels():
    """``fastopt.triton_kernels``, imported on first use (importing Triton takes a while)."""
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            _kernels = importlib.import_module("fastopt.triton_kernels")
        except ImportError as exc:
            _import_error = f"Triton is not importable ({exc})"
    return _kernels


def _slots(rule: Rule, seg: Segment) -> dict[str, list[Tensor]]:
    # the grads slot holds the params as placeholders (their layout and dtype); bind_grads() fills
    # it. params_out: the user's params of float32 masters, or the compensation buffers of
    # compensation="kahan" (Note [param store], csrc/include/fastopt/update_math.h)
    out = seg.params if seg.masters is not None else (seg.compensations or [])
    return {"params": seg.targets, "grads": seg.params, **rule.slots(seg.states), "params_out": out}


class TritonBackend(PlannedBackend):
    name = "triton"
    DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA GPU is available"
        elif device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "Triton runs on CUDA tensors (on CPU tensors only under TRITON_INTERPRET=1)"
        else:
            return f"Triton does not run on {device_type} tensors"
        if kernels() is None:
            return _import_error
        return None

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.DTYPES

    def _build(self, bucket: Bucket, seg: Segment):
        owners = [local(p) for p in seg.owners] if seg.sharded else seg.owners  # Note [DTensor shards]
        return kernels().MultiTensorPlan(_slots(bucket.rule, seg), seg.steps, owners, master=seg.masters is not None,
                                         stochastic_state=seg.stochastic_state, compensation=seg.compensation,
                                         seeds=seg.seeds)

    def _plan_norm(self, plan, norm_type: float, xform: GradTransform, max_norm) -> tuple:
        return kernels().grad_norm(plan, norm_type, grad_scale=xform.grad_scale, clip_value=xform.clip_value,
                                   max_norm=max_norm)

    def _plan_step(self, rule: Rule, plan, bucket: Bucket, hp: dict, xform: GradTransform) -> None:
        kernels().STEPS[rule.name](plan, **rule.hyper_kwargs(hp), grad_scale=xform.grad_scale,
                                   clip_value=xform.clip_value, clip_coef=xform.clip_coef, found_inf=xform.found_inf)
