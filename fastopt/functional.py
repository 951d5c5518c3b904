"""The functional step, as torch.optim's ``adam()`` is to ``torch.optim.Adam``: one step of a rule
over a plan (fastopt/_plan.py), written once for every rule and backend, top to bottom:

    bind ──> grad transform ──> norm ──> clip coefficient ──> update ──> release

The optimizer classes (fastopt/optim/) own the state, the plan and its life cycle, and call this;
the backends are executors (Note [backends are executors], backends/base.py) that it drives through
their protocol, per bucket. Nothing here reads a tensor's value on the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from . import _distributed
from . import reference as ref
from ._plan import Plan, StepStats
from .backends import GradTransform
from .rules import Rule

if TYPE_CHECKING:  # fastopt.optim imports this module
    from .optim._options import FusedOptions


def bind(plan: Plan) -> Optional[StepStats]:
    """Every bucket takes this step's grads; None when one of them found the plan stale (the caller
    re-plans). Raises, with nothing written, for a grad the kernels must not read."""
    stats = StepStats()
    return stats if all(b.backend.bind(b, stats) for b in plan.buckets) else None


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=True)


def grad_transforms(plan: Plan, options: FusedOptions, grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> list[GradTransform]:
    """What is done to each bucket's grads before its update: GradScaler's unscale and skip flag
    (or-ed over the ranks of DTensor shards), the value clip; the clip coefficient comes next."""
    if found_inf is not None and plan.sharded:
        found_inf = _distributed.found_inf_on_any_rank(found_inf, plan)
    return [GradTransform(grad_scale=_on(grad_scale, b.device), clip_value=options.clip_value,
                          found_inf=_on(found_inf, b.device)) for b in plan.buckets]


def grad_norm_and_coef(plan: Plan, xforms: list[GradTransform], options: FusedOptions) -> tuple[Tensor, Tensor]:
    """The total norm of the transformed grads over every bucket (and rank) and the clip
    coefficient min(max_norm / (norm + 1e-6), 1): with one bucket of plain tensors the backend may
    compute both at once (one launch on a GPU)."""
    norm_type, max_norm = options.norm_type, options.max_grad_norm
    if len(plan.buckets) == 1 and not plan.sharded:
        b = plan.buckets[0]
        return b.backend.norm_and_coef(b, norm_type, xforms[0], max_norm)
    norms = [_distributed.norm_over_shards(b, b.backend.grad_norm(b, norm_type, x), norm_type)
             for b, x in zip(plan.buckets, xforms)]
    norm = ref.norm_of_norms(norms, norm_type)
    return norm, ref.clip_coefficient(norm, max_norm)


def check_finite(norm: Tensor, found_inf: Optional[Tensor], norm_type: float) -> None:
    """``error_if_nonfinite``: clip_grad_norm_'s error (one host sync), before anything is
    written; not when a GradScaler skips the step anyway."""
    bad = ~torch.isfinite(norm)
    if found_inf is not None:
        bad = bad & (found_inf.to(bad.device) == 0)
    if bool(bad):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`")


def step(plan: Plan, rule: Rule, hyper: Callable[[dict], dict], options: FusedOptions, *,
         grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
         before_update: Optional[Callable[[], None]] = None) -> Optional[Tensor]:
    """One step of ``rule`` over a plan whose grads are bound (``bind``): ``hyper(group)`` gives a
    param group's hyperparameters (lr and the rule's ``Rule.hyper``). Returns the total grad norm
    before clipping when ``options`` clip it (else None). Every check runs before the first write;
    ``before_update`` runs after them, just before the update (master weights are re-seeded there)."""
    xforms = grad_transforms(plan, options, grad_scale, found_inf)
    norm = None
    if options.clips_norm:
        norm, coef = grad_norm_and_coef(plan, xforms, options)
        if options.error_if_nonfinite:
            check_finite(norm, found_inf, options.norm_type)
        for b, x in zip(plan.buckets, xforms):
            x.clip_coef = _on(coef, b.device)
    if before_update is not None:
        before_update()
    for b, x in zip(plan.buckets, xforms):
        b.backend.step(rule, b, [hyper(s.group) for s in b.segments], x)  # and releases the grads
    return norm
