"""Arguments every update launch shares: tables, the learning rate, the gradient transform, and
the constexpr specialization (dtypes and flags)."""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton.language as tl
from torch import Tensor

from .multi_tensor import BLOCK

# a plan's compensation (Note [param store], update_math.h) as the kernels' STORE constexpr
STORES = {None: 0, "kahan": 1, "stochastic": 2}

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


def tl_dtype(dtype: Optional[torch.dtype]):
    if dtype is None:
        return tl.float32  # an absent slot: never loaded
    if dtype not in TL_DTYPES:
        raise TypeError(f"fastopt (triton): {dtype} tensors are not supported (float64, float32, float16, bfloat16)")
    return TL_DTYPES[dtype]


def _device_scalar(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=True)


def launch_args(plan, lr: Union[float, Tensor], grad_scale: Optional[Tensor], clip_value: Optional[float],
                clip_coef: Optional[Tensor], found_inf: Optional[Tensor], maximize: bool,
                state_slot: str) -> tuple[dict, dict]:
    """The arguments and constexprs every update kernel takes; ``state_slot``: the rule's first state
    slot, whose dtype is the state's (Note [one walk per chunk], common.py)."""
    dev = plan.device
    dummy = plan.done  # any device tensor, for pointer arguments a kernel does not read
    if isinstance(lr, Tensor) and lr.device == dev:
        lr_args, lr_is_ptr = (lr, 0.0), True  # read on the device each launch: CUDA-graph safe
    else:
        # a Python float, or a CPU tensor for device params (reading it is no device sync)
        lr_args, lr_is_ptr = (dummy, float(lr)), False  # a float64 argument (tl.float64)
    grad_scale = _device_scalar(grad_scale, dev)
    clip_coef = _device_scalar(clip_coef, dev)
    found_inf = _device_scalar(found_inf, dev)
    args = {
        # Note [one program per chunk of a range] (common.py)
        "tables": (plan.range_chunks, plan.range_per_tensor, plan.numels, plan.done, plan.step_ptrs),
        "lr": lr_args,
        # p_base, g_base, out_base, s_base (Note [aligned bodies]) and the seed table
        "bases": (*plan.bases("params", "grads", "params_out", state_slot),
                  dummy if plan.seeds is None else plan.seeds),
        "lr_is_ptr": lr_is_ptr,
        "grad": (dummy if grad_scale is None else grad_scale, 0.0 if clip_value is None else float(clip_value),
                 dummy if clip_coef is None else clip_coef, dummy if found_inf is None else found_inf),
    }
    meta = {
        # float64 params compute in float64, all others in float32 (Note [exact math in Triton])
        "COMPUTE": tl.float64 if plan.dtypes["params"] == torch.float64 else tl.float32,
        "P_DTYPE": tl_dtype(plan.dtypes["params"]),
        "G_DTYPE": tl_dtype(plan.dtypes["grads"]),
        "OUT_DTYPE": tl_dtype(plan.dtypes["params_out"]),
        "MASTER": plan.master,
        "S_DTYPE": tl_dtype(plan.dtypes[state_slot] or plan.dtypes["params"]),
        # Note [stochastic stores in Triton] (common.py)
        "STOCHASTIC": plan.stochastic_state,
        "STORE": STORES[plan.compensation],
        "LR_IS_PTR": lr_is_ptr,
        "MAXIMIZE": maximize,
        "HAS_SCALE": grad_scale is not None,
        "HAS_CLIP": clip_value is not None,
        "HAS_COEF": clip_coef is not None,
        "HAS_FOUND_INF": found_inf is not None,
        "BLOCK": BLOCK,
        # Note [no FMA contraction]: Triton's default changes in 3.10; fixing it keeps the bits the
        # same across Triton 3.6-3.9+ and each multiply and add rounded as the reference does.
        "enable_fp_fusion": False,
    }
    return args, meta
