"""The ``cuda`` backend: the compiled CUDA multi-tensor kernels of ``fastopt._C`` (csrc/cuda/).

Per param group a ``CudaPlan`` keeps the tensor metadata in device memory (Note [CUDA tables in
device memory]); each step binds the grads in C++ (re-uploading the grad addresses only when a grad
was reallocated) and runs one persistent-grid launch, plus one for the norm and clip coefficient
when clipping. Every per-step scalar is read on the device (a tensor lr too), so a step is
CUDA-graph safe. Params of any floating dtype; complex params as their real view.

A param whose state the plan cannot walk with it (laid out differently) takes the reference path
(Note [the plan life cycle]); a grad laid out unlike its param is copied into its layout. Under ``torch.compile`` the steps call the ``torch.ops.fastopt.*`` list ops, which
Dynamo sees as opaque, mutating custom ops (their meta kernels are in csrc/ops.cpp).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _ext
from .._plan import Bucket, Segment
from ..rules import Rule
from .cpu import compiled_plan, grad_args, op_args, rounding_args, segment_lists
from .planned import PlannedBackend
from .base import GradTransform


def _lr_args(lr: Union[float, Tensor], device: torch.device) -> tuple:
    """(tensor or None, value, fp32): a tensor on the params' device is read by the kernel."""
    if isinstance(lr, Tensor):
        if lr.device == device:
            return lr.detach(), 0.0, lr.dtype == torch.float32
        return None, float(lr), lr.dtype == torch.float32  # a CPU tensor: a host read, no sync
    return None, float(lr), False


class CudaBackend(PlannedBackend):
    name = "cuda"

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, not {device_type}"
        if not _ext.has_cuda_ops():
            return _ext.load_error or "fastopt._C was built without CUDA (no CUDA torch or no nvcc at build time)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None

    def fallback_kind(self, bucket: Bucket, seg: Segment) -> str:
        return "kernel" if bucket.run.compiling and not seg.is_complex else "reference"

    def _build(self, bucket: Bucket, seg: Segment):
        return compiled_plan(_ext._C.cuda_plan, bucket.rule, seg)

    def _plan_norm(self, plan, norm_type: float, xform: GradTransform, max_norm) -> tuple:
        out = plan.grad_norm(norm_type, xform.grad_scale, xform.clip_value, max_norm)
        return out[0], (out[1] if max_norm is not None else None)

    def _plan_step(self, rule: Rule, plan, bucket: Bucket, hp: dict, xform: GradTransform) -> None:
        _ext._C.cuda_step(plan, *_lr_args(hp["lr"], bucket.device), rule.hyper_args(hp), xform.grad_scale,
                          xform.clip_value, xform.clip_coef, xform.found_inf)

    # Under torch.compile the list ops run the same kernels (Dynamo sees opaque, mutating custom ops).
    def _fallback_norm(self, bucket: Bucket, seg: Segment, norm_type: float, xform: GradTransform) -> Tensor:
        if bucket.run.compiling:
            grads = [g.contiguous() for g in seg.grads]
            return torch.ops.fastopt.multi_tensor_norm(grads, norm_type, xform.inv_scale, xform.clip_value)
        return super()._fallback_norm(bucket, seg, norm_type, xform)

    def _fallback_step(self, rule: Rule, bucket: Bucket, seg: Segment, hp: dict, xform: GradTransform) -> None:
        if bucket.run.compiling and not seg.is_complex:
            rule.list_op()(*segment_lists(rule, seg, seg.grads), *op_args(rule, hp), *grad_args(xform),
                           seeds=seg.seed_tensor, **rounding_args(seg))
        else:
            super()._fallback_step(rule, bucket, seg, hp, xform)
