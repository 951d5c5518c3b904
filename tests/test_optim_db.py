"""torch's own optimizer test database (``optim_db``, the inputs and error inputs of torch's
test_optim.py) run against every backend.

Params include an empty one, a one-element one, a non-contiguous one and (where torch supports it)
a complex one; grads are laid out as autograd makes them (like the param) and as people assign
them (contiguous). Where fastopt deliberately differs from torch, ``DELIBERATE`` says so (the
README lists the same).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from harness import Side, assert_matches, lockstep
from specs import NAMES, SPEC_BY_NAME, clone_params

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="torch's test utilities need expecttest"
)
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

INFOS = {info.optim_cls.__name__: info for info in common_optimizers.optim_db
         if info.optim_cls.__name__ in NAMES}

# Error inputs where fastopt deliberately does something else (README, "Differences from torch.optim"):
# a duplicate parameter in a group is an error, not a warning (it would be updated twice per step).
DELIBERATE = {".*a parameter group with duplicate parameters.*": ValueError}


def _params(device, complex_ok):
    shapes = [(0,), (1,), (3, 4)]
    params = [torch.randn(s, device=device) for s in shapes]
    params.append(torch.randn(5, 3, device=device).t())  # non-contiguous
    if complex_ok:
        params.append(torch.randn(2, 3, dtype=torch.complex64, device=device))
    return [torch.nn.Parameter(p) for p in params]


def _grads(params, layout):
    if layout == "autograd":  # laid out like the param, as autograd makes them
        return [torch.randn_like(p) for p in params]
    return [torch.randn(p.shape, dtype=p.dtype, device=p.device) for p in params]


def _inputs(name, device):
    return INFOS[name].optim_inputs_func(device=device, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["autograd", "contiguous"])
@pytest.mark.parametrize("name", NAMES)
def test_optim_db_inputs_match_torch(name, layout, backend, device):
    complex_ok = backend != "triton" or device == "cpu"
    for inp in _inputs(name, device):
        base = _params(device, complex_ok)
        ours, theirs = clone_params(base), clone_params(base)

        def kwargs():  # tensors (lr) fresh for each optimizer
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.kwargs.items()}
        opt_t = INFOS[name].optim_cls(theirs, **kwargs())
        opt_f = SPEC_BY_NAME[name].fastopt_cls(ours, backend=backend, **kwargs())
        lockstep([Side(opt_t, theirs), Side(opt_f, ours)], steps=5, grads=lambda step: _grads(base, layout))
        try:
            assert_matches(opt_f, opt_t, ours, theirs, torch.float32)
        except BaseException as exc:
            raise AssertionError(f"optim_db input {inp.desc!r} {inp.kwargs}: {exc}") from exc
        stats = opt_f.step_stats
        on_kernels = stats.kernel if backend in ("cpu", "cuda", "triton") else stats.reference
        assert on_kernels == len(base), (inp.desc, stats)


def _error_cases() -> list:
    out = []
    for name in NAMES:
        for i, err in enumerate(INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            out.append(pytest.param(name, i, id=f"{name}-{i}-{err.optimizer_error_input.desc}"))
    return out


@pytest.mark.parametrize("name,index", _error_cases())
def test_optim_db_error_inputs_raise_as_torch(name, index, backend, device):
    err = INFOS[name].optim_error_inputs_func(device=device, dtype=torch.float32)[index]
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2, device=device))]
    cls = SPEC_BY_NAME[name].fastopt_cls
    error_type = DELIBERATE.get(err.error_regex, err.error_type)
    regex = "duplicate" if err.error_regex in DELIBERATE else err.error_regex
    if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(error_type, Warning):
            with pytest.warns(error_type, match=regex):
                cls(params, backend=backend, **inp.kwargs)
        else:
            with pytest.raises(error_type, match=regex), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(params, backend=backend, **inp.kwargs)
    else:
        opt = cls(params, backend=backend, **inp.kwargs)
        with pytest.raises(error_type, match=regex):
            opt.step()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])  # torch's Adagrad has no capturable flag
def test_capturable_on_cpu_params_is_accepted_on_purpose(name, backend, device):
    """A deliberate difference: torch refuses capturable=True for CPU params at the first step
    (an AssertionError); fastopt accepts it on any device, since its steps never sync with the
    host anyway, and steps exactly as without it."""
    if device != "cpu":
        pytest.skip("the difference concerns CPU params")
    base = [torch.nn.Parameter(torch.randn(4, 3))]
    with_flag, without = clone_params(base), clone_params(base)
    kwargs = {"capturable": True}
    theirs = clone_params(base)
    for p in theirs:
        p.grad = torch.ones_like(p)
    with pytest.raises(AssertionError, match="capturable"):
        INFOS[name].optim_cls(theirs, **kwargs).step()
    opts = [SPEC_BY_NAME[name].fastopt_cls(ps, backend=backend, **kw) for ps, kw in ((with_flag, kwargs), (without, {}))]
    lockstep([Side(o, ps) for o, ps in zip(opts, (with_flag, without))], steps=3,
             grads=lambda step: _grads(base, "autograd"))
    assert torch.equal(with_flag[0].detach(), without[0].detach())


# The low-precision modes (issue 27) have no torch.optim twin: their twin is fastopt's reference
# rules with the same extras (Note [fuzzing the low-precision modes], tests/test_fuzz.py, which
# also gives the tolerance: a float32 ulp moves a bf16 rounding to the neighbouring value).
LOW_PRECISION = {
    "bf16-state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "kahan-bf16-state": (torch.bfloat16, {"state_dtype": torch.bfloat16, "compensation": "kahan"}),
    "stochastic": (torch.bfloat16, {"compensation": "stochastic"}),
}
LOW_TOL = dict(rtol=4 * 2.0**-8, atol=1e-6)


def _close_low(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = float(b.float().abs().max()) if b.numel() and b.isfinite().all() else 0.0
    torch.testing.assert_close(a.float(), b.float(), rtol=LOW_TOL["rtol"],
                               atol=LOW_TOL["atol"] + LOW_TOL["rtol"] * scale, equal_nan=True, msg=what)


@pytest.mark.parametrize("mode", list(LOW_PRECISION))
@pytest.mark.parametrize("layout", ["autograd", "contiguous"])
@pytest.mark.parametrize("name", NAMES)
def test_optim_db_inputs_in_the_low_precision_modes(name, layout, mode, backend, device):
    """Every optim_db input of the rule with state_dtype or compensation: the backend's kernels ran
    every param and agree with the reference rules run with the same extras (params, every state
    tensor, seeds and steps), five steps."""
    if backend == "reference":
        pytest.skip("the twin is the reference backend itself")
    dtype, extras = LOW_PRECISION[mode]
    for inp in _inputs(name, device):
        base = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params(device, complex_ok=False)]
        ours, theirs = clone_params(base), clone_params(base)

        def kwargs():  # tensors (lr) fresh for each optimizer
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.kwargs.items()}
        cls = SPEC_BY_NAME[name].fastopt_cls
        opt_t = cls(theirs, backend="reference", **kwargs(), **extras)
        opt_f = cls(ours, backend=backend, **kwargs(), **extras)
        lockstep([Side(opt_t, theirs), Side(opt_f, ours)], steps=5, grads=lambda step: _grads(base, layout))
        what = f"optim_db input {inp.desc!r} {inp.kwargs} ({mode})"
        assert opt_f.step_stats.kernel == len(base) and opt_f.step_stats.reference == 0, (what, opt_f.step_stats)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _close_low(a.detach(), b.detach(), f"{what}: param {i}")
            sa, sb = opt_f.state[a], opt_t.state[b]
            assert sa.keys() == sb.keys(), (what, i, sorted(sa), sorted(sb))
            for key, value in sb.items():
                if key in ("step", "seed"):
                    assert float(sa[key]) == float(value), (what, i, key)
                else:
                    assert sa[key].dtype == value.dtype, (what, i, key)
                    _close_low(sa[key], value, f"{what}: param {i} {key}")
