"""Every optimizer × torch's OptimizerInfo inputs (and more), against torch.optim and float64."""

from __future__ import annotations

import pytest
import torch

from conftest import skip_unsupported
from harness import Side, assert_as_accurate_as_torch, assert_matches, lockstep, run_lockstep
from specs import SPEC_BY_NAME, SPECS, clone_params, make_params, materialize, spec_cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("spec,config", spec_cases())
def test_matches_torch(spec, config, dtype, backend, device):
    skip_unsupported(backend, dtype)
    opt_t, opt_f, theirs, ours = run_lockstep(spec, config, dtype=dtype, device=device, backend=backend)
    assert_matches(opt_f, opt_t, ours, theirs, dtype)


@pytest.mark.parametrize("spec,config", spec_cases())
def test_fp32_error_vs_fp64_reference(spec, config, backend, device):
    """fastopt in fp32 is at most 2x as far from a float64 run as torch.optim in fp32 (+ a floor
    of a few fp32 ulps, for configs where both agree with fp64 to rounding)."""
    params64 = make_params(torch.float64, device)
    params32 = [torch.nn.Parameter(p.detach().float()) for p in params64]
    exact = clone_params(params64)
    opt64 = spec.fastopt_cls(exact, backend="reference", **materialize(spec, config))
    ours, theirs = clone_params(params32), clone_params(params32)
    opt_f = spec.fastopt_cls(ours, backend=backend, **materialize(spec, config))
    opt_t = spec.torch_cls(theirs, foreach=False, **materialize(spec, config))
    lockstep([Side(opt64, exact, cast=torch.Tensor.double), Side(opt_f, ours, backend=backend), Side(opt_t, theirs)],
             params32)
    assert_as_accurate_as_torch(exact, ours, theirs, torch.float32, roundings=4)


def test_two_param_groups(backend, device):
    spec = SPEC_BY_NAME["Adam"]
    params = make_params(torch.float32, device)
    theirs, ours = clone_params(params), clone_params(params)

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.1, "weight_decay": 0.5, "amsgrad": True}]

    opt_t = torch.optim.Adam(groups(theirs), lr=0.01, foreach=False)
    opt_f = spec.fastopt_cls(groups(ours), lr=0.01, backend=backend)
    lockstep([Side(opt_t, theirs), Side(opt_f, ours, backend=backend)], params)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


def test_params_without_grad_are_untouched(backend, device):
    params = make_params(torch.float32, device)
    ours, theirs = clone_params(params), clone_params(params)
    opt_f = SPEC_BY_NAME["RMSprop"].fastopt_cls(ours, momentum=0.5, backend=backend)
    opt_t = torch.optim.RMSprop(theirs, momentum=0.5, foreach=False)
    def drop_a_grad(step):
        if step % 3 == 0:  # the set of params with grads changes: the plan must follow
            ours[2].grad = None
            theirs[2].grad = None

    lockstep([Side(opt_f, ours, backend=backend), Side(opt_t, theirs)], params, 10, before_step=drop_a_grad)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_step_with_closure_returns_loss(name, backend, device):
    w = torch.nn.Parameter(torch.randn(5, device=device))
    opt = getattr(__import__("fastopt"), name)([w], backend=backend)
    before = w.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx((before ** 2).sum().item())
    assert not torch.equal(w.detach(), before)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_complex_params_match_torch(name, dtype, backend, device):
    skip_unsupported(backend, dtype)
    spec = SPEC_BY_NAME[name]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in [(3,), (4, 5)]]
    params.append(torch.nn.Parameter(torch.randn(6, dtype=torch.float32 if dtype == torch.complex64
                                                 else torch.float64, device=device)))
    config = {"weight_decay": 0.1, **spec.stateful}
    opt_t, opt_f, theirs, ours = run_lockstep(
        spec, config, dtype=None, device=device, backend=backend, params=params
    )
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    assert_matches(opt_f, opt_t, ours, theirs, real)
