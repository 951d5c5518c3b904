"""BatchNorm followed by ReLU: Triton kernels and their host launchers.

The specification is ``fastopt/reference/batch_norm_relu.py``. x is viewed as (N, C, S): either
contiguous (NCS) or channels_last (rows of C values). Both kernels walk the tensor in
[BLOCK_C channels x BLOCK_J values] tiles, on a grid of (channel blocks, splits of the N*S values).

Two launches per direction, and no torch op on the path but the allocations and one zero-fill of
the counters (Note [last program finalizes]):

Float32, float16 and bfloat16 inputs compute and keep their statistics in float32, float64 inputs in
float64 (the constexpr ACC).

- ``_bn_relu_sums_kernel``: per-channel sums, one partial (in ACC) per program. Forward: (x - k) and
  (x - k)^2 with k the channel's first value (Note [shifted sums], csrc/include/fastopt/
  bn_relu_math.h). Backward: g and g * (x - mean), g = dy where fma(x, scale, shift) > 0 (the ReLU
  mask recomputed as forward computes it). The last program of each channel block combines the
  partials in float64 and finalizes: mean, invstd, the running statistics, scale and shift
  (forward); dweight, dbias and the dx coefficients (backward).
- ``_bn_relu_apply_kernel``: y = max(fma(x, scale, shift), 0), or dx = k_g * g + k_c * (x - mean) +
  k_0. In eval mode it forms scale and shift from the running statistics itself: one launch.

Note [last program finalizes]: each program stores its partials, then bumps its channel block's
counter with an acquire-release atomic; the program that sees ``SPLITS - 1`` is the last, and the
acquire makes every other program's partials visible to it (csrc/cuda/norm.cu and torch's
Normalization.cuh do the same). The counters are zeroed per call (not cached and reset by the
kernel): two calls on different streams may run at once. The partials are combined in a fixed
order, so results do not depend on which program finishes last.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import sqrt, to_storage
from .launch import tl_dtype

RBLOCK = tl.constexpr(32)  # splits combined per step of the finalize loop


@triton.jit
def _tile(u, j, c, cmask, N, C, S, CHANNELS_LAST: tl.constexpr, BLOCK_J: tl.constexpr):
    """Offsets and mask of tile ``u``: BLOCK_J rows of BLOCK_C channels (channels_last), or BLOCK_C
    channels x BLOCK_J values of one sample (NCS)."""
    if CHANNELS_LAST:
        r = u * BLOCK_J + j
        offs = r[None, :].to(tl.int64) * C + c[:, None]
        mask = cmask[:, None] & (r < N * S)[None, :]
    else:
        chunks_per_row = tl.cdiv(S, BLOCK_J)
        n = u // chunks_per_row
        s = (u % chunks_per_row) * BLOCK_J + j
        offs = (n.to(tl.int64) * C + c[:, None]) * S + s[None, :]
        mask = cmask[:, None] & (s < S)[None, :]
    return offs, mask


@triton.jit
def _units(N, S, CHANNELS_LAST: tl.constexpr, BLOCK_J: tl.constexpr):
    """The number of tiles along a channel block's values."""
    if CHANNELS_LAST:
        return tl.cdiv(N * S, BLOCK_J)
    else:
        return N * tl.cdiv(S, BLOCK_J)


@triton.jit
def _affine(mean, invstd, w_ptr, b_ptr, c, cmask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
            ACC: tl.constexpr):
    """``scale = weight * invstd`` and ``shift = bias - mean * scale`` in the statistics dtype ACC,
    formed in float64 from mean and invstd (``bn::affine``): forward and backward get the same bits,
    so the recomputed ReLU mask is the forward's."""
    scale = invstd.to(tl.float64)
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float64) * scale
    shift = 0.0 - mean.to(tl.float64) * scale
    if HAS_BIAS:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float64) - mean.to(tl.float64) * scale
    return scale.to(ACC), shift.to(ACC)


