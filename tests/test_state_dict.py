"""State dicts: torch's format both ways, resume mid-run, master weights, refusals."""

from __future__ import annotations

import io

import pytest
import torch

import fastopt

from harness import Side, assert_matches, lockstep
from specs import SPEC_BY_NAME, clone_params, make_params, materialize

FULL_STATE = {  # configs that create every state key of each optimizer
    "Adam": {"amsgrad": True, "weight_decay": 0.1},
    "AdamW": {"amsgrad": True},
    "Adagrad": {"lr_decay": 0.1, "initial_accumulator_value": 0.1},
    "RMSprop": {"centered": True, "momentum": 0.5},
    "SGD": {"momentum": 0.9, "dampening": 0.5},
}


def _steps(opts_and_params, n, params_like):
    lockstep([Side(opt, params) for opt, params in opts_and_params], params_like, n)


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("name", list(FULL_STATE))
def test_state_dict_moves_between_torch_and_fastopt(name, direction, backend, device):
    spec, config = SPEC_BY_NAME[name], FULL_STATE[name]
    params = make_params(torch.float32, device)
    first, second, reference = clone_params(params), clone_params(params), clone_params(params)

    def make(cls_kind, ps):
        if cls_kind == "torch":
            return spec.torch_cls(ps, foreach=False, **materialize(spec, config))
        return spec.fastopt_cls(ps, backend=backend, **materialize(spec, config))

    src_kind, dst_kind = direction.split("->")
    src, ref_opt = make(src_kind, first), make("torch", reference)
    _steps([(src, first), (ref_opt, reference)], 10, params)
    dst = make(dst_kind, second)
    with torch.no_grad():
        for p, q in zip(second, first):
            p.copy_(q)
    dst.load_state_dict(_roundtrip(src.state_dict()))
    _steps([(dst, second), (ref_opt, reference)], 10, params)
    # Whichever class continued from the other's checkpoint ends where uninterrupted torch does.
    assert_matches(dst, ref_opt, second, reference, torch.float32)


@pytest.mark.parametrize("name", list(FULL_STATE))
def test_resume_mid_run_is_bit_identical(name, backend, device):
    spec, config = SPEC_BY_NAME[name], FULL_STATE[name]
    params = make_params(torch.float32, device)
    straight, resumed = clone_params(params), clone_params(params)
    opt_a = spec.fastopt_cls(straight, backend=backend, max_grad_norm=1.0, **materialize(spec, config))
    opt_b = spec.fastopt_cls(resumed, backend=backend, max_grad_norm=1.0, **materialize(spec, config))
    _steps([(opt_a, straight), (opt_b, resumed)], 10, params)
    saved = _roundtrip(opt_b.state_dict())
    opt_b = spec.fastopt_cls(resumed, backend=backend, max_grad_norm=1.0, **materialize(spec, config))
    opt_b.load_state_dict(saved)
    _steps([(opt_a, straight), (opt_b, resumed)], 10, params)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for pid in sa:
        for key in sa[pid]:
            assert torch.equal(sa[pid][key], sb[pid][key]), f"{key} of param {pid} differs after resume"
            assert sa[pid][key].device == sb[pid][key].device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_state_stays_fp32_across_load(dtype, backend, device):
    spec = SPEC_BY_NAME["Adam"]
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params(torch.float32, device)]
    opt = spec.fastopt_cls(params, master_weights=True, backend=backend)
    _steps([(opt, params)], 3, params)
    saved = _roundtrip(opt.state_dict())
    fresh = spec.fastopt_cls(clone_params(params), master_weights=True, backend=backend)
    fresh.load_state_dict(saved)
    for pid, st in fresh.state_dict()["state"].items():
        for key, value in st.items():
            assert value.dtype == torch.float32, f"{key} became {value.dtype}"
            assert torch.equal(value.cpu(), saved["state"][pid][key].cpu())

    # A torch.optim checkpoint (bf16 moments, no master) loads with fp32 moments and a new master.
    theirs = clone_params(params)
    topt = torch.optim.Adam(theirs, foreach=False)
    _steps([(topt, theirs)], 2, params)
    fresh = spec.fastopt_cls(theirs, master_weights=True, backend=backend)
    fresh.load_state_dict(_roundtrip(topt.state_dict()))
    _steps([(fresh, theirs)], 1, params)
    for st in fresh.state_dict()["state"].values():
        assert {k: v.dtype for k, v in st.items()} == {
            "step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
            "master_param": torch.float32,
        }
        assert float(st["step"]) == 3


