"""The ``cpu`` backend: compiled multi-tensor C++ ops from ``fastopt._C`` for CPU tensors.

Note [cpu backend coverage]: so far the gradient-norm pass is compiled
(``torch.ops.fastopt.multi_tensor_norm``: unscale, value clip and norm in one read of the
gradients); the update rules run the reference implementation until the C++ update kernels land.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._plan import Bucket
from .reference import GradTransform, ReferenceBackend


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
