"""fp32 master weights for fp16/bf16 params, and low-precision params without them."""

from __future__ import annotations

import copy

import pytest
import torch

import fastopt
from conftest import assert_close
from harness import Side, assert_as_accurate_as_torch, assert_same_state, lockstep
from specs import SPEC_BY_NAME, TOL, clone_params, make_params, materialize

LOW = [torch.bfloat16, torch.float16]
CONFIGS = [("Adam", {"weight_decay": 0.1, "amsgrad": True}), ("AdamW", {}), ("Adagrad", {"lr_decay": 0.1}),
           ("RMSprop", {"centered": True, "momentum": 0.5}), ("SGD", {"lr": 0.01, "momentum": 0.9, "dampening": 0.5})]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_master_weights_follow_an_fp32_run(name, config, dtype, backend, device):
    spec = SPEC_BY_NAME[name]
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params(torch.float32, device)]
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_f = spec.fastopt_cls(low, master_weights=True, backend=backend, **materialize(spec, config))
    opt_t = spec.torch_cls(fp32, foreach=False, **materialize(spec, config))
    # grads in the low dtype; the fp32 run gets the same values
    lockstep([Side(opt_f, low, cast=lambda g: g.to(dtype), backend=backend),
              Side(opt_t, fp32, cast=lambda g: g.to(dtype).float())], fp32)
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
    lockstep([Side(opt64, exact, cast=torch.Tensor.double), Side(opt_f, ours, backend=backend), Side(opt_t, theirs)],
             low)
    assert_as_accurate_as_torch(exact, ours, theirs, dtype, roundings=1)
    for st in opt_f.state_dict()["state"].values():
        assert all(v.dtype == dtype for k, v in st.items() if k != "step")


def test_master_weights_leave_fp32_params_alone(backend, device):
    params = make_params(torch.float32, device)
    opt = SPEC_BY_NAME["Adam"].fastopt_cls(params, master_weights=True, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all("master_param" not in s for s in opt.state_dict()["state"].values())


# Note [stale master weights] (fastopt/optim/optimizer.py): a bf16 param written outside the
# optimizer re-seeds its fp32 master at the next step. Each case writes new values in one of the
# ways users do, steps once, and compares with an optimizer whose master was seeded from the new
# values by hand (its state is otherwise ours).
_WRITES = {
    "model.load_state_dict": lambda model, new: model.load_state_dict(new),
    "in-place op": lambda model, new: [p.copy_(new[n]) for n, p in model.named_parameters()],
    "p.data = tensor": lambda model, new: [setattr(p, "data", new[n].clone()) for n, p in model.named_parameters()],
}


def _bf16_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(device, torch.bfloat16)


def _train(model, opt, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()


@pytest.mark.parametrize("how", sorted(_WRITES))
@pytest.mark.parametrize("name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_param_written_outside_the_optimizer_reseeds_its_master(name, config, how, backend, device):
    """#14 item 6: after model.load_state_dict(new_weights) the next step started from the old
    fp32 master and undid the load."""
    spec = SPEC_BY_NAME[name]
    model = _bf16_model(device)
    opt = spec.fastopt_cls(model.parameters(), master_weights=True, backend=backend, **materialize(spec, config))
    _train(model, opt, 3, seed=1)
    new = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        _WRITES[how](model, new)

    twin = _bf16_model(device)
    twin.load_state_dict(new)
    expected = spec.fastopt_cls(twin.parameters(), master_weights=True, backend=backend, **materialize(spec, config))
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state dicts
    for i, (n, _) in enumerate(model.named_parameters()):
        sd["state"][i]["master_param"] = new[n].float()
    expected.load_state_dict(sd)

    _train(model, opt, 1, seed=2)
    _train(twin, expected, 1, seed=2)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        # the same backend and the same inputs: the same result, bit for bit
        assert torch.equal(opt.state[p]["master_param"], expected.state[q]["master_param"]), n
        assert torch.equal(p, q), n
    # and far from what the old master would have given: the write was not undone
    assert all(torch.allclose(p.float(), new[n].float(), atol=0.1) for n, p in model.named_parameters())


def test_a_write_through_p_data_in_place_is_not_seen(backend, device):
    """The documented limit of Note [stale master weights]: ``p.data`` has a version counter of
    its own, so an in-place write through it leaves the master as it was, and the next step
    rounds the old master again (the write is undone). Use ``with torch.no_grad(): p.copy_(x)``."""
    model = _bf16_model(device)
    opt = fastopt.Adam(model.parameters(), master_weights=True, backend=backend)
    _train(model, opt, 2, seed=1)
    masters = [opt.state[p]["master_param"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.data.copy_(torch.zeros_like(p))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam with zero grads moves the master by lr * m_hat / (sqrt(v_hat) + eps): little
    for p, m in zip(model.parameters(), masters):
        assert torch.allclose(opt.state[p]["master_param"], m, atol=1e-2)
        assert not torch.equal(p, torch.zeros_like(p))


def test_resuming_from_a_checkpoint_keeps_its_fp32_masters(backend, device):
    """model.load_state_dict then optimizer.load_state_dict (the usual resume): the loaded fp32
    masters are used as they are, not re-seeded from the bf16 params; the run continues bit for
    bit as an uninterrupted one."""
    model = _bf16_model(device)
    opt = fastopt.AdamW(model.parameters(), master_weights=True, backend=backend)
    _train(model, opt, 3, seed=1)
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "opt": copy.deepcopy(opt.state_dict())}
    _train(model, opt, 2, seed=2)

    resumed = _bf16_model(device)
    opt2 = fastopt.AdamW(resumed.parameters(), master_weights=True, backend=backend)
    _train(resumed, opt2, 1, seed=3)  # some other history first: masters and marks exist
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    _train(resumed, opt2, 2, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])