def test_state_dict_from_other_params_is_refused(backend, device):
    spec = SPEC_BY_NAME["Adam"]
    params = make_params(torch.float32, device)
    opt = spec.fastopt_cls(params, backend=backend)
    _steps([(opt, params)], 1, params)
    saved = opt.state_dict()
    other = [torch.nn.Parameter(torch.randn(p.numel() + 1, device=device)) for p in params]
    victim = spec.fastopt_cls(other, backend=backend)
    with pytest.raises(ValueError, match="does not match this optimizer's parameters"):
        victim.load_state_dict(saved)
    assert len(victim.state) == 0  # nothing was loaded
    with pytest.raises(ValueError, match="different number of parameter groups"):
        spec.fastopt_cls([{"params": params[:2]}, {"params": params[2:]}], backend=backend).load_state_dict(saved)


def test_adagrad_state_exists_before_the_first_step(device):
    params = make_params(torch.float32, device)
    ours = SPEC_BY_NAME["Adagrad"].fastopt_cls(clone_params(params), initial_accumulator_value=0.3)
    theirs = torch.optim.Adagrad(clone_params(params), initial_accumulator_value=0.3)
    so, st = ours.state_dict(), theirs.state_dict()
    assert so["state"].keys() == st["state"].keys()
    for pid in st["state"]:
        assert torch.equal(so["state"][pid]["sum"], st["state"][pid]["sum"])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_state_dict_is_torchs(momentum, backend, device):
    """torch.optim.SGD's format: a momentum_buffer per param and no step count, or no state at all
    without momentum (not even an empty entry per param)."""
    params = make_params(torch.float32, device)
    ours, theirs = clone_params(params), clone_params(params)
    opt_f = fastopt.SGD(ours, lr=0.1, momentum=momentum, backend=backend)
    opt_t = torch.optim.SGD(theirs, lr=0.1, momentum=momentum)  # (foreach as the user leaves it: in the groups)
    _steps([(opt_f, ours), (opt_t, theirs)], 2, params)
    sd_f, sd_t = opt_f.state_dict(), opt_t.state_dict()
    assert sd_f["param_groups"] == sd_t["param_groups"]
    assert {i: sorted(s) for i, s in sd_f["state"].items()} == {i: sorted(s) for i, s in sd_t["state"].items()}
    assert (sd_t["state"] == {}) == (momentum == 0)


def test_param_groups_have_torchs_keys():
    for name in FULL_STATE:
        spec = SPEC_BY_NAME[name]
        p = [torch.nn.Parameter(torch.zeros(2))]
        ours = spec.fastopt_cls(p).state_dict()["param_groups"][0]
        theirs = spec.torch_cls(p).state_dict()["param_groups"][0]
        assert ours.keys() == theirs.keys()
        assert ours == theirs


@pytest.mark.parametrize("source", ["Adagrad", "RMSprop", "SGD"])
def test_another_optimizers_state_dict_is_refused_with_nothing_replaced(source, backend, device):
    """AdamW once took Adagrad's lr and step counts and kept its dead `sum` state, and an SGD state
    dict failed halfway through load_state_dict. Now the whole dict is checked first: torch's
    KeyError for the missing hyperparameter, and the optimizer as it was."""
    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    others = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, others):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt = fastopt.AdamW(params, lr=0.01, backend=backend)
    opt.step()
    other = getattr(torch.optim, source)(others, lr=0.5, **({"momentum": 0.9} if source == "SGD" else {}))
    other.step()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    with pytest.raises(KeyError, match="betas"):
        opt.load_state_dict(other.state_dict())
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    for p in params:
        assert opt.state[p].keys() == state[id(p)].keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items())
    opt.step()  # still a working AdamW


def test_a_state_dict_with_foreign_state_keys_is_refused():
    """Groups that look right, state that is not this optimizer's (an Adagrad `sum`)."""
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = fastopt.AdamW([p], backend="reference")
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["sum"] = torch.zeros(3)
    with pytest.raises(ValueError, match="sum"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_like_the_original(how, backend, device):
    """torch's __getstate__ keeps defaults, state and param_groups only: a copy once lacked
    fastopt's options and failed at its first step (AttributeError: '_options')."""
    import copy
    import pickle

    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    opt = fastopt.AdamW(params, lr=0.01, max_grad_norm=0.5, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.options == opt.options
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    lockstep([Side(opt, params), Side(twin, twin_params)], params, 3)
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())
    torch.testing.assert_close(twin.last_grad_norm, opt.last_grad_norm, rtol=0, atol=0)
