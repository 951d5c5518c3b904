"""The cross-rank parts of a step over DTensor shards (Note [DTensor shards], fastopt/_plan.py):
the gradient norm of sharded buckets and GradScaler's skip flag, reduced over the ranks that hold
the shards. No host sync: every reduction is an all-reduce of a device tensor."""

from __future__ import annotations

import math

import torch.distributed as dist
from torch import Tensor

from ._plan import Bucket, Plan, is_dtensor


def norm_over_shards(bucket: Bucket, norm: Tensor, norm_type: float) -> Tensor:
    """A bucket's gradient norm over every rank: for a bucket of DTensor shards the norm of this
    rank's shards reduced over the mesh dims the params are sharded on, as DTensor reduces a norm
    (p-th powers summed, or the max for inf); replicated dims hold copies and are left out. One
    all-reduce per sharded mesh dim. A bucket of DTensors on the reference rules has a DTensor
    norm: its value, to combine with the others."""
    if bucket.spec is None:
        return norm.full_tensor() if is_dtensor(norm) else norm
    mesh, placements = bucket.spec
    dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not dims:
        return norm
    inf = math.isinf(norm_type)
    t = norm.clone() if inf else norm ** norm_type
    for dim in dims:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return t if inf else t ** (1.0 / norm_type)


def found_inf_on_any_rank(found_inf: Tensor, plan: Plan) -> Tensor:
    """GradScaler's found_inf of this rank, or-ed over the ranks that hold the DTensor shards of
    the plan: every rank skips the step when any rank's grads hold an inf or NaN, so the shards of
    one param never part ways. (GradScaler computes found_inf from this rank's shards only; its
    scale update stays per rank, as with torch.optim.)"""
    out = found_inf.clone()
    seen = set()
    for b in plan.buckets:
        if b.spec is None or id(b.spec[0]) in seen:
            continue
        seen.add(id(b.spec[0]))
        mesh = b.spec[0]
        for dim in range(mesh.ndim):
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return out
