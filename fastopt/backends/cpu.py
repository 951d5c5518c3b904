"""The ``cpu`` backend: compiled multi-tensor C++ ops from ``fastopt._C`` for CPU tensors.

One op call updates every tensor of a param group inside a bucket (csrc/cpu/*.cpp): the work is
chunked across threads over the whole group, and gradient preparation (AMP unscale, value clip,
norm-clip coefficient), the found_inf skip and master weights are fused into the same pass. The
gradient norm for clipping is one more pass (``multi_tensor_norm``).

Note [one call per param group]: param groups have their own hyperparameters and flags, and so
their own state lists; the CPU ops take one group at a time. With one param group (the common
case) a step is exactly one norm call and one update call.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _ext
from .._plan import Bucket, Segment
from .reference import GradTransform, ReferenceBackend


def _lr(lr: Union[float, Tensor]) -> Tensor:
    # A tensor lr keeps its dtype: the ops reproduce torch's arithmetic in that dtype.
    return lr.detach() if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)


def _grad_args(x: GradTransform) -> tuple:
    return (x.inv_scale, x.clip_value, x.clip_coef, x.found_inf)


def _params_out(seg: Segment) -> list[Tensor]:
    return seg.params if seg.masters is not None else []


def _adam(seg: Segment, hp: dict, x: GradTransform) -> None:
    st = seg.states
    torch.ops.fastopt.adam_(
        seg.targets, seg.grads, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq", []),
        seg.steps, _params_out(seg), _lr(hp["lr"]), hp["beta1"], hp["beta2"], hp["eps"],
        hp["weight_decay"], hp["amsgrad"], hp["maximize"], hp["decoupled_weight_decay"], *_grad_args(x),
    )


def _adagrad(seg: Segment, hp: dict, x: GradTransform) -> None:
    torch.ops.fastopt.adagrad_(
        seg.targets, seg.grads, seg.states["sum"], seg.steps, _params_out(seg), _lr(hp["lr"]),
        hp["lr_decay"], hp["weight_decay"], hp["eps"], hp["maximize"], *_grad_args(x),
    )


def _rmsprop(seg: Segment, hp: dict, x: GradTransform) -> None:
    st = seg.states
    torch.ops.fastopt.rmsprop_(
        seg.targets, seg.grads, st["square_avg"], st.get("grad_avg", []), st.get("momentum_buffer", []),
        seg.steps, _params_out(seg), _lr(hp["lr"]), hp["alpha"], hp["eps"], hp["weight_decay"],
        hp["momentum"], hp["centered"], hp["maximize"], *_grad_args(x),
    )


_OPS = {"adam": _adam, "adagrad": _adagrad, "rmsprop": _rmsprop}


class CpuBackend(ReferenceBackend):
    name = "cpu"

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors only, not {device_type}"
        if not _ext.has_cpu_ops():
            return _ext.load_error
        return None

    def grad_norm(self, bucket: Bucket, norm_type: float, xform: GradTransform) -> Tensor:
        grads = [g.contiguous() for g in bucket.grads]
        return torch.ops.fastopt.multi_tensor_norm(grads, norm_type, xform.inv_scale, xform.clip_value)

    def step(self, rule: str, bucket: Bucket, hparams: list[dict], xform: GradTransform) -> None:
        op = _OPS[rule]
        for seg, hp in zip(bucket.segments, hparams):
            op(seg, hp, xform)
