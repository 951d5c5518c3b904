"""BatchNorm followed by ReLU: Triton kernels and their host launchers.

The specification is ``fastopt/reference/batch_norm_relu.py``. x is viewed as (N, C, S): either
contiguous (NCS) or channels_last (rows of C values). One kernel walks the tensor in
[BLOCK_C channels x BLOCK_J values] tiles and does one of four passes (MODE):

- ``MOMENTS``: per-channel sums of (x - k) and (x - k)^2, k a value of the channel (Note [shifted
  sums] in csrc/include/fastopt/bn_relu_math.h), one partial per program of the split;
- ``FORWARD``: y = max(fma(x, scale, shift), 0);
- ``GRAD_SUMS``: sums of g and g * (x - mean), g = dy where fma(x, scale, shift) > 0 (the ReLU mask
  recomputed the same way as forward);
- ``INPUT_GRAD``: dx = k_g * g + k_c * (x - mean) + k_0.

The grid is (channel blocks, splits of the N*S values); partial sums are combined, and the per-
channel scalars computed, in float64 on C-sized tensors by the host launchers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import to_storage
from .launch import tl_dtype

MOMENTS, FORWARD, GRAD_SUMS, INPUT_GRAD = 0, 1, 2, 3


@triton.jit
def _bn_relu_pass_kernel(x_ptr, dy_ptr, out_ptr, part_ptr, va_ptr, vb_ptr, vm_ptr, kg_ptr, kc_ptr, k0_ptr,
                         N, C, S, SPLITS, MODE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                         OUT_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # per-channel vectors: MOMENTS reads the shift k (va); the others scale (va) and shift (vb)
    va = tl.load(va_ptr + c, mask=cmask, other=0.0)[:, None]
    vb = tl.load(vb_ptr + c, mask=cmask, other=0.0)[:, None]
    mean = tl.load(vm_ptr + c, mask=cmask, other=0.0)[:, None]
    kg = tl.load(kg_ptr + c, mask=cmask, other=0.0)[:, None]
    kc = tl.load(kc_ptr + c, mask=cmask, other=0.0)[:, None]
    k0 = tl.load(k0_ptr + c, mask=cmask, other=0.0)[:, None]
    acc_a = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.float32)
    j = tl.arange(0, BLOCK_J)
    if CHANNELS_LAST:
        units = tl.cdiv(N * S, BLOCK_J)  # chunks of BLOCK_J rows
    else:
        chunks_per_row = tl.cdiv(S, BLOCK_J)
        units = N * chunks_per_row  # (sample, chunk of its S values)
    u0 = units * pid_r // SPLITS
    u1 = units * (pid_r + 1) // SPLITS
    for u in range(u0, u1):
        if CHANNELS_LAST:
            r = u * BLOCK_J + j
            offs = r[None, :].to(tl.int64) * C + c[:, None]
            mask = cmask[:, None] & (r < N * S)[None, :]
        else:
            n = u // chunks_per_row
            s = (u % chunks_per_row) * BLOCK_J + j
            offs = (n.to(tl.int64) * C + c[:, None]) * S + s[None, :]
            mask = cmask[:, None] & (s < S)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            d = tl.where(mask, x - va, 0.0)
            acc_a += d
            acc_b += d * d
        elif MODE == 1:
            y = tl.maximum(tl.fma(x, va, vb), 0.0)
            tl.store(out_ptr + offs, to_storage(y, OUT_DTYPE), mask=mask)
        else:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(tl.fma(x, va, vb) > 0.0, dy, 0.0)
            if MODE == 2:
                acc_a += g
                acc_b += g * (x - mean)
            else:
                dx = kg * g + kc * (x - mean) + k0
                tl.store(out_ptr + offs, to_storage(dx, OUT_DTYPE), mask=mask)
    if MODE == 0 or MODE == 2:
        tl.store(part_ptr + pid_r * C + c, tl.sum(acc_a, axis=1), mask=cmask)
        tl.store(part_ptr + (SPLITS + pid_r) * C + c, tl.sum(acc_b, axis=1), mask=cmask)


def _shape(x: Tensor) -> tuple[int, int, int, bool]:
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    channels_last = x.dim() == 2 or not x.is_contiguous()
    return n, c, s, channels_last


def _blocks(c: int, s: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_J): about 2048 values per tile, the contiguous axis the longer one."""
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 128)
        return block_c, max(1, 2048 // block_c)
    block_j = min(triton.next_power_of_2(max(s, 1)), 1024)
    return min(triton.next_power_of_2(c), max(1, 2048 // block_j)), block_j


def _splits(x: Tensor, c_blocks: int, units: int) -> int:
    """Programs along the values: enough to fill the GPU (a few per SM), at most one per unit."""
    if x.is_cuda:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4  # the interpreter: few, large programs
    return max(1, min(units, triton.cdiv(target, c_blocks)))


def _launch(mode: int, x: Tensor, dy: Optional[Tensor], out: Optional[Tensor], vectors: list) -> Optional[Tensor]:
    """Run one pass; returns the (2, C) float64 channel sums for the reduction passes."""
    n, c, s, channels_last = _shape(x)
    block_c, block_j = _blocks(c, s, channels_last)
    c_blocks = triton.cdiv(c, block_c)
    units = triton.cdiv(n * s, block_j) if channels_last else n * triton.cdiv(s, block_j)
    splits = _splits(x, c_blocks, units)
    reduce = mode in (MOMENTS, GRAD_SUMS)
    part = torch.zeros((2, splits, c), dtype=torch.float32, device=x.device) if reduce else x
    dummy = vectors[0]
    vec = list(vectors) + [dummy] * (6 - len(vectors))
    _bn_relu_pass_kernel[(c_blocks, splits)](
        x, dy if dy is not None else x, out if out is not None else x, part, *vec, n, c, s, splits,
        MODE=mode, CHANNELS_LAST=channels_last, OUT_DTYPE=tl_dtype(x.dtype), BLOCK_C=block_c, BLOCK_J=block_j,
        num_warps=4, enable_fp_fusion=False)
    return part.double().sum(1) if reduce else None


def _scale_shift(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """float32 scale = weight * invstd and shift = bias - mean * scale, formed in float64."""
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    shift = (bias.double() if bias is not None else 0.0) - mean.double() * scale
    return scale.float(), shift.float()


@torch.no_grad()
def bn_relu_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], training: bool, momentum: float, eps: float):
    """``(y, mean, invstd)`` (float32); moves the running statistics when ``training``."""
    n, c, s, channels_last = _shape(x)
    count = n * s
    if training:
        if count > 0:
            k = x[(0, slice(None)) + (0,) * (x.dim() - 2)].float().contiguous()  # each channel's first value
        else:
            k = torch.zeros(c, dtype=torch.float32, device=x.device)
        s1, s2 = _launch(MOMENTS, x, None, None, [k])
        d = s1 / count
        var = (s2 / count - d * d).clamp_min(0.0)
        mean64 = k.double() + d
        if running_mean is not None:
            running_mean.copy_(momentum * mean64 + (1 - momentum) * running_mean.double())
        if running_var is not None:
            running_var.copy_(momentum * var * (count / (count - 1)) + (1 - momentum) * running_var.double())
        mean, invstd = mean64.float(), torch.rsqrt(var + eps).float()
    else:
        mean, invstd = running_mean.float().clone(), torch.rsqrt(running_var.double() + eps).float()
    y = torch.empty_like(x)
    _launch(FORWARD, x, None, y, list(_scale_shift(mean, invstd, weight, bias)))
    return y, mean, invstd


@torch.no_grad()
def bn_relu_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                     invstd: Tensor, training: bool, need_input_grad: bool):
    """``(dx, dweight, dbias)``; dx is empty unless ``need_input_grad``."""
    n, c, s, _ = _shape(x)
    count = n * s
    scale, shift = _scale_shift(mean, invstd, weight, bias)
    sum_g, sum_gc = _launch(GRAD_SUMS, x, dy, None, [scale, shift, mean])
    dweight, dbias = (sum_gc * invstd.double()).float(), sum_g.float()
    if not need_input_grad:
        return x.new_empty(0), dweight, dbias
    if training:
        scale64 = scale.double()
        k_c = (-scale64 * invstd.double() * (sum_gc * invstd.double()) / count).float()
        k_0 = (-scale64 * sum_g / count).float()
    else:
        k_c = k_0 = torch.zeros_like(scale)
    dx = torch.empty_like(x)
    _launch(INPUT_GRAD, x, dy, dx, [scale, shift, mean, scale, k_c, k_0])
    return dx, dweight, dbias
