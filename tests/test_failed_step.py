"""A step that raises changes nothing (DESIGN.md, Safety; #14): no param moves, no state value or
step count changes, no state is created, and once the cause is gone the next step is the step an
optimizer that never saw the failure takes.

Every error that ``step()`` can raise is made here on the *last* param of the *last* bucket (two
param groups, float32 and float64 params: several buckets), so an implementation that checked a
bucket only when it got to it would already have stepped the others.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastopt
from specs import TOL

OPTIMIZERS = {
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),
    "SGD": dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1),
}


def _params(device):
    torch.manual_seed(0)
    make = lambda *shape, dtype=torch.float32: torch.nn.Parameter(torch.randn(*shape, dtype=dtype, device=device))
    first = [make(3, 4), make(3)]
    transposed = torch.nn.Parameter(torch.randn(5, 2, device=device).t())  # non-contiguous
    second = [transposed, make(0), make(2, dtype=torch.float64), make(4, dtype=torch.float64)]
    return first, second


def _grads(params, seed):
    torch.manual_seed(seed)
    for p in params:
        p.grad = torch.randn_like(p)


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(opt, params, snap):
    before_params, before_state = snap
    for i, (p, b) in enumerate(zip(params, before_params)):
        assert torch.equal(p.detach(), b), f"param {i} moved"
    after = {id(p): s for p, s in opt.state.items() if s}
    assert after.keys() == before_state.keys(), "params with state changed"
    for pid, state in after.items():
        assert state.keys() == before_state[pid].keys(), "state keys changed"
        for k, v in state.items():
            assert torch.equal(v, before_state[pid][k]), f"state {k!r} changed"


def _step_fails_writing_nothing(opt, params, error, match):
    """The step raises ``error``; no param or state changed, the faulty last param's taken as the
    fault left it."""
    snap = _snapshot(opt, params[:-1])
    last = (params[-1].detach().clone(), {k: v.clone() for k, v in opt.state.get(params[-1], {}).items()})
    with pytest.raises(error, match=match):
        opt.step()
    _assert_unchanged(opt, params[:-1], snap)
    assert torch.equal(params[-1].detach(), last[0]), "the faulty param moved"
    state = opt.state.get(params[-1], {})
    assert state.keys() == last[1].keys() and all(torch.equal(v, last[1][k]) for k, v in state.items())


def _next_step_is_the_twins(opt, params, twin, twin_params, saved):
    """The cause gone (the last param's data back, its grad made again), the next step is the one
    the twin, which never saw the failure, takes: bit for bit, params and state."""
    params[-1].grad = None
    params[-1].data = saved
    _grads(params, 3)
    _grads(twin_params, 3)
    opt.step()
    twin.step()
    for i, (p, q) in enumerate(zip(params, twin_params)):
        assert torch.equal(p.detach(), q.detach()), f"param {i} differs from the twin's"
    for p, q in zip(params, twin_params):
        assert opt.state[p].keys() == twin.state[q].keys()
        for key, value in twin.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert opt.step_stats.kernel + opt.step_stats.reference == len(params)


# Each fault: (applies to, what it does to the last param, torch's kind of error, message). None
# as "applies to" means every optimizer; "later" faults need state from an earlier step.
def _grad_dtype(p):
    p.grad.data = p.grad.data.to(torch.float32 if p.dtype == torch.float64 else torch.float64)


def _grad_shape(p):
    p.grad.data = torch.randn(p.numel() + 3, dtype=p.dtype, device=p.device)


def _param_dtype(p):
    p.data = p.data.float()
    p.grad = torch.randn_like(p)


def _param_shape(p):
    p.data = torch.randn(p.numel() + 2, dtype=p.dtype, device=p.device)
    p.grad = torch.randn_like(p)


def _sparse_grad(p):
    p.grad = torch.randn_like(p).to_sparse()


def _inf_grad(p):
    p.grad[0] = math.inf


FAULTS = {
    "grad of another dtype": (None, _grad_dtype, RuntimeError, "dtype"),
    "grad of another shape": (None, _grad_shape, RuntimeError, "shape"),
    "param dtype changed after its state was made": (None, _param_dtype, RuntimeError, "state|dtype"),
    "param shape changed after its state was made": (None, _param_shape, RuntimeError, "state|shape"),
    "sparse grad": ({"Adam", "AdamW", "RMSprop"}, _sparse_grad, RuntimeError, "sparse"),
    "sparse grad with clipping": ({"Adagrad"}, _sparse_grad, NotImplementedError, "sparse"),
    "sparse grad with momentum": ({"SGD"}, _sparse_grad, NotImplementedError, "sparse"),
    "non-finite norm with error_if_nonfinite": (None, _inf_grad, RuntimeError, "non-finite"),
}
LATER_ONLY = {"param dtype changed after its state was made", "param shape changed after its state was made"}


def _cases():
    for fault, (names, *_rest) in FAULTS.items():
        for name in sorted(OPTIMIZERS):
            if names is not None and name not in names:
                continue
            for when in ("first step", "later step"):
                if when == "first step" and fault in LATER_ONLY:
                    continue
                yield pytest.param(name, fault, when, id=f"{name}-{fault}-{when}")


@pytest.mark.parametrize("name,fault,when", list(_cases()))
def test_a_failed_step_changes_nothing(name, fault, when, backend, device):
    _, make_fault, error, match = FAULTS[fault]
    first, second = _params(device)
    params = first + second
    extras = {"max_grad_norm": 1.0} if "clipping" in fault else {}
    if "error_if_nonfinite" in fault:
        extras = {"max_grad_norm": 1.0, "error_if_nonfinite": True}
    opt = getattr(fastopt, name)([{"params": first}, {"params": second, "lr": 0.005}], backend=backend,
                                 **OPTIMIZERS[name], **extras)
    if when == "later step":
        for seed in (1, 2):
            _grads(params, seed)
            opt.step()
    twin_params, twin = copy.deepcopy((params, opt))  # never sees the failure

    _grads(params, 3)
    saved = params[-1].data
    make_fault(params[-1])
    _step_fails_writing_nothing(opt, params, error, match)
    if when == "first step" and name != "Adagrad":  # Adagrad makes its state in __init__, as torch's
        assert not any(opt.state.values()), "a failed first step left state behind"
    _next_step_is_the_twins(opt, params, twin, twin_params, saved)


# The low-precision modes (issue 27) over float32 and bfloat16 params (two buckets; state_dtype
# refuses float64 params): bf16 moments with seeds, a Kahan buffer for the bf16 params, bf16
# params rounded stochastically.
LOW_PRECISION = {
    "bf16 state": dict(state_dtype=torch.bfloat16),
    "kahan + bf16 state": dict(compensation="kahan", state_dtype=torch.bfloat16),
    "stochastic": dict(compensation="stochastic"),
}
# what a sparse grad meets in these modes: the sparse rules keep no low-precision variants
LOW_PRECISION_SPARSE = (NotImplementedError, "sparse")


def _low_precision_params(device):
    torch.manual_seed(0)
    make = lambda *shape, dtype=torch.bfloat16: torch.nn.Parameter(torch.randn(*shape, device=device).to(dtype))
    first = [make(3, 4, dtype=torch.float32), make(3)]
    transposed = torch.nn.Parameter(torch.randn(5, 2, device=device).to(torch.bfloat16).t())  # non-contiguous
    return first, [transposed, make(0), make(2, dtype=torch.float32), make(4)]


def _low_precision_cases():
    for fault, (names, *_rest) in FAULTS.items():
        if "sparse" in fault and fault != "sparse grad":
            continue  # one sparse case: every rule refuses it alike in these modes
        for name in sorted(OPTIMIZERS):
            for mode, extras in LOW_PRECISION.items():
                if fault == "param dtype changed after its state was made" and extras.keys() == {"state_dtype"}:
                    continue  # the state's dtype is state_dtype's, not the param's: no fault (with a
                    # Kahan buffer there is one: Note [stale compensation])
                for when in ("first step", "later step"):
                    if when == "first step" and fault in LATER_ONLY:
                        continue
                    yield pytest.param(name, mode, fault, when, id=f"{name}-{mode}-{fault}-{when}")


@pytest.mark.parametrize("name,mode,fault,when", list(_low_precision_cases()))
def test_a_failed_low_precision_step_changes_nothing(name, mode, fault, when, backend, device):
    """The same contract with bf16 state, Kahan buffers and stochastic rounding: nothing written
    by a step that raises (the faulty param is the last one, a bfloat16 param of the last bucket),
    and the next step, the cause gone, equal to the twin's bit for bit: the seeds of the
    stochastic rounding are made with the state, so a failed first step leaves none behind."""
    _, make_fault, error, match = FAULTS[fault]
    if "sparse" in fault:
        error, match = LOW_PRECISION_SPARSE
    first, second = _low_precision_params(device)
    params = first + second
    extras = {"max_grad_norm": 1.0, "error_if_nonfinite": True} if "error_if_nonfinite" in fault else {}
    opt = getattr(fastopt, name)([{"params": first}, {"params": second, "lr": 0.005}], backend=backend,
                                 **OPTIMIZERS[name], **LOW_PRECISION[mode], **extras)
    if when == "later step":
        for seed in (1, 2):
            _grads(params, seed)
            opt.step()
    twin_params, twin = copy.deepcopy((params, opt))

    _grads(params, 3)
    saved = params[-1].data
    make_fault(params[-1])
    _step_fails_writing_nothing(opt, params, error, match)
    if when == "first step" and name != "Adagrad":
        assert not any(opt.state.values()), "a failed first step left state behind"
    _next_step_is_the_twins(opt, params, twin, twin_params, saved)
    if backend == "cpu":  # the kernels ran, not the reference rules
        assert opt.step_stats.reference == 0, opt.step_stats


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_error_if_nonfinite_is_clip_grad_norm_s_error(name, backend, device):
    """The same error type and message as clip_grad_norm_(..., error_if_nonfinite=True); finite
    norms step as without the flag; a GradScaler step that it skips anyway does not raise."""
    params = [torch.nn.Parameter(torch.randn(4, device=device)) for _ in range(2)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.full_like(p, math.nan)
        r.grad = p.grad.clone()
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    opt = getattr(fastopt, name)(params, backend=backend, max_grad_norm=1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        opt.step()
    assert str(ours.value) == str(torch_error.value)
    assert opt.last_grad_norm is None

    plain = getattr(fastopt, name)([p.detach().clone().requires_grad_() for p in params], backend=backend,
                                   max_grad_norm=1.0)
    for p, q in zip(params, plain.param_groups[0]["params"]):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    plain.step()
    for p, q in zip(params, plain.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, **TOL[torch.float32])

    # under a GradScaler that found inf: the step is skipped, not an error
    for p in params:
        p.grad = torch.full_like(p, math.inf)
    opt.grad_scale = torch.ones((), device=device)
    opt.found_inf = torch.ones((), device=device)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_error_if_nonfinite_needs_max_grad_norm():
    with pytest.raises(ValueError, match="needs max_grad_norm"):
        fastopt.Adam([torch.nn.Parameter(torch.zeros(2))], error_if_nonfinite=True)
    with pytest.raises(TypeError, match="must be a bool"):
        fastopt.Adam([torch.nn.Parameter(torch.zeros(2))], max_grad_norm=1.0, error_if_nonfinite=1)
