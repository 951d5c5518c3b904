"""The ``cuda`` backend: the compiled CUDA multi-tensor kernels of ``fastopt._C`` (csrc/cuda/).

Per param group a ``CudaPlan`` keeps the tensor metadata in device memory (Note [CUDA tables in
device memory]); each step binds the grads in C++ (re-uploading the grad addresses only when a grad
was reallocated) and runs one persistent-grid launch, plus one for the norm and clip coefficient
when clipping. Every per-step scalar is read on the device (a tensor lr too), so a step is
CUDA-graph safe. Params of any floating dtype; complex params as their real view.

A group whose tensors the plan cannot walk linearly (a param and its state laid out differently),
or whose grads this step are laid out unlike their params, takes the reference path for that step:
correct, slower. Under ``torch.compile`` the steps call the ``torch.ops.fastopt.*`` list ops, which
Dynamo sees as opaque, mutating custom ops (their meta kernels are in csrc/ops.cpp).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _ext
from .. import reference as ref
from .._plan import Bucket
from .cpu import _RULES, _grad_args
from .reference import GradTransform, ReferenceBackend, RULES, _step_segment


def _lr_args(lr: Union[float, Tensor], device: torch.device) -> tuple:
    """(tensor or None, value, fp32): a tensor on the params' device is read by the kernel."""
    if isinstance(lr, Tensor):
        if lr.device == device:
            return lr.detach(), 0.0, lr.dtype == torch.float32
        return None, float(lr), lr.dtype == torch.float32  # a CPU tensor: a host read, no sync
    return None, float(lr), False


def _hp_tail(rule: str, hp: dict) -> tuple:
    if rule == "adam":
        return (hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], hp["amsgrad"], hp["maximize"],
                hp["decoupled_weight_decay"])
    if rule == "adagrad":
        return (hp["lr_decay"], hp["weight_decay"], hp["eps"], hp["maximize"])
    return (hp["alpha"], hp["eps"], hp["weight_decay"], hp["momentum"], hp["centered"], hp["maximize"])


class CudaBackend(ReferenceBackend):
    name = "cuda"

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, not {device_type}"
        if not _ext.has_cuda_ops():
            return _ext.load_error or "fastopt._C was built without CUDA (no CUDA torch or no nvcc at build time)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None

    def _plans(self, bucket: Bucket) -> list:
        plans = bucket.cache.get("plans")
        if plans is None:
            lists, _, name = _RULES[bucket.rule]
            build = getattr(_ext._C, f"cuda_{name}_plan")
            plans = []
            for seg in bucket.segments:
                plan = None
                if not seg.is_complex:
                    try:
                        # the grads slot holds the params as placeholders (their layout and dtype)
                        plan = build(*lists(seg, seg.params), list(seg.owners))
                    except RuntimeError:  # a layout the tables cannot walk: the reference path
                        plan = None
                plans.append(plan)
            bucket.cache["plans"] = plans
        return plans

    def bind(self, bucket: Bucket) -> bool:
        bucket.cache["bound"] = [False] * len(bucket.segments)
        if torch.compiler.is_compiling():
            bucket.cache["compiled"] = True
            return super().bind(bucket)
        bucket.cache["compiled"] = False
        plans = self._plans(bucket)
        bound, stale = [], False
        for seg, plan in zip(bucket.segments, plans):
            if plan is not None and plan.bind_grads():
                bound.append(True)
                continue
            stale = stale or plan is not None
            bound.append(False)
            if not seg.refresh_grads():
                return False
        if stale:  # new param storage, or grads the plan cannot take: rebuilt next step
            bucket.cache.pop("plans")
        bucket.cache["bound"] = bound
        return True

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
        if len(bound) == 1 and bound[0]:  # one launch: the norm and the coefficient
            out = plans[0].grad_norm(norm_type, xform.grad_scale, xform.clip_value, max_norm)
            return out[0], (out[1] if max_norm is not None else None)
        norms = []
        for seg, plan, ok in zip(bucket.segments, plans, bound):
            if ok:
                norms.append(plan.grad_norm(norm_type, xform.grad_scale, xform.clip_value, None)[0])
            elif bucket.cache.get("compiled"):
                grads = [g.contiguous() for g in seg.grads]
                norms.append(torch.ops.fastopt.multi_tensor_norm(grads, norm_type, xform.inv_scale, xform.clip_value))
            else:
                grads = ref.prepare_grads(seg.grads, inv_scale=xform.inv_scale, clip_value=xform.clip_value)
                norms.append(ref.grad_norm(grads, norm_type))
        return (norms[0] if len(norms) == 1 else ref.norm_of_norms(norms, norm_type)), None

    def step(self, rule: str, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        lists, hp_args, name = _RULES[rule]
        plans = bucket.cache.get("plans") or [None] * len(bucket.segments)
        for seg, plan, ok, hp in zip(bucket.segments, plans, bucket.cache["bound"], hparams):
            if ok:
                step = getattr(_ext._C, f"cuda_{name}_step")
                step(plan, *_lr_args(hp["lr"], bucket.device), *_hp_tail(rule, hp), xform.grad_scale,
                     xform.clip_value, xform.clip_coef, xform.found_inf)
            elif bucket.cache.get("compiled") and not seg.is_complex:
                # the list ops take inv_scale (torch.compile traces them as custom ops)
                getattr(torch.ops.fastopt, f"{name}_")(*lists(seg, seg.grads), *hp_args(hp), *_grad_args(xform))
            else:
                _step_segment(RULES[rule], seg, hp, xform)
