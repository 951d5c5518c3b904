"""fastopt's arithmetic against torch.optim's, bit for bit where the arithmetic allows it.

The reference rules (the spec) are written with the ops torch's for-loop uses, composed so that
each rounds as torch's does (Note [torch's rounding, device scalars], fastopt/reference/_scalars.py):
on the same CPU they give torch's bits, whatever the CPU (ATen's kernels round alike or not per
CPU, and the spec runs ATen's kernels). The C++ kernels follow the same rule for each op (Note
[torch's fused multiply-adds], csrc/include/fastopt/update_math.h) with one thing they cannot copy:
torch's CPU sqrt is not always correctly rounded (on AMD CPUs, through MKL, one float32 result in
six is one ulp off), the kernels' is. So a kernel's element may differ from torch's only where
torch's sqrt of that element's state is not the correctly rounded one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastopt
from harness import Side, lockstep
from specs import SPEC_BY_NAME

# Configs whose every input torch and the spec round alike (tensor betas: Note [tensor betas] in
# specs.py; float64 bias corrections on either side), float lr and tensor lr.
BITWISE_CASES = [
    ("Adam", {}),
    ("Adam", {"weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    ("Adam", {"weight_decay": 0.1, "decoupled_weight_decay": True, "lr": "tensor"}),
    ("AdamW", {"weight_decay": 0.1}),
    ("Adagrad", {"weight_decay": 0.1, "lr_decay": 0.5}),
    ("Adagrad", {"lr": "tensor", "maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"weight_decay": 0.1, "centered": True, "momentum": 0.9}),
    ("RMSprop", {"lr": "tensor", "centered": True, "momentum": 0.5, "maximize": True}),
    ("SGD", {}),
    ("SGD", {"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.1}),
    ("SGD", {"lr": "tensor", "momentum": 0.9, "nesterov": True, "maximize": True}),
]


def _params():
    torch.manual_seed(0)
    shapes = [(1,), (7,), (4097,), (0,), (3, 5)]
    ps = [torch.randn(s) for s in shapes] + [torch.randn(6, 8).t()]  # a non-contiguous one too
    return ps


def _lockstep(name, config, backend, steps=20, schedule=False, after_step=None):
    """torch.optim's for-loop and fastopt on the same params and the same grads (assigned, as
    users do, and made by autograd), an LR schedule optionally; returns both optimizers and params."""
    spec = SPEC_BY_NAME[name]
    kw = {"lr": spec.lr, **config}
    if kw["lr"] == "tensor":
        kw["lr"] = torch.tensor(spec.lr)
    init = _params()
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    opt_t = spec.torch_cls([{"params": theirs[:3]}, {"params": theirs[3:]}], foreach=False, **kw)
    kw_f = dict(kw, lr=kw["lr"].clone() if torch.is_tensor(kw["lr"]) else kw["lr"])
    opt_f = spec.fastopt_cls([{"params": ours[:3]}, {"params": ours[3:]}], backend=backend, **kw_f)
    scheds = []
    if schedule:  # the case: one-cycle lr, and momentum cycled where the rule has one
        cycle = "momentum" in config
        scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=steps, cycle_momentum=cycle)
                  for o in (opt_t, opt_f)]
    torch.manual_seed(1)

    def grads(step):
        if step % 2:  # grads from autograd
            w = torch.randn(4)
            for ps in (theirs, ours):
                sum((p * w.sum()).square().sum() for p in ps).backward()
            return None
        return [torch.randn(p.shape) for p in init]  # assigned by hand: another layout for the permuted one

    def after(step):
        if after_step is not None:
            after_step(opt_t, theirs)
        for s in scheds:
            s.step()
        for o in (opt_t, opt_f):
            o.zero_grad()

    lockstep([Side(opt_t, theirs), Side(opt_f, ours, backend=backend)], steps=steps, grads=grads, after_step=after)
    return opt_t, opt_f, theirs, ours


def _pairs(opt_t, opt_f, theirs, ours):
    for i, (q, p) in enumerate(zip(theirs, ours)):
        yield f"param {i}", q, p
        for key, v in opt_t.state[q].items():
            if key != "step":
                yield f"param {i} {key}", v, opt_f.state[p][key]


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "onecycle"])
@pytest.mark.parametrize("name,config", BITWISE_CASES, ids=lambda c: str(c))
def test_spec_is_torch_bit_for_bit(name, config, schedule):
    """The reference rules end 20 steps (two param groups, grads assigned and from autograd, a
    non-contiguous param, an empty one) on torch's for-loop's bits, on this CPU whatever it is,
    also under OneCycleLR with cycled momentum (1.5e-5 apart before they followed torch's
    add_(alpha=)/addcdiv_ rounding)."""
    opt_t, opt_f, theirs, ours = _lockstep(name, config, "reference", schedule=schedule)
    assert opt_f.step_stats.reference > 0 and opt_f.step_stats.kernel == 0
    for what, want, got in _pairs(opt_t, opt_f, theirs, ours):
        assert torch.equal(got, want), f"{what}: {int((got != want).sum())} of {want.numel()} elements differ"


def _torch_fuses() -> bool:
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def _ours_fuses() -> bool:
    return fastopt.cpu_capability() != "default"


def _sqrt_operand(name, config, st):
    """What the rule takes the sqrt of, as torch computed it this step (None: SGD takes none)."""
    if name == "SGD":
        return None
    if name in ("Adam", "AdamW"):
        return st["max_exp_avg_sq"] if config.get("amsgrad") else st["exp_avg_sq"]
    if name == "Adagrad":
        return st["sum"]
    if config.get("centered"):
        return st["square_avg"].addcmul(st["grad_avg"], st["grad_avg"], value=-1)
    return st["square_avg"]


@pytest.mark.parametrize("name,config", BITWISE_CASES, ids=lambda c: str(c))
def test_cpu_kernels_are_torch_but_for_its_sqrt(name, config):
    """Three steps of the C++ kernels (the capability in use) against torch's for-loop, both fusing
    multiply-adds or neither (ATen's default kernels vs its AVX2/AVX-512 ones): every element of
    every param and state tensor is torch's, except where torch's sqrt of that element's state
    (Adam's v or max v, Adagrad's sum, RMSprop's square_avg or its centered variance; SGD has
    none: every element) was not the correctly rounded one in some step (the rules are elementwise, and so are these grads)."""
    if "cpu" not in fastopt.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    if _torch_fuses() != _ours_fuses():
        pytest.skip(f"torch's {torch.backends.cpu.get_cpu_capability()} kernels and fastopt's "
                    f"{fastopt.cpu_capability()} kernels round multiply-adds differently")
    inexact = {}

    def mark(opt_t, theirs):
        for i, q in enumerate(theirs):
            x = _sqrt_operand(name, config, opt_t.state[q])
            if x is None:
                bad = torch.zeros(q.shape, dtype=torch.bool)
            else:
                x = x.detach()
                bad = torch.from_numpy(np.sqrt(x.numpy()) != x.sqrt().numpy())
            inexact[i] = inexact.get(i, torch.zeros_like(bad)) | bad

    opt_t, opt_f, theirs, ours = _lockstep(name, config, "cpu", steps=3, after_step=mark)
    assert opt_f.step_stats.kernel > 0 and opt_f.step_stats.reference == 0
    checked = 0
    for i, (q, p) in enumerate(zip(theirs, ours)):
        clean = ~inexact[i]
        checked += int(clean.sum())
        for key, want in [("param", q)] + [(k, v) for k, v in opt_t.state[q].items() if k != "step"]:
            got = p if key == "param" else opt_f.state[p][key]
            differ = (got.detach() != want.detach()) & clean
            assert not differ.any(), f"param {i} {key}: {int(differ.sum())} elements differ where torch's sqrt was exact"
    assert checked > 2000  # most elements: torch's sqrt is exact for five in six
