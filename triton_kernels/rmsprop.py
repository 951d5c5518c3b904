"""RMSprop (centered, momentum) for every tensor of a param group in one launch (Triton).

Per element, in fp32 (csrc/include/fastopt/update_math.h, RMSprop::update):

    g <- prep(g) (+ wd * p);  v <- v * alpha + (1 - alpha) * g * g
    a <- sqrt(v - ga * ga) with ga <- lerp(ga, g, 1 - alpha) if centered, else sqrt(v);  a <- a + eps
    b <- b * momentum + g / a;  p <- p + (-lr) * b      (p <- p + (-lr) * g / a without momentum)
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    addcmul_sq, block_grad, block_param, block_store_param, div, lerp, load_as, neg_lr, scalar, sqrt, store_state,
    update_chunk,
)
from .launch import launch_args


@triton.jit
def _rmsprop_block(p_ptr, g_ptr, v_ptr, ga_ptr, buf_ptr, out_ptr, idx, mask, sc, gs, rs, G: tl.constexpr,
                   F: tl.constexpr):
    """The update of the elements ``idx`` (Note [one walk per chunk])."""
    neg_lr_, alpha_, oma, mom, eps_, wd = sc
    COMPUTE: tl.constexpr = G[0]
    L2: tl.constexpr = F[0]
    CENTERED: tl.constexpr = F[1]
    MOMENTUM: tl.constexpr = F[2]
    p = block_param(p_ptr, out_ptr, idx, mask, G)
    v = load_as(v_ptr, idx, mask, COMPUTE)
    g = block_grad(g_ptr, idx, mask, p, wd, gs, G, L2)
    v = addcmul_sq(v, alpha_, g, oma)
    if CENTERED:
        ga = load_as(ga_ptr, idx, mask, COMPUTE)
        ga = lerp(ga, g, oma)
        store_state(ga, ga_ptr, idx, mask, 1, rs, G)
        avg = sqrt(tl.fma(-ga, ga, v))  # square_avg.addcmul(grad_avg, grad_avg, value=-1)
    else:
        avg = sqrt(v)
    avg = avg + eps_
    if MOMENTUM:
        buf = load_as(buf_ptr, idx, mask, COMPUTE)
        buf = buf * mom + div(g, avg)
        store_state(buf, buf_ptr, idx, mask, 2, rs, G)
        p = tl.fma(buf, neg_lr_, p)  # param.add_(buf, alpha=-lr)
    else:
        p = p + div(neg_lr_ * g, avg)
    store_state(v, v_ptr, idx, mask, 0, rs, G)
    block_store_param(p, p_ptr, out_ptr, idx, mask, rs, G)


@triton.jit
def _rmsprop_scalars(step, H, G: tl.constexpr, F: tl.constexpr):
    """The block update's scalars: RMSprop keeps the step count (as torch) but does not use it."""
    lr_ptr, lr, alpha, one_minus_alpha, momentum, eps, weight_decay = H
    COMPUTE: tl.constexpr = G[0]
    return (neg_lr(lr_ptr, lr, G[11], COMPUTE), scalar(alpha, COMPUTE), scalar(one_minus_alpha, COMPUTE),
            scalar(momentum, COMPUTE), scalar(eps, COMPUTE), scalar(weight_decay, COMPUTE))


@triton.jit
def _rmsprop_kernel(
    chunks, per_tensor, numels, done, step_ptrs,
    p_ptrs, g_ptrs, v_ptrs, ga_ptrs, buf_ptrs, out_ptrs, p_base, g_base, out_base, s_base, seed_ptrs,
    lr_ptr, lr: tl.float64, alpha: tl.float64, one_minus_alpha: tl.float64, eps: tl.float64,
    weight_decay: tl.float64, momentum: tl.float64,
    grad_scale_ptr, clip_value: tl.float64, clip_coef_ptr, found_inf_ptr,
    COMPUTE: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, L2: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, S_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
    STORE: tl.constexpr, BLOCK: tl.constexpr,
):
    update_chunk(_rmsprop_scalars, _rmsprop_block, (lr_ptr, lr, alpha, one_minus_alpha, momentum, eps, weight_decay),
                 chunks, per_tensor, numels, done, step_ptrs, p_base, g_base, out_base, s_base, p_ptrs, g_ptrs,
                 v_ptrs, ga_ptrs, buf_ptrs, out_ptrs, seed_ptrs, grad_scale_ptr, clip_value, clip_coef_ptr,
                 found_inf_ptr,
                 (COMPUTE, P_DTYPE, OUT_DTYPE, MAXIMIZE, MASTER, HAS_SCALE, HAS_CLIP, HAS_COEF, S_DTYPE, STOCHASTIC,
                  STORE, LR_IS_PTR),
                 (L2, CENTERED, MOMENTUM), (True, CENTERED, MOMENTUM), HAS_FOUND_INF, BLOCK)


def rmsprop_step(plan, *, lr, alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
                 maximize: bool, grad_scale=None, clip_value=None, clip_coef=None, found_inf=None) -> None:
    """One RMSprop step over ``plan`` (slots params, grads, square_avgs, grad_avgs,
    momentum_buffers, params_out) in one launch."""
    if len(plan) == 0:
        return
    args, meta = launch_args(plan, lr, grad_scale, clip_value, clip_coef, found_inf, maximize, "square_avgs")
    _rmsprop_kernel[(plan.update_chunks,)](
        *args["tables"], plan.ptrs["params"], plan.ptrs["grads"], plan.ptrs["square_avgs"],
        plan.ptrs["grad_avgs"], plan.ptrs["momentum_buffers"], plan.ptrs["params_out"],
        *args["bases"], *args["lr"], alpha, 1.0 - alpha, eps, weight_decay, momentum, *args["grad"],
        L2=weight_decay != 0, CENTERED=centered, MOMENTUM=momentum > 0, **meta,
    )
