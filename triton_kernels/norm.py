"""The global gradient norm (2 or inf) and the clip coefficient, in one launch (Triton).

Each program reduces one chunk of the (unscaled, value-clipped) grads to a partial, stores it and
bumps a counter; the program that finds itself last reduces the partials in chunk order (the
result does not depend on scheduling), writes the norm and, when asked, the coefficient
``min(max_norm / (norm + 1e-6), 1)`` that the update kernel reads: no second launch, no host sync.
NaN and inf propagate as in torch.nn.utils.clip_grad_norm_.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    aligned_ptr, chunk_bounds, div, from_base, grad_scalars, has_grad, load_as, prepare_grad, scalar, sqrt,
)
from .launch import tl_dtype
from .multi_tensor import BLOCK, CHUNK

RBLOCK = 1024  # partials reduced per iteration by the last program


@triton.jit
def _nan_carrier(x):
    """0 where x is a number, NaN where it is NaN: adding it propagates NaN through max()."""
    return tl.where(x != x, x, 0.0)


@triton.jit
def _norm_block(g_ptr, idx, mask, acc, nans, inv_scale, clip, ACC: tl.constexpr, L2: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """The elements ``idx`` added to the per-lane sums (or maxima) (masked unless ``mask`` is None:
    Note [aligned bodies], common.py)."""
    g = prepare_grad(load_as(g_ptr, idx, mask, ACC), inv_scale, clip, 1.0, HAS_SCALE, HAS_CLIP, False, False)
    if L2:
        acc += g * g  # NaN and inf propagate through the sum
    else:
        acc = tl.maximum(acc, tl.abs(g))
        nans += _nan_carrier(g)
    return acc, nans


@triton.jit
def _norm_kernel(
    tensor_of_chunk, start_of_chunk, numels, g_ptrs, g_base, partials, counter, out, n_chunks,
    grad_scale_ptr, clip_value: tl.float64, max_norm: tl.float64,
    ACC: tl.constexpr, G_DTYPE: tl.constexpr, L2: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    WRITE_COEF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):
    t, start, end = chunk_bounds(tensor_of_chunk, start_of_chunk, numels, CHUNK)
    end = tl.where(has_grad(g_ptrs, t), end, start)  # an absent grad adds nothing
    inv_scale, _ = grad_scalars(grad_scale_ptr, grad_scale_ptr, HAS_SCALE, False, ACC)
    clip = scalar(clip_value, ACC)
    g_off, ok = from_base(g_base, g_ptrs, t)  # Note [aligned bodies]; an absent grad's is never read
    acc = tl.zeros([BLOCK], dtype=ACC)
    nans = tl.zeros([BLOCK], dtype=ACC)
    tail = start
    if ok:
        tail = start + (end - start) // BLOCK * BLOCK
        for off in tl.range(start // BLOCK * BLOCK, tail, BLOCK):  # start: a multiple of CHUNK
            acc, nans = _norm_block(aligned_ptr(g_base, g_off), off + tl.arange(0, BLOCK), None, acc, nans,
                                    inv_scale, clip, ACC, L2, HAS_SCALE, HAS_CLIP)
    for off in tl.range(tail, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc, nans = _norm_block(g_base + g_off, idx, idx < end, acc, nans, inv_scale, clip, ACC, L2, HAS_SCALE,
                                HAS_CLIP)
    if L2:
        partial = tl.sum(acc, axis=0)
    else:
        partial = tl.max(acc, axis=0) + tl.sum(nans, axis=0)
    tl.store(partials + tl.program_id(0), partial)
    if tl.atomic_add(counter, 1) == n_chunks - 1:  # the last program: reduce the partials
        total = tl.zeros([RBLOCK], dtype=ACC)
        carry = tl.zeros([RBLOCK], dtype=ACC)
        for first in tl.range(0, n_chunks, RBLOCK):
            ridx = first + tl.arange(0, RBLOCK)
            x = tl.load(partials + ridx, mask=ridx < n_chunks, other=0.0)
            if L2:
                total += x
            else:
                total = tl.maximum(total, x)
                carry += _nan_carrier(x)
        if L2:
            norm = sqrt(tl.sum(total, axis=0))
        else:
            norm = tl.max(total, axis=0) + tl.sum(carry, axis=0)
        tl.store(out, norm)
        if WRITE_COEF:
            # torch: max_norm / (norm + 1e-6) is Tensor.__rtruediv__, reciprocal() * max_norm
            coef = tl.minimum(div(1.0 + tl.zeros([], ACC), norm + 1e-6) * scalar(max_norm, ACC), 1.0,
                              propagate_nan=tl.PropagateNan.ALL)
            tl.store(out + 1, coef)
        tl.store(counter, 0)


def grad_norm(plan, norm_type: float, *, grad_scale: Optional[Tensor] = None, clip_value: Optional[float] = None,
              max_norm: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The norm of ``plan``'s bound grads after unscale and value clip, as a 0-dim float32 device
    tensor (float64 for float64 grads), and with ``max_norm`` the clip coefficient too (else None)."""
    out = torch.empty(2, dtype=plan.partials.dtype, device=plan.device)  # written by the kernel: no fill launch
    if len(plan) == 0:
        out[0], out[1] = 0.0, 1.0
        return out[0], (out[1] if max_norm is not None else None)
    if grad_scale is not None:
        grad_scale = grad_scale.to(plan.device, non_blocking=True)
    _norm_kernel[(plan.n_chunks,)](
        plan.tensor_of_chunk, plan.start_of_chunk, plan.numels, plan.ptrs[plan.grad_slot],
        *plan.bases(plan.grad_slot), plan.partials,
        plan.norm_counter, out, plan.n_chunks, plan.done if grad_scale is None else grad_scale,
        0.0 if clip_value is None else float(clip_value), 0.0 if max_norm is None else float(max_norm),
        ACC=tl.float64 if plan.partials.dtype == torch.float64 else tl.float32,
        G_DTYPE=tl_dtype(plan.dtypes[plan.grad_slot]), L2=norm_type == 2.0, HAS_SCALE=grad_scale is not None,
        HAS_CLIP=clip_value is not None, WRITE_COEF=max_norm is not None, CHUNK=CHUNK, BLOCK=BLOCK,
        RBLOCK=RBLOCK, enable_fp_fusion=False,  # Note [no FMA contraction]
    )
    return out[0], (out[1] if max_norm is not None else None)