@triton.jit
def _combined(part_ptr, which, c, cmask, C, SPLITS, BLOCK_C: tl.constexpr):
    """Sum over the splits of partial ``which`` (0 or 1), per channel, in float64, in a fixed order."""
    acc = tl.zeros([RBLOCK, BLOCK_C], dtype=tl.float64)
    rows = tl.arange(0, RBLOCK)
    for r0 in range(0, SPLITS, RBLOCK):
        r = r0 + rows
        m = (r < SPLITS)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + ((which * SPLITS + r[:, None]) * C + c[None, :]), mask=m, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _bn_relu_sums_kernel(x_ptr, dy_ptr, part_ptr, counter_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, rm_ptr, rv_ptr,
                         vec_ptr, dw_ptr, db_ptr, N, C, S, SPLITS, count: tl.float64, momentum: tl.float64,
                         eps: tl.float64, GRAD: tl.constexpr, TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RM: tl.constexpr,
                         HAS_RV: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """ACC: the statistics and compute dtype (float64 for float64 inputs, else float32).
    Forward (GRAD=False): statistics; the finalizer writes mean, invstd, the running statistics and
    vec = [scale, shift]. Backward: the sums; the finalizer writes dweight, dbias and
    vec = [scale, shift, k_c, k_0] (k_c = k_0 = 0 with running statistics, TRAINING=False)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if GRAD:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
        invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
        scale, shift = _affine(mean, invstd, w_ptr, b_ptr, c, cmask, HAS_WEIGHT, HAS_BIAS, ACC)
        k = mean
    else:
        # the channel's first value (any value of the channel would do; every program reads the same)
        first = c.to(tl.int64) if CHANNELS_LAST else c.to(tl.int64) * S
        k = tl.load(x_ptr + first, mask=cmask & (count > 0.0), other=0.0).to(ACC)
    acc_a = tl.zeros([BLOCK_C, BLOCK_J], dtype=ACC)
    acc_b = tl.zeros([BLOCK_C, BLOCK_J], dtype=ACC)
    j = tl.arange(0, BLOCK_J)
    units = _units(N, S, CHANNELS_LAST, BLOCK_J)
    for u in range(units * pid_r // SPLITS, units * (pid_r + 1) // SPLITS):
        offs, mask = _tile(u, j, c, cmask, N, C, S, CHANNELS_LAST, BLOCK_J)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if GRAD:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.where(tl.fma(x, scale[:, None], shift[:, None]) > 0.0, dy, 0.0)  # 0 where masked: dy is
            acc_a += g
            acc_b += g * (x - k[:, None])
        else:
            d = tl.where(mask, x - k[:, None], 0.0)
            acc_a += d
            acc_b += d * d
    tl.store(part_ptr + pid_r * C + c, tl.sum(acc_a, axis=1), mask=cmask)
    tl.store(part_ptr + (SPLITS + pid_r) * C + c, tl.sum(acc_b, axis=1), mask=cmask)
    if tl.atomic_add(counter_ptr + pid_c, 1) == SPLITS - 1:  # Note [last program finalizes]
        s1 = _combined(part_ptr, 0, c, cmask, C, SPLITS, BLOCK_C)
        s2 = _combined(part_ptr, 1, c, cmask, C, SPLITS, BLOCK_C)
        if GRAD:
            invstd64 = invstd.to(tl.float64)
            dweight = s2 * invstd64
            tl.store(dw_ptr + c, dweight.to(ACC), mask=cmask)
            tl.store(db_ptr + c, s1.to(ACC), mask=cmask)
            tl.store(vec_ptr + c, scale, mask=cmask)
            tl.store(vec_ptr + C + c, shift, mask=cmask)
            if TRAINING:  # bn::input_grad
                scale64 = scale.to(tl.float64)
                k_c = (-scale64 * invstd64 * dweight / count).to(ACC)
                k_0 = (-scale64 * s1 / count).to(ACC)
            else:
                k_c = tl.zeros([BLOCK_C], dtype=ACC)
                k_0 = tl.zeros([BLOCK_C], dtype=ACC)
            tl.store(vec_ptr + 2 * C + c, k_c, mask=cmask)
            tl.store(vec_ptr + 3 * C + c, k_0, mask=cmask)
        else:
            d = s1 / count  # bn::moments
            var = s2 / count - d * d
            var = tl.where(var > 0.0, var, 0.0)
            mean64 = k.to(tl.float64) + d
            if HAS_RM:  # bn::running_update
                rm = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(tl.float64)
                tl.store(rm_ptr + c, (momentum * mean64 + (1.0 - momentum) * rm).to(ACC), mask=cmask)
            if HAS_RV:
                rv = tl.load(rv_ptr + c, mask=cmask, other=0.0).to(tl.float64)
                unbiased = var * count / (count - 1.0)
                tl.store(rv_ptr + c, (momentum * unbiased + (1.0 - momentum) * rv).to(ACC), mask=cmask)
            mean = mean64.to(ACC)
            invstd = (1.0 / sqrt(var + eps)).to(ACC)
            tl.store(mean_ptr + c, mean, mask=cmask)
            tl.store(invstd_ptr + c, invstd, mask=cmask)
            scale, shift = _affine(mean, invstd, w_ptr, b_ptr, c, cmask, HAS_WEIGHT, HAS_BIAS, ACC)
            tl.store(vec_ptr + c, scale, mask=cmask)
            tl.store(vec_ptr + C + c, shift, mask=cmask)


@triton.jit
def _bn_relu_apply_kernel(x_ptr, dy_ptr, out_ptr, vec_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, rm_ptr, rv_ptr,
                          N, C, S, SPLITS, eps: tl.float64, GRAD: tl.constexpr, EVAL: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          OUT_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """y = max(fma(x, scale, shift), 0) (NaN kept, as torch's relu keeps it), or (GRAD)
    dx = k_g * g + k_c * (x - mean) + k_0 with k_g = scale. EVAL: scale and shift from the running
    statistics, and the first program of each channel block stores mean and invstd."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if EVAL:
        mean = tl.load(rm_ptr + c, mask=cmask, other=0.0)
        invstd = (1.0 / sqrt(tl.load(rv_ptr + c, mask=cmask, other=0.0).to(tl.float64) + eps)).to(ACC)
        if pid_r == 0:
            tl.store(mean_ptr + c, mean, mask=cmask)
            tl.store(invstd_ptr + c, invstd, mask=cmask)
        scale, shift = _affine(mean, invstd, w_ptr, b_ptr, c, cmask, HAS_WEIGHT, HAS_BIAS, ACC)
    else:
        scale = tl.load(vec_ptr + c, mask=cmask, other=0.0)
        shift = tl.load(vec_ptr + C + c, mask=cmask, other=0.0)
    scale = scale[:, None]
    shift = shift[:, None]
    if GRAD:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[:, None]
        k_c = tl.load(vec_ptr + 2 * C + c, mask=cmask, other=0.0)[:, None]
        k_0 = tl.load(vec_ptr + 3 * C + c, mask=cmask, other=0.0)[:, None]
    j = tl.arange(0, BLOCK_J)
    units = _units(N, S, CHANNELS_LAST, BLOCK_J)
    for u in range(units * pid_r // SPLITS, units * (pid_r + 1) // SPLITS):
        # back to front: the sums pass read the last tiles last (Note [second pass in reverse],
        # csrc/cuda/batch_norm_relu.cu)
        offs, mask = _tile(units - 1 - u, j, c, cmask, N, C, S, CHANNELS_LAST, BLOCK_J)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = tl.fma(x, scale, shift)
        if GRAD:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.where(z > 0.0, dy, 0.0)
            out = scale * g + k_c * (x - mean) + k_0
        else:
            out = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + offs, to_storage(out, OUT_DTYPE), mask=mask)


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


def _grid(x: Tensor, per_sm: int) -> tuple[int, int, int, int, bool, int, int, tuple[int, int]]:
    """(n, c, s, count, channels_last, BLOCK_C, BLOCK_J, grid): the grid has about ``per_sm``
    programs per SM along (channel blocks, splits of the values), at most one split per tile (the
    interpreter: 4 programs in all, few and large)."""
    n, c, s, channels_last = _shape(x)
    block_c, block_j = _blocks(c, s, channels_last)
    c_blocks = triton.cdiv(c, block_c)
    units = triton.cdiv(n * s, block_j) if channels_last else n * triton.cdiv(s, block_j)
    target = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    splits = max(1, min(units, triton.cdiv(target, c_blocks)))
    return n, c, s, n * s, channels_last, block_c, block_j, (c_blocks, splits)


def _sums(x, dy, weight, bias, mean, invstd, rm, rv, vec, dw, db, momentum, eps, grad, training):
    n, c, s, count, channels_last, block_c, block_j, grid = _grid(x, 4)
    part = torch.empty((2, grid[1], c), dtype=_stat_dtype(x), device=x.device)
    counter = torch.zeros(grid[0], dtype=torch.int32, device=x.device)  # Note [last program finalizes]
    dummy = vec  # pointer arguments a specialization does not read
    _bn_relu_sums_kernel[grid](
        x, dy if dy is not None else x, part, counter, _or(weight, dummy), _or(bias, dummy), mean, invstd,
        _or(rm, dummy), _or(rv, dummy), vec, _or(dw, dummy), _or(db, dummy), n, c, s, grid[1], float(count),
        float(momentum), float(eps), GRAD=grad, TRAINING=training, CHANNELS_LAST=channels_last,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RM=rm is not None, HAS_RV=rv is not None,
        ACC=tl_dtype(_stat_dtype(x)), BLOCK_C=block_c, BLOCK_J=block_j, num_warps=4, enable_fp_fusion=False)


def _apply(x, dy, out, vec, weight, bias, mean, invstd, rm, rv, eps, grad, eval_stats):
    n, c, s, _, channels_last, block_c, block_j, grid = _grid(x, 16)
    dummy = mean
    _bn_relu_apply_kernel[grid](
        x, dy if dy is not None else x, out, _or(vec, dummy), _or(weight, dummy), _or(bias, dummy), mean, invstd,
        _or(rm, dummy), _or(rv, dummy), n, c, s, grid[1], float(eps), GRAD=grad, EVAL=eval_stats,
        CHANNELS_LAST=channels_last, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        OUT_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(_stat_dtype(x)), BLOCK_C=block_c, BLOCK_J=block_j, num_warps=4,
        enable_fp_fusion=False)


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The statistics, parameters and compute dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _or(t: Optional[Tensor], default: Tensor) -> Tensor:
    return t if t is not None else default


@torch.no_grad()
def bn_relu_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], training: bool, momentum: float, eps: float):
    """``(y, mean, invstd)`` (in the statistics dtype); moves the running statistics when ``training``."""
    c, stats = x.shape[1], _stat_dtype(x)
    mean = torch.empty(c, dtype=stats, device=x.device)
    invstd = torch.empty(c, dtype=stats, device=x.device)
    y = torch.empty_like(x)
    if c == 0:
        return y, mean, invstd
    vec = None
    if training:
        vec = torch.empty(2 * c, dtype=stats, device=x.device)  # scale, shift
        _sums(x, None, weight, bias, mean, invstd, running_mean, running_var, vec, None, None, momentum, eps,
              grad=False, training=True)
    if x.numel() > 0 or not training:  # eval: the launch also writes mean and invstd
        _apply(x, None, y, vec, weight, bias, mean, invstd, running_mean, running_var, eps, grad=False,
               eval_stats=not training)
    return y, mean, invstd


@torch.no_grad()
def bn_relu_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                     invstd: Tensor, training: bool, need_input_grad: bool):
    """``(dx, dweight, dbias)``; dx is empty unless ``need_input_grad``."""
    c, stats = x.shape[1], _stat_dtype(x)
    dweight = torch.empty(c, dtype=stats, device=x.device)
    dbias = torch.empty(c, dtype=stats, device=x.device)
    dx = torch.empty_like(x) if need_input_grad else x.new_empty(0)
    if c == 0:
        return dx, dweight, dbias
    vec = torch.empty(4 * c, dtype=stats, device=x.device)  # scale, shift, k_c, k_0
    _sums(x, dy, weight, bias, mean, invstd, None, None, vec, dweight, dbias, 0.0, 0.0, grad=True,
          training=training)
    if need_input_grad and x.numel() > 0:
        _apply(x, dy, dx, vec, weight, bias, mean, invstd, None, None, 0.0, grad=True, eval_stats=False)
    return dx, dweight, dbias
