"""Adagrad for every tensor of a param group in one launch (Triton).

Per element, in fp32 (csrc/include/fastopt/update_math.h, Adagrad::update):

    g <- prep(g) (+ wd * p);  s <- s + g * g;  p <- p + (-lr / (1 + (t - 1) * lr_decay)) * g / (sqrt(s) + eps)
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    block_grad, block_param, block_store_param, div, load_as, lr_over, scalar, sqrt, store_state, update_chunk,
)
from .launch import launch_args


@triton.jit
def _adagrad_block(p_ptr, g_ptr, s_ptr, _s1, _s2, out_ptr, idx, mask, sc, gs, rs, G: tl.constexpr,
                   F: tl.constexpr):
    """The update of the elements ``idx`` (Note [one walk per chunk])."""
    neg_clr, eps_, wd = sc
    COMPUTE: tl.constexpr = G[0]
    L2: tl.constexpr = F[0]
    p = block_param(p_ptr, out_ptr, idx, mask, G)
    s = load_as(s_ptr, idx, mask, COMPUTE)
    g = block_grad(g_ptr, idx, mask, p, wd, gs, G, L2)
    s = tl.fma(g, g, s)  # state_sum.addcmul_(grad, grad, value=1)
    p = p + div(neg_clr * g, sqrt(s) + eps_)
    store_state(s, s_ptr, idx, mask, 0, rs, G)
    block_store_param(p, p_ptr, out_ptr, idx, mask, rs, G)


@triton.jit
def _adagrad_scalars(step, H, G: tl.constexpr, F: tl.constexpr):
    """The block update's scalars at step count ``step``: lr / (1 + (t - 1) * lr_decay) in float64,
    rounded once (Note [scalars in float64])."""
    lr_ptr, lr, lr_decay, eps, weight_decay = H
    COMPUTE: tl.constexpr = G[0]
    neg_clr = (-lr_over(lr_ptr, lr, 1.0 + (step.to(tl.float64) - 1.0) * lr_decay, G[11])).to(COMPUTE)
    return (neg_clr, scalar(eps, COMPUTE), scalar(weight_decay, COMPUTE))


@triton.jit
def _adagrad_kernel(
    chunks, per_tensor, numels, done, step_ptrs,
    p_ptrs, g_ptrs, sum_ptrs, out_ptrs, p_base, g_base, out_base, s_base, seed_ptrs,
    lr_ptr, lr: tl.float64, lr_decay: tl.float64, weight_decay: tl.float64, eps: tl.float64,
    grad_scale_ptr, clip_value: tl.float64, clip_coef_ptr, found_inf_ptr,
    COMPUTE: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, L2: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    S_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, STORE: tl.constexpr, BLOCK: tl.constexpr,
):
    update_chunk(_adagrad_scalars, _adagrad_block, (lr_ptr, lr, lr_decay, eps, weight_decay),
                 chunks, per_tensor, numels, done, step_ptrs, p_base, g_base, out_base, s_base, p_ptrs, g_ptrs,
                 sum_ptrs, p_ptrs, p_ptrs, out_ptrs, seed_ptrs, grad_scale_ptr, clip_value, clip_coef_ptr,
                 found_inf_ptr,
                 (COMPUTE, P_DTYPE, OUT_DTYPE, MAXIMIZE, MASTER, HAS_SCALE, HAS_CLIP, HAS_COEF, S_DTYPE, STOCHASTIC,
                  STORE, LR_IS_PTR),
                 (L2,), (True, False, False), HAS_FOUND_INF, BLOCK)


def adagrad_step(plan, *, lr, lr_decay: float, weight_decay: float, eps: float, maximize: bool,
                 grad_scale=None, clip_value=None, clip_coef=None, found_inf=None) -> None:
    """One Adagrad step over ``plan`` (slots params, grads, state_sums, params_out) in one launch."""
    if len(plan) == 0:
        return
    args, meta = launch_args(plan, lr, grad_scale, clip_value, clip_coef, found_inf, maximize, "state_sums")
    _adagrad_kernel[(plan.update_chunks,)](
        *args["tables"], plan.ptrs["params"], plan.ptrs["grads"], plan.ptrs["state_sums"],
        plan.ptrs["params_out"], *args["bases"], *args["lr"], lr_decay, weight_decay, eps, *args["grad"],
        L2=weight_decay != 0, **meta,
    )
