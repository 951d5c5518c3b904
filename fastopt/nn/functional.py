"""``batch_norm_relu``: BatchNorm followed by ReLU in one autograd node, and its implementations.

Forward saves only x and the per-channel mean and inverse std (plus weight and bias); backward
recomputes the ReLU mask from them (``fastopt/reference/batch_norm_relu.py`` is the specification).

Implementations, side by side: ``reference`` (pure PyTorch), ``cpu`` (C++, csrc/cpu), ``triton``
(triton_kernels/batch_norm_relu.py) and ``cuda`` (csrc/cuda). Each takes x either contiguous
(N, C, *spatial) or channels_last (the channels innermost) and returns y in the same layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .. import backends as _backends
from ..reference import batch_norm_relu as _ref
from ..reference import compute_dtype

_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


class _Reference:
    name = "reference"
    dtypes = _LOW_PRECISION + (torch.float64,)
    forward = staticmethod(_ref.batch_norm_relu_forward)

    @staticmethod
    def backward(dy, x, weight, bias, mean, invstd, training, need_dx):
        return _ref.batch_norm_relu_backward(dy, x, weight, bias, mean, invstd, training)


class _Compiled:
    """The ``torch.ops.fastopt.bn_relu_*`` ops of the compiled extension (CPU or CUDA kernels)."""

    dtypes = _LOW_PRECISION + (torch.float64,)

    def __init__(self, name: str):
        self.name = name

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
        return torch.ops.fastopt.bn_relu_forward(x, weight, bias, running_mean, running_var, training,
                                                 momentum, eps)

    @staticmethod
    def backward(dy, x, weight, bias, mean, invstd, training, need_dx):
        return torch.ops.fastopt.bn_relu_backward(dy, x, weight, bias, mean, invstd, training, need_dx)


class _Triton:
    name = "triton"
    dtypes = _LOW_PRECISION + (torch.float64,)

    @staticmethod
    def forward(*args):
        return _backends.triton.kernels().bn_relu_forward(*args)

    @staticmethod
    def backward(*args):
        return _backends.triton.kernels().bn_relu_backward(*args)


_IMPLS = {"reference": _Reference(), "cpu": _Compiled("cpu"), "triton": _Triton(), "cuda": _Compiled("cuda")}
# Note [no triton under auto]: on the first GPU run the Triton kernels were 0.16-0.86x eager (host
# bound: statistics and coefficients were torch ops); they now finalize in the kernel, but until a
# benchmark shows them at least at eager's speed, ``auto`` does not pick them: backend="triton" does.
_AUTO = {"cuda": ("cuda", "reference"), "cpu": ("cpu", "reference")}


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """The implementation for ``backend`` on ``device`` and inputs of ``dtype`` (``"auto"``: the
    fastest one available that supports it)."""
    compiling = torch.compiler.is_compiling()
    key = (backend, device.type, dtype, compiling)
    impl = _RESOLVED.get(key)
    if impl is None:  # availability does not change within a process: resolved once per key
        impl = _RESOLVED[key] = _resolve(backend, device, dtype, compiling)
    return impl


_RESOLVED: dict = {}


def _resolve(backend: str, device: torch.device, dtype: torch.dtype, compiling: bool):
    if backend == "auto":
        for name in _AUTO.get(device.type, ("reference",)):
            if compiling and name == "triton":
                continue  # Note [BatchNormReLU under torch.compile]
            if dtype in _IMPLS[name].dtypes and _backends.why_unavailable(name, device) is None:
                return _IMPLS[name]
    reason = _backends.why_unavailable(backend, device)
    if reason is None and dtype not in _IMPLS[backend].dtypes:
        reason = f"it does not support {dtype} inputs (backend='reference' does)"
    if reason is not None:
        raise _backends.BackendUnavailable(f"batch_norm_relu: backend={backend!r} cannot run on "
                                           f"{device.type} tensors: {reason}")
    return _IMPLS[backend]


# Note [BatchNormReLU under torch.compile]: Dynamo traces the autograd.Function below; the compiled
# ops have meta kernels (csrc/ops.cpp) so they trace as opaque ops, while the Triton launcher (host
# code building pointer arguments) does not trace, so ``auto`` skips it when compiling.


class BatchNormReLUFunction(torch.autograd.Function):
    """``relu(batch_norm(x))`` as one node; the running statistics are updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, impl):
        y, mean, invstd = impl.forward(x, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.impl, ctx.training = impl, training
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, dweight, dbias = _BackwardFunction.apply(dy.contiguous(memory_format=_layout(x)), x, weight, bias,
                                                     mean, invstd, ctx.training, need_dx, ctx.impl)
        return (dx if need_dx else None, dweight if ctx.needs_input_grad[1] else None,
                dbias if ctx.needs_input_grad[2] else None, None, None, None, None, None, None)


class _BackwardFunction(torch.autograd.Function):
    """The backward as a node of its own whose backward refuses: with create_graph=True,
    differentiating the gradients again raises instead of treating BatchNorm+ReLU as constant
    (the C++ node does the same, csrc/bindings/bn_relu.cpp)."""

    @staticmethod
    def forward(ctx, dy, x, weight, bias, mean, invstd, training, need_dx, impl):
        return impl.backward(dy, x, weight, bias, mean, invstd, training, need_dx)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fastopt BatchNormReLU has no double backward (its backward is once differentiable)")


def _layout(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) when x is laid out so (and not plainly contiguous), else contiguous."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` itself when it is already a contiguous ``dtype`` tensor (the common case, no dispatch),
    else a contiguous ``dtype`` copy."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def _check_per_channel(name: str, t: Optional[Tensor], channels: int, x: Tensor) -> None:
    if t is None:
        return
    if t.numel() != channels:
        raise ValueError(f"batch_norm_relu: the input has {channels} channels (dim 1 of shape "
                         f"{tuple(x.shape)}) but {name} has {t.numel()} elements")
    if t.device != x.device:
        raise ValueError(f"batch_norm_relu: {name} is on {t.device} but the input is on {x.device}")
    if not t.is_floating_point():
        raise TypeError(f"batch_norm_relu: {name} must be a floating-point tensor, got {t.dtype}")


def verify_batch_size(x: Tensor) -> None:
    """torch's error (message and type, F.batch_norm's) for one value per channel in training."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def batch_norm_relu(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """``relu(torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps))`` in one fused forward and one fused backward.

    Same arguments and semantics as ``F.batch_norm``: with ``training=True`` the batch statistics
    normalize x and the running ones (when given) move by ``momentum``; otherwise the running
    statistics are used. x is (N, C, *spatial), contiguous or channels_last; float32, float16 or
    bfloat16 inputs compute in float32 (float64 in float64), and weight, bias and the running
    statistics are kept in float32 (float64).
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm_relu: expected an input of at least 2 dimensions (N, C, ...), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"batch_norm_relu: the input must be floating point, got {x.dtype}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_per_channel(name, t, channels, x)
    if training:
        verify_batch_size(x)
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm_relu: running_mean and running_var are required when training=False")
    impl = resolve(backend, x.device, x.dtype)
    x = x.contiguous(memory_format=_layout(x))
    stat_dtype = compute_dtype(x.dtype)
    # weight and bias in the statistics dtype (a differentiable cast: grads flow back to e.g. bf16
    # params); running statistics of another dtype are updated through a copy and written back.
    weight, bias = _as(weight, stat_dtype), _as(bias, stat_dtype)
    rm, rv = _as(running_mean, stat_dtype), _as(running_var, stat_dtype)
    if isinstance(impl, _Compiled) and not torch.compiler.is_compiling():
        # the autograd node in C++ (Note [BatchNorm+ReLU autograd in C++], csrc/bindings/bn_relu.cpp)
        y = _ext._C.bn_relu(x, weight, bias, rm, rv, bool(training), float(momentum), float(eps))
    else:
        y = BatchNormReLUFunction.apply(x, weight, bias, rm, rv, bool(training), float(momentum), float(eps), impl)
    if training:
        for mine, theirs in ((rm, running_mean), (rv, running_var)):
            if mine is not None and mine is not theirs:
                theirs.copy_(mine.view_as(theirs))
    return y


__all__ = ["BatchNormReLUFunction", "batch_norm_relu"]
