"""Built-in clipping against torch.nn.utils.clip_grad_value_/clip_grad_norm_ followed by the step."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close, skip_unsupported
from harness import assert_matches, run_lockstep
from specs import NAMES, SPEC_BY_NAME, TOL, make_params

CASES = [
    # (max_grad_norm, norm_type, clip_value): clipping active, inactive, inf norm, value clip first
    (1.0, 2.0, None),
    (1e6, 2.0, None),  # the no-clip case: coefficient clamps to 1
    (0.5, math.inf, None),
    (1.0, 2.0, 0.5),
    (None, 2.0, 0.5),
    (0.0, 2.0, None),  # max_norm 0 zeroes the update direction, as clip_grad_norm_ does
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("max_norm,norm_type,clip_value", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_torch_clipping(name, max_norm, norm_type, clip_value, dtype, backend, device):
    skip_unsupported(backend, dtype)
    spec = SPEC_BY_NAME[name]
    norms = []

    def clip(params):
        params = [p for p in params if p.numel() > 0]  # torch's inf-norm refuses empty tensors
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))

    extras = {"max_grad_norm": max_norm, "norm_type": norm_type, "clip_value": clip_value}
    steps = 20
    opt_t, opt_f, theirs, ours = run_lockstep(
        spec, {"weight_decay": 0.1, **spec.stateful}, dtype=dtype, device=device, backend=backend, steps=steps,
        extras=extras, before_torch_step=clip,
    )
    assert_matches(opt_f, opt_t, ours, theirs, dtype)
    if max_norm is None:
        assert opt_f.last_grad_norm is None
    else:
        # the norm itself: fp32 sums of ~4000 squares reduced in a different order than torch's
        # differ by ~sqrt(n) ulps, well under 1e-5 relative; fp64 per TOL.
        tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=0)
        assert_close(opt_f.last_grad_norm, norms[-1].to(dtype), **tol, what="last_grad_norm")


def test_norm_spans_all_groups_and_is_a_device_tensor(backend, device):
    params = make_params(torch.float32, device)
    opt = SPEC_BY_NAME["Adam"].fastopt_cls(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], max_grad_norm=1.0, backend=backend
    )
    for p in params:
        p.grad = torch.randn_like(p)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    grads_before = [p.grad.clone() for p in params]
    opt.step()
    assert isinstance(opt.last_grad_norm, torch.Tensor) and opt.last_grad_norm.device.type == device
    assert_close(opt.last_grad_norm, expected, rtol=1e-5, atol=0, what="norm over both groups")
    for p, g in zip(params, grads_before):  # fastopt clips on the fly; .grad is left as it was
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nonfinite_grads_propagate_like_torch(norm_type, backend, device):
    """Without a GradScaler a NaN/inf gradient goes through clipping exactly as in torch."""
    spec = SPEC_BY_NAME["Adam"]

    params = make_params(torch.float32, device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_t = torch.optim.Adam(theirs, foreach=False)
    opt_f = spec.fastopt_cls(ours, max_grad_norm=1.0, norm_type=norm_type, backend=backend)
    for ps in (theirs, ours):
        for p in ps:
            p.grad = torch.ones_like(p)
        ps[1].grad[2] = float("inf")
    norm = torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], 1.0, norm_type)
    opt_t.step()
    opt_f.step()
    assert_close(opt_f.last_grad_norm, norm, rtol=0, atol=0, what="non-finite norm")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, **TOL[torch.float32], what=f"param {i}")
