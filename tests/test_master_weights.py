"""fp32 master weights for fp16/bf16 params, and low-precision params without them."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close
from harness import assert_same_state, set_grads
from specs import SPEC_BY_NAME, TOL, clone_params, make_params, materialize, random_grads

LOW = [torch.bfloat16, torch.float16]
CONFIGS = [("Adam", {"weight_decay": 0.1, "amsgrad": True}), ("AdamW", {}), ("Adagrad", {"lr_decay": 0.1}),
           ("RMSprop", {"centered": True, "momentum": 0.5})]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_master_weights_follow_an_fp32_run(name, config, dtype, backend, device):
    spec = SPEC_BY_NAME[name]
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params(torch.float32, device)]
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_f = spec.fastopt_cls(low, master_weights=True, backend=backend, **materialize(spec, config))
    opt_t = spec.torch_cls(fp32, foreach=False, **materialize(spec, config))
    for _ in range(20):
        grads = [g.to(dtype) for g in random_grads(fp32)]
        set_grads(low, grads)
        set_grads(fp32, [g.float() for g in grads])
        opt_f.step(), opt_t.step()
    state = opt_f.state_dict()["state"]
    for i, p in enumerate(low):
        master = state[i]["master_param"]
        assert master.dtype == torch.float32
        # the master is the fp32 run (same fp32 math); the param is the master rounded once.
        assert_close(master, fp32[i].detach(), **TOL[torch.float32], what=f"master {i}")
        assert torch.equal(p.detach(), master.to(dtype)), f"param {i} is not the rounded master"
    assert_same_state(opt_f, opt_t, **TOL[torch.float32])
    for st in state.values():
        assert all(v.dtype == torch.float32 for k, v in st.items())


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_low_precision_without_master_is_as_accurate_as_torch(name, config, dtype, backend, device):
    """Error against a float64 run at most 2x torch.optim's own error in the same dtype."""
    spec = SPEC_BY_NAME[name]
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params(torch.float32, device)]
    exact = [torch.nn.Parameter(p.detach().double()) for p in low]
    ours, theirs = clone_params(low), clone_params(low)
    opt64 = spec.fastopt_cls(exact, backend="reference", **materialize(spec, config))
    opt_f = spec.fastopt_cls(ours, backend=backend, **materialize(spec, config))
    opt_t = spec.torch_cls(theirs, foreach=False, **materialize(spec, config))
    for _ in range(20):
        grads = [g.to(dtype) for g in random_grads(low)]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        set_grads(exact, [g.double() for g in grads])
        opt64.step(), opt_f.step(), opt_t.step()
    for i, (e, a, b) in enumerate(zip(exact, ours, theirs)):
        if e.numel() == 0:
            continue
        ours_err = (a.double() - e).abs().max().item()
        torch_err = (b.double() - e).abs().max().item()
        floor = torch.finfo(dtype).eps * e.abs().max().item()  # one rounding of the stored param
        if not math.isfinite(torch_err):
            # fp16 Adam in torch overflows to NaN (eps=1e-8 rounds to 0 in fp16); fastopt's fp32
            # math must not.
            assert math.isfinite(ours_err), f"param {i}: fastopt is not finite either"
            continue
        assert ours_err <= 2 * torch_err + floor, f"param {i}: fastopt {ours_err:.3g} vs torch {torch_err:.3g}"
    for st in opt_f.state_dict()["state"].values():
        assert all(v.dtype == dtype for k, v in st.items() if k != "step")


def test_master_weights_leave_fp32_params_alone(backend, device):
    params = make_params(torch.float32, device)
    opt = SPEC_BY_NAME["Adam"].fastopt_cls(params, master_weights=True, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all("master_param" not in s for s in opt.state_dict()["state"].values())
