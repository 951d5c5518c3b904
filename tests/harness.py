"""Lockstep runs of a torch.optim optimizer and its fastopt twin, and their comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from conftest import assert_close
from specs import TOL, clone_params, error_bound, make_params, materialize, random_grads


def set_grads(params, grads) -> None:
    """``p.grad = g.clone()`` for each pair, as users assign grads (None: no grad this step)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


@dataclass
class Side:
    """One optimizer of a lockstep run and its params; ``cast`` makes its grads from the shared
    ones (a dtype, say), ``give(params, grads)`` puts them on the params (default set_grads;
    a CUDA graph's side copies into the captured buffers), ``step()`` runs its step (default
    ``opt.step``: a compiled step, a graph replay, clipping before torch's step), ``backend``
    (fastopt's) is checked after every step with assert_ran_on."""

    opt: Any
    params: list
    cast: Optional[Callable] = None
    backend: Optional[str] = None
    give: Callable = set_grads
    step: Optional[Callable] = None


def lockstep(sides: list[Side], like: Optional[list] = None, steps: int = 20, *,
             grads: Optional[Callable] = None, before_step: Optional[Callable] = None,
             after_step: Optional[Callable] = None) -> None:
    """The one lockstep loop: ``steps`` times, this step's grads given to every side (cast per
    side), then ``before_step(step)`` (to drop or change a grad), every side's step in order, and
    ``after_step(step)`` (a scheduler's step, checks, zero_grad). The grads are ``grads(step)``:
    a list (None entries: no grad), or None when the callable put them on the params itself (a
    backward through each side's params); by default fresh random grads shaped and laid out like
    ``like`` (random_grads keeps strides)."""
    for step in range(steps):
        shared = random_grads(like) if grads is None else grads(step)
        if shared is not None:
            for side in sides:
                side.give(side.params, shared if side.cast is None else
                          [None if g is None else side.cast(g) for g in shared])
        if before_step is not None:
            before_step(step)
        for side in sides:
            (side.step or side.opt.step)()
            if side.backend is not None:
                assert_ran_on(side.opt, side.backend)
        if after_step is not None:
            after_step(step)


def run_lockstep(spec, config, *, dtype, device, backend, steps=20, extras=None,
                 before_torch_step: Optional[Callable] = None, params=None):
    """Run torch.optim (foreach=False) and fastopt on identical params and grads for ``steps``."""
    params = params if params is not None else make_params(dtype, device)
    theirs, ours = clone_params(params), clone_params(params)
    hdtype = dtype if dtype is not None else torch.float32
    opt_t = spec.torch_cls(theirs, foreach=False, **materialize(spec, config, hdtype))
    opt_f = spec.fastopt_cls(ours, backend=backend, **materialize(spec, config, hdtype), **(extras or {}))
    before = None if before_torch_step is None else (lambda step: before_torch_step(theirs))
    lockstep([Side(opt_t, theirs), Side(opt_f, ours, backend=backend)], params, steps, before_step=before)
    return opt_t, opt_f, theirs, ours


PLANNED_BACKENDS = ("cpu", "triton", "cuda")


def assert_ran_on(opt_f, backend) -> None:
    """The last step updated every param with a grad where ``backend`` sends it: its compiled
    kernels for the planned backends (not a silent fallback to the reference), the reference
    rules for backend='reference' (Note [the plan life cycle])."""
    stats = opt_f.step_stats
    if backend in PLANNED_BACKENDS:
        assert stats.reference == 0 and stats.kernel > 0, f"{backend}: the step fell back: {stats}"
    else:
        assert stats.kernel == 0 and stats.reference > 0, stats


def assert_same_state(opt_f, opt_t, *, rtol, atol) -> None:
    """Every state key of torch's state dict exists in fastopt's with close values."""
    sf, st = opt_f.state_dict()["state"], opt_t.state_dict()["state"]
    assert sf.keys() == st.keys(), f"state entries {sorted(sf)} != {sorted(st)}"
    for pid, tstate in st.items():
        fstate = {k: v for k, v in sf[pid].items() if k != "master_param"}
        assert fstate.keys() == tstate.keys(), f"param {pid}: keys {list(fstate)} != {list(tstate)}"
        for key, expected in tstate.items():
            actual = fstate[key]
            if key == "step":
                assert float(actual) == float(expected), f"param {pid}: step {actual} != {expected}"
                continue
            assert_close(actual, expected.to(actual.device), rtol=rtol, atol=_scaled(atol, expected),
                         what=f"param {pid} {key}")


def _scaled(atol: float, expected) -> float:
    """Note [absolute tolerance scales with the tensor]: an element near zero can be the difference
    of terms as large as the tensor's largest entries (a momentum buffer is a sum of g/avg terms of
    ~10), so its rounding error is a few ulps of those terms, not of the result."""
    finite = expected[expected.isfinite()] if expected.numel() else expected
    peak = finite.abs().max().item() if finite.numel() else 0.0
    return atol * max(1.0, peak)


def assert_same_params(ours, theirs, *, rtol, atol) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, rtol=rtol, atol=_scaled(atol, b.detach().cpu()), what=f"param {i}")


def assert_matches(opt_f, opt_t, ours, theirs, dtype) -> None:
    assert_same_params(ours, theirs, **TOL[dtype])
    assert_same_state(opt_f, opt_t, **TOL[dtype])


def assert_as_accurate_as_torch(exact, ours, theirs, dtype, roundings: int) -> None:
    """fastopt's params (``ours``) are as close to a float64 run (``exact``) as torch.optim's
    (``theirs``) in ``dtype``, within specs.error_bound. Where torch's own float16 result is not
    finite (fp16 Adam: eps=1e-8 rounds to 0 in fp16 and torch overflows to NaN), fastopt's float32
    math must still be."""
    for i, (e, a, b) in enumerate(zip(exact, ours, theirs)):
        if e.numel() == 0:
            continue
        ours_err = (a.double() - e).abs().max().item()
        torch_err = (b.double() - e).abs().max().item()
        if dtype == torch.float16 and not math.isfinite(torch_err):
            assert math.isfinite(ours_err), f"param {i}: fastopt is not finite either"
            continue
        bound = error_bound(dtype, torch_err, e.abs().max().item(), roundings)
        assert ours_err <= bound, f"param {i}: fastopt err {ours_err:.3g}, torch err {torch_err:.3g}"

