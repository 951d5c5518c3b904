"""torch.amp.GradScaler: fastopt unscales inside the step and skips it when inf/NaN was found."""

from __future__ import annotations

import copy

import pytest
import torch

from harness import assert_same_params, assert_same_state
from specs import NAMES, SPEC_BY_NAME, TOL

INF_STEP = 3  # the step whose gradient gets an injected inf


def _model(device):
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)


def _train(model, opt, scaler, *, steps, clip=None, fastopt_clip=False):
    """torch's AMP recipe; ``clip`` is torch's unscale_ + clip_grad_norm_ before the step."""
    torch.manual_seed(1)
    snapshots = []
    for step in range(steps):
        x = torch.randn(32, 8, device=next(model.parameters()).device)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == INF_STEP:
            next(model.parameters()).grad.view(-1)[5] = float("inf")
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()])
        scaler.step(opt)
        scaler.update()
        snapshots.append(before)
    return snapshots


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("recipe", ["plain", "torch-clip", "fastopt-clip"])
def test_grad_scaler_matches_torch(name, recipe, backend, device):
    spec = SPEC_BY_NAME[name]
    torch.manual_seed(0)
    model_t = _model(device)
    model_f = copy.deepcopy(model_t)
    opt_t = spec.torch_cls(model_t.parameters(), lr=spec.lr, foreach=False, **spec.stateful)
    extras = {"max_grad_norm": 0.5} if recipe == "fastopt-clip" else {}
    opt_f = spec.fastopt_cls(model_f.parameters(), lr=spec.lr, backend=backend, **spec.stateful, **extras)
    scaler_t = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    scaler_f = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)

    _train(model_t, opt_t, scaler_t, steps=8, clip=None if recipe == "plain" else 0.5)
    _train(model_f, opt_f, scaler_f, steps=8, clip=0.5 if recipe == "torch-clip" else None)

    assert scaler_f.get_scale() == scaler_t.get_scale()
    assert_same_params(list(model_f.parameters()), list(model_t.parameters()), **TOL[torch.float32])
    assert_same_state(opt_f, opt_t, **TOL[torch.float32])
    # Steps are counted only where no inf was found.
    assert all(float(s["step"]) == 7 for s in opt_f.state_dict()["state"].values() if "step" in s)  # (SGD keeps none)
    assert opt_f.state_dict()["state"], "the optimizer kept no state"


@pytest.mark.parametrize("name", NAMES)
def test_inf_step_changes_nothing(name, backend, device):
    spec = SPEC_BY_NAME[name]
    torch.manual_seed(0)
    model = _model(device)
    opt = spec.fastopt_cls(model.parameters(), lr=spec.lr, backend=backend, max_grad_norm=1.0, **spec.stateful)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    # Run up to and including the inf step, then compare with the snapshot taken before it.
    snaps = _train(model, opt, scaler, steps=INF_STEP + 1)
    state_before, params_before = snaps[INF_STEP]
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), before), "a parameter changed on a skipped step"
    state_after = opt.state_dict()["state"]
    for pid, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(state_after[pid][key], value), f"state {key} changed on a skipped step"
    assert not torch.isfinite(opt.last_grad_norm)


def test_grad_scaler_step_unscales_inside_the_step(backend, device):
    """GradScaler.step is told that the step unscales (Note [who is told that the step
    unscales]): it hands over grad_scale instead of dividing the grads in place, so the grads are
    still scaled after the step; the update is the unscaled one (test_grad_scaler_matches_torch)."""
    torch.manual_seed(0)
    model = _model(device)
    opt = SPEC_BY_NAME["Adam"].fastopt_cls(model.parameters(), lr=1e-3, backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    scaler.scale(model(torch.randn(4, 8, device=device)).pow(2).mean()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads)), "GradScaler unscaled the grads"
    assert opt.step_stats.kernel + opt.step_stats.reference == len(grads)


def test_others_are_told_the_step_does_not_unscale():
    """Anyone but GradScaler.step reads False, as from torch's non-fused optimizers: Lightning's
    mixed-precision plugin then allows gradient_clip_val and unscales before clipping."""
    opt = SPEC_BY_NAME["Adam"].fastopt_cls([torch.nn.Parameter(torch.zeros(2))])
    assert opt._step_supports_amp_scaling is False
    assert getattr(opt, "_step_supports_amp_scaling", True) is False
    opt._step_supports_amp_scaling = True  # a user's explicit setting wins, for every caller
    assert opt._step_supports_amp_scaling is True
