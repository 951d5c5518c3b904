"""Adam / AdamW for every tensor of a param group in one launch (Triton).

Per element, in fp32 (csrc/include/fastopt/update_math.h, Adam::update):

    g <- prep(g) (+ wd * p if L2);  p <- p * (1 - lr * wd) if decoupled
    m <- lerp(m, g, 1 - beta1);  v <- v * beta2 + (1 - beta2) * g * g;  vmax <- max(vmax, v) if amsgrad
    p <- p + (-lr / (1 - beta1^t)) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .common import (
    addcmul_sq, block_grad, block_param, block_store_param, decoupled_decay, div, lerp, load_as, lr_over,
    one_minus_pow, scalar, sqrt, store_state, update_chunk,
)
from .launch import launch_args


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, out_ptr, idx, mask, sc, gs, rs, G: tl.constexpr,
                F: tl.constexpr):
    """The update of the elements ``idx`` (Note [one walk per chunk])."""
    neg_step_size, bc2_sqrt, lerp_w, beta2_, omb2, eps_, wd, decay_ = sc
    COMPUTE: tl.constexpr = G[0]
    L2: tl.constexpr = F[0]
    DECOUPLED: tl.constexpr = F[1]
    AMSGRAD: tl.constexpr = F[2]
    p = block_param(p_ptr, out_ptr, idx, mask, G)
    m = load_as(m_ptr, idx, mask, COMPUTE)
    v = load_as(v_ptr, idx, mask, COMPUTE)
    g = block_grad(g_ptr, idx, mask, p, wd, gs, G, L2)
    if DECOUPLED:
        p = p * decay_
    m = lerp(m, g, lerp_w)
    v = addcmul_sq(v, beta2_, g, omb2)
    vv = v
    if AMSGRAD:
        vmax = load_as(vmax_ptr, idx, mask, COMPUTE)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        store_state(vmax, vmax_ptr, idx, mask, 2, rs, G)
        vv = vmax
    denom = div(sqrt(vv), bc2_sqrt) + eps_
    p = p + div(neg_step_size * m, denom)
    store_state(m, m_ptr, idx, mask, 0, rs, G)
    store_state(v, v_ptr, idx, mask, 1, rs, G)
    block_store_param(p, p_ptr, out_ptr, idx, mask, rs, G)


@triton.jit
def _adam_scalars(step, H, G: tl.constexpr, F: tl.constexpr):
    """The block update's scalars at step count ``step`` (Note [one program per chunk of a range])."""
    lr_ptr, lr, lerp_weight, beta2, one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, decay = H
    COMPUTE: tl.constexpr = G[0]
    LR_IS_PTR: tl.constexpr = G[11]
    neg_step_size = (-lr_over(lr_ptr, lr, one_minus_pow(log_beta1, step), LR_IS_PTR)).to(COMPUTE)
    bc2_sqrt = sqrt(one_minus_pow(log_beta2, step)).to(COMPUTE)
    decay_ = scalar(1.0, COMPUTE)
    if F[1]:  # DECOUPLED
        decay_ = decoupled_decay(lr_ptr, decay, weight_decay, LR_IS_PTR, COMPUTE)
    return (neg_step_size, bc2_sqrt, scalar(lerp_weight, COMPUTE), scalar(beta2, COMPUTE),
            scalar(one_minus_beta2, COMPUTE), scalar(eps, COMPUTE), scalar(weight_decay, COMPUTE), decay_)


@triton.jit
def _adam_kernel(
    chunks, per_tensor, numels, done, step_ptrs,
    p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, out_ptrs, p_base, g_base, out_base, s_base, seed_ptrs,
    lr_ptr, lr: tl.float64, lerp_weight: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
    log_beta1: tl.float64, log_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64, decay: tl.float64,
    grad_scale_ptr, clip_value: tl.float64, clip_coef_ptr, found_inf_ptr,
    COMPUTE: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, L2: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, S_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
    STORE: tl.constexpr, BLOCK: tl.constexpr,
):
    update_chunk(_adam_scalars, _adam_block,
                 (lr_ptr, lr, lerp_weight, beta2, one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, decay),
                 chunks, per_tensor, numels, done, step_ptrs, p_base, g_base, out_base, s_base, p_ptrs, g_ptrs,
                 m_ptrs, v_ptrs, vmax_ptrs, out_ptrs, seed_ptrs, grad_scale_ptr, clip_value, clip_coef_ptr,
                 found_inf_ptr,
                 (COMPUTE, P_DTYPE, OUT_DTYPE, MAXIMIZE, MASTER, HAS_SCALE, HAS_CLIP, HAS_COEF, S_DTYPE, STOCHASTIC,
                  STORE, LR_IS_PTR),
                 (L2, DECOUPLED, AMSGRAD), (True, True, AMSGRAD), HAS_FOUND_INF, BLOCK)


def adam_step(plan, *, lr, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
              maximize: bool, decoupled_weight_decay: bool, grad_scale=None, clip_value=None,
              clip_coef=None, found_inf=None) -> None:
    """One Adam step over ``plan`` (a MultiTensorPlan with slots params, grads, exp_avgs,
    exp_avg_sqs, max_exp_avg_sqs, params_out) in one launch."""
    if len(plan) == 0:
        return
    args, meta = launch_args(plan, lr, grad_scale, clip_value, clip_coef, found_inf, maximize, "exp_avgs")
    _adam_kernel[(plan.update_chunks,)](
        *args["tables"],
        plan.ptrs["params"], plan.ptrs["grads"], plan.ptrs["exp_avgs"], plan.ptrs["exp_avg_sqs"],
        plan.ptrs["max_exp_avg_sqs"], plan.ptrs["params_out"], *args["bases"],
        *args["lr"], 1.0 - beta1, beta2, 1.0 - beta2, math.log(beta1) if beta1 > 0 else -math.inf,
        math.log(beta2) if beta2 > 0 else -math.inf, eps, weight_decay,
        1.0 if args["lr_is_ptr"] else 1.0 - float(lr) * weight_decay, *args["grad"],
        L2=weight_decay != 0 and not decoupled_weight_decay,
        DECOUPLED=weight_decay != 0 and decoupled_weight_decay,
        AMSGRAD=amsgrad, **meta,
    )
