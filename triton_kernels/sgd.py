"""SGD (momentum, dampening, Nesterov) for every tensor of a param group in one launch (Triton).

Per element, in fp32 (csrc/include/fastopt/update_math.h, SGD::update):

    g <- prep(g) (+ wd * p);  b <- g on the buffer's first step, else b * momentum + (1 - dampening) * g
    g <- g + momentum * b (nesterov) or b;  p <- p + (-lr) * g      (p <- p + (-lr) * g without momentum)
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import block_grad, block_param, block_store_param, load_as, neg_lr, scalar, store_state, update_chunk
from .launch import launch_args


@triton.jit
def _sgd_block(p_ptr, g_ptr, buf_ptr, _s1, _s2, out_ptr, idx, mask, sc, gs, rs, G: tl.constexpr, F: tl.constexpr):
    """The update of the elements ``idx`` (Note [one walk per chunk])."""
    neg_lr_, mom, omd, first, wd = sc
    COMPUTE: tl.constexpr = G[0]
    L2: tl.constexpr = F[0]
    MOMENTUM: tl.constexpr = F[1]
    NESTEROV: tl.constexpr = F[2]
    p = block_param(p_ptr, out_ptr, idx, mask, G)
    g = block_grad(g_ptr, idx, mask, p, wd, gs, G, L2)
    if MOMENTUM:
        buf = load_as(buf_ptr, idx, mask, COMPUTE)
        # buf.mul_(momentum).add_(grad, alpha=1 - dampening); the grad itself on the first step
        buf = tl.where(first, g, tl.fma(g, omd, buf * mom))
        store_state(buf, buf_ptr, idx, mask, 0, rs, G)
        if NESTEROV:
            g = tl.fma(buf, mom, g)  # grad.add(buf, alpha=momentum)
        else:
            g = buf
    p = tl.fma(g, neg_lr_, p)  # param.add_(grad, alpha=-lr)
    block_store_param(p, p_ptr, out_ptr, idx, mask, rs, G)


@triton.jit
def _sgd_scalars(step, H, G: tl.constexpr, F: tl.constexpr):
    """The block update's scalars at step count ``step``: the plan's own count (Note [SGD's first
    step]), 1 on the buffer's first step."""
    lr_ptr, lr, momentum, one_minus_dampening, weight_decay = H
    COMPUTE: tl.constexpr = G[0]
    return (neg_lr(lr_ptr, lr, G[11], COMPUTE), scalar(momentum, COMPUTE), scalar(one_minus_dampening, COMPUTE),
            step == 1.0, scalar(weight_decay, COMPUTE))


@triton.jit
def _sgd_kernel(
    chunks, per_tensor, numels, done, step_ptrs,
    p_ptrs, g_ptrs, buf_ptrs, out_ptrs, p_base, g_base, out_base, s_base, seed_ptrs,
    lr_ptr, lr: tl.float64, momentum: tl.float64, one_minus_dampening: tl.float64, weight_decay: tl.float64,
    grad_scale_ptr, clip_value: tl.float64, clip_coef_ptr, found_inf_ptr,
    COMPUTE: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, L2: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_COEF: tl.constexpr, HAS_FOUND_INF: tl.constexpr, S_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
    STORE: tl.constexpr, BLOCK: tl.constexpr,
):
    update_chunk(_sgd_scalars, _sgd_block, (lr_ptr, lr, momentum, one_minus_dampening, weight_decay),
                 chunks, per_tensor, numels, done, step_ptrs, p_base, g_base, out_base, s_base, p_ptrs, g_ptrs,
                 buf_ptrs, p_ptrs, p_ptrs, out_ptrs, seed_ptrs, grad_scale_ptr, clip_value, clip_coef_ptr,
                 found_inf_ptr,
                 (COMPUTE, P_DTYPE, OUT_DTYPE, MAXIMIZE, MASTER, HAS_SCALE, HAS_CLIP, HAS_COEF, S_DTYPE, STOCHASTIC,
                  STORE, LR_IS_PTR),
                 (L2, MOMENTUM, NESTEROV), (MOMENTUM, False, False), HAS_FOUND_INF, BLOCK)


def sgd_step(plan, *, lr, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
             grad_scale=None, clip_value=None, clip_coef=None, found_inf=None) -> None:
    """One SGD step over ``plan`` (slots params, grads, momentum_buffers, params_out) in one launch."""
    if len(plan) == 0:
        return
    args, meta = launch_args(plan, lr, grad_scale, clip_value, clip_coef, found_inf, maximize, "momentum_buffers")
    _sgd_kernel[(plan.update_chunks,)](
        *args["tables"], plan.ptrs["params"], plan.ptrs["grads"], plan.ptrs["momentum_buffers"],
        plan.ptrs["params_out"], *args["bases"], *args["lr"], momentum,
        1.0 - dampening, weight_decay, *args["grad"],
        L2=weight_decay != 0, MOMENTUM=momentum != 0, NESTEROV=momentum != 0 and nesterov, **meta,
    )
