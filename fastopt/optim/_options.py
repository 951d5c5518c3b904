"""The fastopt extras shared by every optimizer (DESIGN.md, Public API contract)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends

COMPENSATIONS = (None, "kahan", "stochastic")
_TORCH_FLAGS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
_EXTRAS = {
    "max_grad_norm": None,
    "norm_type": 2.0,
    "clip_value": None,
    "error_if_nonfinite": False,
    "master_weights": False,
    "state_dtype": None,
    "compensation": None,
    "backend": "auto",
    **_TORCH_FLAGS,
}


@dataclass(frozen=True)
class FusedOptions:
    """Optimizer-wide settings: they apply to all param groups and are not part of the state dict."""

    max_grad_norm: Optional[float] = None
    norm_type: float = 2.0
    clip_value: Optional[float] = None
    error_if_nonfinite: bool = False
    master_weights: bool = False
    # torch.bfloat16: the rule's state tensors (moments, sums, buffers) are stored in bfloat16,
    # computed in float32 and written back with deterministic stochastic rounding (Note
    # [stochastic state], csrc/include/fastopt/update_math.h); None: the params' dtype (float32
    # with master weights), as torch.optim
    state_dtype: Optional[torch.dtype] = None
    # how float16/bfloat16 params without master weights are stored (Note [param store],
    # csrc/include/fastopt/update_math.h): None, round to nearest (torch.optim); "kahan", with a
    # compensation buffer of the param's dtype (state["compensation"]); "stochastic" (bfloat16
    # params), stochastic rounding keyed by state["seed"]. Other params are stored as without it.
    compensation: Optional[str] = None
    backend: str = "auto"

    @property
    def clips_norm(self) -> bool:
        return self.max_grad_norm is not None


def parse_extras(owner: str, extras: dict) -> tuple[FusedOptions, dict]:
    """Validate the keyword extras of ``owner`` (a class name); return the fastopt options and
    torch's own flags (``foreach``, ``fused``, ``capturable``, ``differentiable``)."""
    unknown = sorted(set(extras) - set(_EXTRAS))
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    values = {**_EXTRAS, **extras}
    flags = {k: values[k] for k in _TORCH_FLAGS}
    if flags["differentiable"]:
        raise NotImplementedError(
            f"fastopt.{owner} does not support differentiable=True (autograd through the optimizer "
            f"step); use torch.optim.{owner}(..., differentiable=True) for that"
        )
    if flags["fused"] and flags["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    max_grad_norm, norm_type, clip_value = values["max_grad_norm"], values["norm_type"], values["clip_value"]
    if max_grad_norm is not None and not (0.0 <= float(max_grad_norm) < math.inf):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (expected a finite number >= 0 or None)")
    if float(norm_type) not in (2.0, math.inf):
        raise ValueError(f"Invalid norm_type: {norm_type} (fastopt supports 2.0 and inf)")
    if clip_value is not None and not (0.0 <= float(clip_value) < math.inf):
        raise ValueError(f"Invalid clip_value: {clip_value} (expected a finite number >= 0 or None)")
    if not isinstance(values["error_if_nonfinite"], bool):
        raise TypeError(f"error_if_nonfinite must be a bool, got {values['error_if_nonfinite']!r}")
    if values["error_if_nonfinite"] and max_grad_norm is None:
        raise ValueError("error_if_nonfinite=True needs max_grad_norm (it is about the norm that clipping computes)")
    if not isinstance(values["master_weights"], bool):
        raise TypeError(f"master_weights must be a bool, got {values['master_weights']!r}")
    if values["state_dtype"] not in (None, torch.bfloat16):
        raise ValueError(f"Invalid state_dtype: {values['state_dtype']!r} (expected None or torch.bfloat16)")
    if values["compensation"] not in COMPENSATIONS:
        raise ValueError(f"Invalid compensation: {values['compensation']!r} (expected one of {COMPENSATIONS})")
    if values["compensation"] is not None and values["master_weights"]:
        raise ValueError(f"compensation={values['compensation']!r} cannot be combined with master_weights=True: "
                         "the compensation stands in for the float32 master weights (choose one)")
    if values["backend"] not in backends.NAMES:
        raise ValueError(f"Invalid backend: {values['backend']!r} (expected one of {backends.NAMES})")
    options = FusedOptions(
        max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
        norm_type=float(norm_type),
        clip_value=None if clip_value is None else float(clip_value),
        error_if_nonfinite=values["error_if_nonfinite"],
        master_weights=values["master_weights"],
        state_dtype=values["state_dtype"],
        compensation=values["compensation"],
        backend=values["backend"],
    )
    return options, flags
