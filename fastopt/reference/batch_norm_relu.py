"""BatchNorm followed by ReLU, the specification: forward and backward in plain PyTorch.

Statistics and the update math run in float32 (float64 for float64 inputs), whatever the storage
dtype of the input; parameters and running statistics are float32 (float64).

Forward, with ``M`` values per channel (``N * prod(spatial)``)::

    mean = sum(x) / M,  var = sum((x - mean)^2) / M,  invstd = 1 / sqrt(var + eps)
    y = relu(z),  z = (x - mean) * invstd * weight + bias        (z written as x * scale + shift)

When the batch statistics are used and running ones are given, they move as torch's BatchNorm does:
``running = (1 - momentum) * running + momentum * stat`` with the unbiased ``var * M / (M - 1)``.
Eval mode (``training=False`` with running statistics) uses them instead of the batch's.

Backward, with ``g = dy * (z > 0)`` (the ReLU mask is recomputed from x) and ``xhat = (x - mean) *
invstd``::

    dbias = sum(g),  dweight = sum(g * xhat)
    dx = weight * invstd * (g - dbias / M - xhat * dweight / M)     (batch statistics)
    dx = weight * invstd * g                                          (running statistics)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .clip import compute_dtype


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """``v`` (one value per channel) shaped to broadcast against ``x``."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


def scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor):
    """``scale = weight * invstd`` and ``shift = bias - mean * scale``: ``z = x * scale + shift``."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    return scale, shift


@torch.no_grad()
def batch_norm_relu_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, invstd)``; the running statistics are updated in place when ``training``."""
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    dims = _reduce_dims(x)
    if training:
        count = x.numel() // x.shape[1]
        mean = xf.mean(dims)
        var = (xf - _per_channel(mean, x)).square().mean(dims)
        if running_mean is not None:
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(dtype))
        if running_var is not None:
            unbiased = var * (count / (count - 1))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(dtype))
    else:
        mean, var = running_mean.to(dtype), running_var.to(dtype)
    invstd = torch.rsqrt(var + eps)
    scale, shift = scale_shift(weight, bias, mean, invstd)
    z = xf * _per_channel(scale, x) + _per_channel(shift, x)
    y = torch.relu(z)
    if y.dtype != x.dtype:
        # Note [no aliasing output]: not an unconditional .to(x.dtype), which returns its input when
        # the dtype is already x's. Under torch.compile on torch 2.11 that alias, returned from
        # BatchNormReLUFunction.forward, cut the node from the graph: every gradient through it came
        # out zero (tests/test_batch_norm_relu.py::test_torch_compile[reference], on the H200 and in
        # CI's torch 2.11 environment).
        y = y.to(x.dtype)
    return y, mean, invstd


@torch.no_grad()
def batch_norm_relu_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` for the forward above; ``training`` says whether it used the batch
    statistics (then the gradient also flows through mean and invstd)."""
    dtype = mean.dtype
    xf, dyf = x.to(dtype), dy.to(dtype)
    dims = _reduce_dims(x)
    scale, shift = scale_shift(weight, bias, mean, invstd)
    z = xf * _per_channel(scale, x) + _per_channel(shift, x)
    g = torch.where(z > 0, dyf, torch.zeros((), dtype=dtype, device=x.device))
    xhat = (xf - _per_channel(mean, x)) * _per_channel(invstd, x)
    dbias = g.sum(dims)
    dweight = (g * xhat).sum(dims)
    if training:
        count = x.numel() // x.shape[1]
        inner = g - _per_channel(dbias / count, x) - xhat * _per_channel(dweight / count, x)
    else:
        inner = g
    dx = (inner * _per_channel(scale, x)).to(x.dtype)
    return dx, dweight, dbias
