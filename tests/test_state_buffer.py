"""Note [state in one buffer] (fastopt/optim/_state_buffer.py): the state a step creates, and the
state load_state_dict brings, lies back to back in one buffer per (device, dtype, key), in the
order of the param groups; each tensor still has a storage of its own, so state dicts, saving and
loading are torch.optim's."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fastopt
from fastopt.optim import _state_buffer
from harness import Side, assert_matches, lockstep
from specs import NAMES, SPEC_BY_NAME, clone_params

if fastopt._ext._C is None:
    pytest.skip("the state buffer is the extension's (fastopt._C.carve)", allow_module_level=True)


def _params(device):
    """Sizes under and over the 16-byte alignment, an empty param and a permuted one."""
    return [
        torch.nn.Parameter(torch.randn(3, device=device)),
        torch.nn.Parameter(torch.randn(10, 10, device=device)),
        torch.nn.Parameter(torch.randn(0, device=device)),
        torch.nn.Parameter(torch.randn(5, 4, device=device).t()),  # strides (1, 4)
        torch.nn.Parameter(torch.randn(1, device=device)),
        torch.nn.Parameter(torch.randn(33, device=device)),
    ]


def _groups(params, lr):
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr * 3}]


def _back_to_back(tensors, what):
    """Each tensor has a storage of its own bytes, and each non-empty one begins where the one
    before it ends, rounded up to 16 bytes when it has 16 bytes or more (Note [state in one
    buffer])."""
    end = None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        assert t.untyped_storage().nbytes() == nbytes, f"{what} {i}: its storage holds more than it"
        if nbytes == 0:
            continue
        if end is not None:
            expected = -(-end // _state_buffer.ALIGN_BYTES) * _state_buffer.ALIGN_BYTES if nbytes >= 16 else end
            assert t.data_ptr() == expected, f"{what} {i}: at {t.data_ptr() - expected:+d} bytes from where it belongs"
        end = t.data_ptr() + nbytes


def _assert_in_one_buffer(opt, params, keys=None):
    keys = keys or {k for p in params for k in opt.state.get(p, {}) if k != "seed"}
    assert keys, "no state to check"
    for key in sorted(keys):
        _back_to_back([opt.state[p][key] for p in params if key in opt.state.get(p, {})], key)


def _autograd_grads(sides):
    """The same grads on every side, as backward makes them (laid out like each param)."""
    weights = [torch.randn_like(p) for p in sides[0].params]
    for side in sides:
        sum((p * w).sum() for p, w in zip(side.params, weights)).backward()


@pytest.mark.parametrize("name", NAMES)
def test_the_state_of_a_step_lies_in_one_buffer_per_key(name, backend, device):
    """Two groups, an empty and a permuted param, grads from backward: every state key's tensors
    lie back to back in param order, each with a storage of its own, and the steps are
    torch.optim's on the backend's kernels."""
    spec = SPEC_BY_NAME[name]
    base = _params(device)
    ours, theirs = clone_params(base), clone_params(base)
    config = dict(spec.stateful)
    opt_f = spec.fastopt_cls(_groups(ours, spec.lr), backend=backend, lr=spec.lr, **config)
    opt_t = spec.torch_cls(_groups(theirs, spec.lr), foreach=False, lr=spec.lr, **config)
    sides = [Side(opt_f, ours, backend=backend), Side(opt_t, theirs)]
    lockstep(sides, steps=3, grads=lambda step: _autograd_grads(sides),
             after_step=lambda step: [s.opt.zero_grad() for s in sides])
    _assert_in_one_buffer(opt_f, ours)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


@pytest.mark.parametrize("name,extras", [
    ("AdamW", {"master_weights": True}),
    ("AdamW", {"state_dtype": torch.bfloat16, "compensation": "kahan"}),
    ("Adagrad", {"master_weights": True}),  # state made in __init__, where grad mode is on
], ids=["masters", "bf16 state+kahan", "Adagrad masters"])
def test_master_weights_and_low_precision_state_lie_in_one_buffer(name, extras, backend, device):
    """bfloat16 params: their float32 masters (copies of the params) and moments; and bfloat16
    state with Kahan compensation buffers: each key back to back, no state tensor tracked by
    autograd, the masters equal to the params they were made from."""
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in _params(device)]
    opt = getattr(fastopt, name)(_groups(params, 1e-3), backend=backend, lr=1e-3, **extras)
    masters = {}
    if name == "Adagrad":
        masters = {p: opt.state[p]["master_param"].clone() for p in params}
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    _assert_in_one_buffer(opt, params)
    state = [t for p in params for t in opt.state[p].values()]
    assert not any(t.requires_grad for t in state), "a state tensor is part of the autograd graph"
    copy.deepcopy(opt.state_dict())
    for p in params if "master_weights" in extras else ():
        # weight decay lr * 1e-2 and no grad: the master moves by far less than a bfloat16 ulp
        made = masters.get(p, opt.state[p]["master_param"])
        assert torch.equal(made.bfloat16(), p.detach())


def test_complex_and_float_params_have_a_buffer_each():
    """A complex param among float32 ones: its moments lie in a complex64 buffer of their own
    (one buffer per dtype), the float32 ones' back to back around it; the steps are torch.optim's."""
    base = [torch.nn.Parameter(torch.randn(n)) for n in (8, 12)]
    base.insert(1, torch.nn.Parameter(torch.randn(6, dtype=torch.complex64)))
    ours, theirs = clone_params(base), clone_params(base)
    opt_f = fastopt.AdamW(ours, backend="cpu", weight_decay=0.1)
    opt_t = torch.optim.AdamW(theirs, foreach=False, weight_decay=0.1)
    lockstep([Side(opt_f, ours, backend="cpu"), Side(opt_t, theirs)], ours, steps=3)
    _assert_in_one_buffer(opt_f, [ours[0], ours[2]], {"exp_avg", "exp_avg_sq"})
    assert opt_f.state[ours[1]]["exp_avg"].dtype == torch.complex64
    _assert_in_one_buffer(opt_f, ours, {"step"})
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


def test_saving_one_state_tensor_writes_that_tensor_alone():
    """torch.save of one state tensor writes its own bytes, not its buffer's; the whole state dict
    saved and loaded steps on in torch.optim.AdamW as in fastopt (both ways), and deep-copies."""
    base = [torch.nn.Parameter(torch.randn(1000)) for _ in range(50)]
    ours, theirs = clone_params(base), clone_params(base)
    opt_f = fastopt.AdamW(ours, backend="cpu")
    lockstep([Side(opt_f, ours, backend="cpu")], ours, steps=2)
    one = io.BytesIO()
    torch.save(opt_f.state[ours[0]]["exp_avg"], one)
    # 4,000 bytes of data and torch.save's zip container (about 1.5 KB); the buffer holds 200 KB
    assert 4000 < len(one.getvalue()) < 4000 + 4096
    whole = io.BytesIO()
    torch.save(opt_f.state_dict(), whole)
    whole.seek(0)
    opt_t = torch.optim.AdamW(theirs, foreach=False)
    opt_t.load_state_dict(torch.load(whole))
    with torch.no_grad():
        for p, q in zip(theirs, ours):
            p.copy_(q)
    copied = copy.deepcopy(opt_f.state_dict())
    assert all(torch.equal(copied["state"][i]["exp_avg"], opt_f.state[p]["exp_avg"]) for i, p in enumerate(ours))
    lockstep([Side(opt_f, ours, backend="cpu"), Side(opt_t, theirs)], ours, steps=3)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_loaded_state_lies_in_one_buffer(name, backend, device):
    """A torch.optim state dict, saved and loaded from a file (one storage per tensor), is copied
    into one buffer per key by load_state_dict; the steps go on as torch.optim's."""
    spec = SPEC_BY_NAME[name]
    base = _params(device)
    ours, theirs = clone_params(base), clone_params(base)
    config = dict(spec.stateful)
    opt_t = spec.torch_cls(_groups(theirs, spec.lr), foreach=False, lr=spec.lr, **config)
    lockstep([Side(opt_t, theirs)], theirs, steps=2)
    saved = io.BytesIO()
    torch.save(opt_t.state_dict(), saved)
    saved.seek(0)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    opt_f = spec.fastopt_cls(_groups(ours, spec.lr), backend=backend, lr=spec.lr, **config)
    opt_f.load_state_dict(torch.load(saved))
    _assert_in_one_buffer(opt_f, ours)
    lockstep([Side(opt_f, ours, backend=backend), Side(opt_t, theirs)], ours, steps=3)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


def test_large_state_tensors_are_allocated_alone():
    """A param whose state tensors are over MAX_PIECE_BYTES gets them allocated by themselves;
    the small params' state lies back to back around it (and every step count, the large
    param's too)."""
    big = _state_buffer.MAX_PIECE_BYTES // 4 + 1
    params = [torch.nn.Parameter(torch.randn(n)) for n in (100, big, 100, 100)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fastopt.Adam(params, backend="cpu")
    opt.step()
    _assert_in_one_buffer(opt, [params[0], params[2], params[3]], {"exp_avg", "exp_avg_sq"})
    _assert_in_one_buffer(opt, params, {"step"})
    state = opt.state[params[1]]["exp_avg"]
    assert state.untyped_storage().nbytes() == big * 4
    small = [opt.state[p]["exp_avg"].data_ptr() for p in (params[0], params[2])]
    assert not small[0] < state.data_ptr() < small[1], "the large tensor was placed in the buffer"
