"""RMSprop (centered, momentum) for every tensor of a param group in one launch (Triton).

Per element, in fp32 (csrc/include/fastopt/update_math.h, rmsprop_element):

    g <- prep(g) (+ wd * p);  v <- v * alpha + (1 - alpha) * g * g
    a <- sqrt(v - ga * ga) with ga <- lerp(ga, g, 1 - alpha) if centered, else sqrt(v);  a <- a + eps
    b <- b * momentum + g / a;  p <- p + (-lr) * b      (p <- p + (-lr) * g / a without momentum)
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    addcmul_sq, chunk_bounds, div, finish_step, grad_scalars, lerp, load_as, load_grad, neg_lr, read_step, scalar,
    skipped, sqrt, store_param, to_storage, typed_ptr,
)
from .launch import launch_args


@triton.jit
def _rmsprop_kernel(
    tensor_of_chunk, start_of_chunk, numels, chunks_of_tensor, done, step_ptrs,
    p_ptrs, g_ptrs, v_ptrs, ga_ptrs, buf_ptrs, out_ptrs,
    lr_ptr, lr: tl.float64, alpha: tl.float64, one_minus_alpha: tl.float64, eps: tl.float64,
    weight_decay: tl.float64, momentum: tl.float64,
    grad_scale_ptr, clip_value: tl.float64, clip_coef_ptr, found_inf_ptr,
    COMPUTE: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, L2: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    if not skipped(found_inf_ptr, g_ptrs, tensor_of_chunk, HAS_FOUND_INF):
        t, start, end = chunk_bounds(tensor_of_chunk, start_of_chunk, numels, CHUNK)
        step_ptr, step = read_step(step_ptrs, t)  # RMSprop keeps the count (as torch) but does not use it
        neg_lr_ = neg_lr(lr_ptr, lr, LR_IS_PTR, COMPUTE)
        inv_scale, coef = grad_scalars(grad_scale_ptr, clip_coef_ptr, HAS_SCALE, HAS_COEF, COMPUTE)
        alpha_, oma, mom = scalar(alpha, COMPUTE), scalar(one_minus_alpha, COMPUTE), scalar(momentum, COMPUTE)
        eps_, wd, clip = scalar(eps, COMPUTE), scalar(weight_decay, COMPUTE), scalar(clip_value, COMPUTE)
        p_ptr = typed_ptr(p_ptrs, t, P_DTYPE)
        g_ptr = typed_ptr(g_ptrs, t, G_DTYPE)
        v_ptr = typed_ptr(v_ptrs, t, P_DTYPE)
        for off in tl.range(0, end - start, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < end
            p = load_as(p_ptr, idx, mask, COMPUTE)
            v = load_as(v_ptr, idx, mask, COMPUTE)
            g = load_grad(g_ptr, idx, mask, p, inv_scale, clip, coef, wd, HAS_SCALE, HAS_CLIP, HAS_COEF, MAXIMIZE,
                          L2, COMPUTE)
            v = addcmul_sq(v, alpha_, g, oma)
            if CENTERED:
                ga_ptr = typed_ptr(ga_ptrs, t, P_DTYPE)
                ga = load_as(ga_ptr, idx, mask, COMPUTE)
                ga = lerp(ga, g, oma)
                tl.store(ga_ptr + idx, to_storage(ga, P_DTYPE), mask=mask)
                avg = sqrt(tl.fma(-ga, ga, v))  # square_avg.addcmul(grad_avg, grad_avg, value=-1)
            else:
                avg = sqrt(v)
            avg = avg + eps_
            if MOMENTUM:
                buf_ptr = typed_ptr(buf_ptrs, t, P_DTYPE)
                buf = load_as(buf_ptr, idx, mask, COMPUTE)
                buf = buf * mom + div(g, avg)
                tl.store(buf_ptr + idx, to_storage(buf, P_DTYPE), mask=mask)
                p = tl.fma(buf, neg_lr_, p)  # param.add_(buf, alpha=-lr)
            else:
                p = p + div(neg_lr_ * g, avg)
            tl.store(v_ptr + idx, to_storage(v, P_DTYPE), mask=mask)
            store_param(p, p_ptr, out_ptrs, t, idx, mask, P_DTYPE, OUT_DTYPE, MASTER)
        finish_step(step_ptr, step, chunks_of_tensor, done, t)


def rmsprop_step(plan, *, lr, alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
                 maximize: bool, grad_scale=None, clip_value=None, clip_coef=None, found_inf=None) -> None:
    """One RMSprop step over ``plan`` (slots params, grads, square_avgs, grad_avgs,
    momentum_buffers, params_out) in one launch."""
    if len(plan) == 0:
        return
    args, meta = launch_args(plan, lr, grad_scale, clip_value, clip_coef, found_inf, maximize)
    _rmsprop_kernel[(plan.n_chunks,)](
        *args["tables"], plan.ptrs["params"], plan.ptrs["grads"], plan.ptrs["square_avgs"],
        plan.ptrs["grad_avgs"], plan.ptrs["momentum_buffers"], plan.ptrs["params_out"],
        *args["lr"], alpha, 1.0 - alpha, eps, weight_decay, momentum, *args["grad"],
        L2=weight_decay != 0, CENTERED=centered, MOMENTUM=momentum > 0, **meta,
    )
